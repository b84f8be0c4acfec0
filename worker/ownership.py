"""Session ownership: claim sessions through the workers' group, serve each, publish its events once.

A claimed session is served from its first audio entry, whether new or reclaimed from a dead owner:
the streaming session is deterministic in its audio, so a replay regenerates the same events, and
Redis refuses the ones already there (explicit ids), so consumers see every seq exactly once.
ONNX Runtime runs in a thread pool; the event loop only moves Redis traffic. One error boundary per
session: whatever goes wrong ends that session with an `error` event, never the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from rawwave import contract
from rawwave.contract import AudioChunk, ContractError, ErrorCode, Event, SessionAnnounce
from rawwave.logs import bind_session, get_logger
from rawwave.settings import Settings
from rawwave.streams import Claim, Streams
from worker.metrics import WorkerMetrics
from worker.runtime import Runtime
from worker.session import StreamingOptions, StreamingSession

log = get_logger(__name__)
T = TypeVar("T")

READ_BLOCK_MS = 500  # longest wait for audio before looking at timeouts again
HEARTBEAT_S = 2.0
HEARTBEAT_TTL_S = 10


@dataclass
class Live:
    claim: Claim
    task: asyncio.Task[None]


class Worker:
    def __init__(
        self, settings: Settings, runtime: Runtime, streams: Streams, metrics: WorkerMetrics
    ) -> None:
        self.settings, self.runtime, self.streams, self.metrics = settings, runtime, streams, metrics
        self.name = settings.worker_name
        self.options = StreamingOptions.of(runtime.config, settings)
        self.pool = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="ort")
        self.live: dict[bytes, Live] = {}
        self.stopping = asyncio.Event()
        self.slot_free = asyncio.Event()
        self.served = 0

    # -- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Claim and serve until stop(); then drain and hand back what did not finish in time."""
        await self.streams.ensure_groups()
        helpers = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._keep_claims())]
        log.info("worker started", worker=self.name, max_sessions=self.settings.max_sessions_per_worker)
        try:
            next_reclaim = 0.0
            while not self.stopping.is_set():
                next_reclaim = await self._claim_some(next_reclaim)
            await self._drain()
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._beat(draining=True)
            self.pool.shutdown(wait=False, cancel_futures=True)
        log.info("worker stopped", worker=self.name, sessions_served=self.served)

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stop requested: no new sessions, draining", live=len(self.live))
            self.stopping.set()

    async def _claim_some(self, next_reclaim: float) -> float:
        free = self.settings.max_sessions_per_worker - len(self.live)
        if free <= 0:
            self.slot_free.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.slot_free.wait(), 1.0)
            return next_reclaim
        claims: list[Claim] = []
        if time.monotonic() >= next_reclaim:
            claims = await self.streams.reclaim_idle(self.name, count=free)
            next_reclaim = time.monotonic() + self.settings.reclaim_idle_ms / 4000
        if len(claims) < free:
            claims += await self.streams.claim_new(self.name, count=free - len(claims), block_ms=1000)
        for claim in claims:
            await self._start(claim)
        return next_reclaim

    async def _start(self, claim: Claim) -> None:
        if claim.entry_id in self.live:
            return  # our own live session, reclaimed from ourselves after a slow keep-alive
        if self.stopping.is_set():
            await self.streams.release(self.name, claim)
            return
        task = asyncio.create_task(self._serve(claim), name=f"session-{claim.session}")
        self.live[claim.entry_id] = Live(claim, task)
        self.metrics.sessions.set(len(self.live))
        task.add_done_callback(lambda _: self._forget(claim.entry_id))

    def _forget(self, entry_id: bytes) -> None:
        self.live.pop(entry_id, None)
        self.metrics.sessions.set(len(self.live))
        self.slot_free.set()

    async def _drain(self) -> None:
        """Let live sessions finish until the deadline; hand the rest back for another worker."""
        tasks = [live.task for live in self.live.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
        for live in list(self.live.values()):
            live.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await live.task
            await self.streams.release(self.name, live.claim)
            log.warning("drain deadline: session handed back", session_id=live.claim.session)

    # -- helpers: heartbeat and keeping our claims -------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self._beat(draining=self.stopping.is_set())
            await asyncio.sleep(HEARTBEAT_S)

    async def _beat(self, draining: bool) -> None:
        beat = contract.Heartbeat(
            worker=self.name, sessions=len(self.live), draining=draining, at_ms=_now_ms()
        )
        await self.streams.beat(beat, HEARTBEAT_TTL_S)

    async def _keep_claims(self) -> None:
        """Refresh our claims well within reclaim_idle_ms; a claim someone took over stops its session."""
        while True:
            await asyncio.sleep(self.settings.reclaim_idle_ms / 3000)
            try:
                lost = await self.streams.keep_claims(self.name, [live.claim for live in self.live.values()])
            except Exception as e:
                log.warning("could not refresh claims", error=str(e))
                continue
            for entry_id in lost:
                live = self.live.get(entry_id)
                if live is not None:
                    log.warning("session taken over by another worker", session_id=live.claim.session)
                    live.task.cancel()

    # -- one session ---------------------------------------------------------------------------

    async def _serve(self, claim: Claim) -> None:
        """The error boundary of one session."""
        with bind_session(claim.session):
            try:
                outcome = await self._serve_claim(claim)
            except asyncio.CancelledError:
                self.metrics.sessions_done.labels("handed_over").inc()
                raise
            except Exception as e:
                log.exception("session failed", error=str(e))
                outcome = await self._fail(claim, f"{type(e).__name__}: {e}")
            self.served += 1
            self.metrics.sessions_done.labels(outcome).inc()

    async def _serve_claim(self, claim: Claim) -> str:
        if claim.announce is None:
            log.error("malformed announce: dead-lettered", reason=claim.error)
            await self.streams.dead_letter(claim, f"malformed announce: {claim.error}", self.name)
            return "dead_letter"
        if claim.deliveries > self.settings.max_deliveries:
            await self._give_up(claim)
            return "dead_letter"
        self.metrics.queue_lag.observe(max(0.0, _now_ms() - claim.announce.created_ms) / 1000)
        served = SessionRun(self, claim, claim.announce)
        return await served.run()

    async def _fail(self, claim: Claim, message: str) -> str:
        """An unexpected failure: tell the client, finish the session; a Redis outage leaves it pending."""
        try:
            await self._publish_error(
                claim.session, await self.streams.last_event_seq(claim.session), "internal", message
            )
            await self.streams.finish(claim)
        except Exception as e:
            log.warning("could not end the failed session; it stays pending", error=str(e))
        return "failed"

    async def _give_up(self, claim: Claim) -> None:
        reason = f"delivered {claim.deliveries} times (max_deliveries {self.settings.max_deliveries})"
        log.error("session dead-lettered", reason=reason)
        seq = await self.streams.last_event_seq(claim.session)
        await self._publish_error(claim.session, seq, "dead_letter", reason)
        await self.streams.dead_letter(claim, reason, self.name)

    async def _publish_error(self, session: str, seq: int, code: ErrorCode, message: str) -> None:
        await self.streams.publish(
            contract.ErrorEvent(session=session, seq=seq + 1, t_ms=0, code=code, message=message)
        )
        await self.streams.publish(contract.DoneEvent(session=session, seq=seq + 2, t_ms=0))

    async def compute(self, fn: Any, *args: Any) -> Any:
        """Run inference off the event loop, keeping the session's log context."""
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        return await loop.run_in_executor(self.pool, lambda: ctx.run(fn, *args))


class SessionRun:
    """Serving one claimed session: read its audio from the start, compute, publish each event once."""

    def __init__(self, worker: Worker, claim: Claim, announce: SessionAnnounce) -> None:
        self.worker, self.claim, self.announce = worker, claim, announce
        self.streams, self.metrics, self.settings = worker.streams, worker.metrics, worker.settings
        self.session_id = announce.session
        self.published = 0  # highest seq already in the events stream when we started (a replay)
        self.handled = 0  # highest seq we published or found published
        self.audio_bytes = 0
        self.compute_s = 0.0

    async def run(self) -> str:
        self.published = await self.streams.last_event_seq(self.session_id)
        self.handled = self.published
        if self.claim.deliveries > 1:
            log.info(
                "replaying reclaimed session", deliveries=self.claim.deliveries, published=self.published
            )
        session = await self.worker.compute(self._open)
        outcome = await self._pump(session)
        await self.streams.finish(self.claim)
        self._record(session)
        log.info("session done", outcome=outcome, audio_s=round(self._audio_s, 2), rtf=round(self._rtf, 4),
                 events=session.seq, replayed=self.published, **_decode_summary(session))  # fmt: skip
        return outcome

    def _open(self) -> StreamingSession:
        return StreamingSession(
            self.worker.runtime, self.worker.options, self.session_id, self.announce.respond
        )

    async def _pump(self, session: StreamingSession) -> str:
        """Read audio, compute, publish, until the session is done."""
        after, last_audio = 0, time.monotonic()
        while not session.done:
            try:
                entries = await self.streams.read_audio(
                    self.session_id, after, count=64, block_ms=READ_BLOCK_MS
                )
            except ContractError as e:
                return await self._abort(session, "bad_audio", str(e))
            if entries:
                after, last_audio = entries[-1].seq, time.monotonic()
                problem = self._take(session, entries)
                if problem:
                    return await self._abort(session, *problem)
            elif time.monotonic() - last_audio > self.settings.audio_idle_timeout_s:
                return await self._abort(
                    session, "lost", f"no audio for {self.settings.audio_idle_timeout_s:g} s"
                )
            try:
                await self._drive(session)
            except Exception as e:
                log.exception("inference failed", error=str(e))
                return await self._abort(session, "inference_failed", f"{type(e).__name__}: {e}")
        return "done"

    def _take(
        self, session: StreamingSession, entries: list[contract.AudioEntry]
    ) -> tuple[ErrorCode, str] | None:
        for entry in entries:
            if isinstance(entry, AudioChunk):
                self.audio_bytes += len(entry.pcm)
                self.metrics.chunks.inc()
                self.metrics.audio_s.inc(len(entry.pcm) / contract.SAMPLE_WIDTH / contract.SAMPLE_RATE)
                session.feed(entry.pcm)
            else:
                session.end()
                break
        if self._audio_s > self.settings.max_session_s:
            return "too_long", f"more than max_session_s={self.settings.max_session_s:g} s of audio"
        return None

    async def _drive(self, session: StreamingSession) -> None:
        """Step the session until it needs more audio, publishing as events come."""
        while True:
            start = time.perf_counter()
            events = await self.worker.compute(session.step)
            self.compute_s += time.perf_counter() - start
            if not events:
                return
            await self._publish(events)

    async def _publish(self, events: list[Event]) -> None:
        for event in events:
            fresh = event.seq > self.published and await self.streams.publish(event)
            if fresh:
                self.metrics.events.labels(event.type).inc()
            else:
                self.metrics.suppressed.inc()
            self.handled = max(self.handled, event.seq)

    async def _abort(self, session: StreamingSession, code: ErrorCode, message: str) -> str:
        log.warning("session ended with an error", code=code, message=message)
        session.seq = self.handled  # no gap even if a failed step had built events it never returned
        await self._publish(session.abort(code, message))
        return code

    def _record(self, session: StreamingSession) -> None:
        self.metrics.compute_s.inc(self.compute_s)
        if self._audio_s > 0:
            self.metrics.rtf.observe(self._rtf)
        self.metrics.decoded(session.stats)

    @property
    def _audio_s(self) -> float:
        return self.audio_bytes / contract.SAMPLE_WIDTH / contract.SAMPLE_RATE

    @property
    def _rtf(self) -> float:
        return self.compute_s / self._audio_s if self._audio_s else 0.0


def _decode_summary(session: StreamingSession) -> dict[str, float]:
    stats = session.stats
    return {
        "tokens": stats.tokens,
        "tokens_per_s": round(stats.tokens_per_s, 1),
        "mtp_acceptance": round(stats.acceptance, 3),
        "tokens_per_call": round(stats.tokens_per_call, 2),
        "guess_accepted": stats.guess_accepted,
        "guessed": stats.guessed,
    }


def _now_ms() -> int:
    return int(time.time() * 1000)
