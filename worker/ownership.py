"""Session ownership: claim sessions through the workers' group, serve each, publish its events once.

A claimed session is served from its first audio entry, whether new or reclaimed from a dead owner:
the streaming session is deterministic in its audio, so a replay regenerates the same events, and
Redis refuses the ones already there (explicit ids), so consumers see every seq exactly once.
ONNX Runtime runs in a thread pool; the event loop only moves Redis traffic. One error boundary per
session: whatever goes wrong ends that session with an `error` event, never the worker.

Redis outages are waited out, never turned into errors: the claim loop backs off with jitter and
logs once per state change; a session whose Redis calls fail for longer than `redis_retry_s` stays
pending and is replayed later. A worker that was paused or cut off past `reclaim_idle_ms` checks
that it still owns a session before it publishes again. A session whose Redis data vanished
(FLUSHALL, a restart without persistence, a hole in its audio) ends with an `error` event `lost`.
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
from rawwave.streams import TRANSIENT_ERRORS, Backoff, Claim, Streams
from worker.batcher import Batcher
from worker.image import ImageError
from worker.interleaved import open_session
from worker.metrics import WorkerMetrics
from worker.runtime import Runtime
from worker.session import StreamingOptions, StreamingSession

log = get_logger(__name__)
T = TypeVar("T")

READ_BLOCK_MS = 500  # longest wait for audio before looking at timeouts again
HEARTBEAT_S = 2.0
HEARTBEAT_TTL_S = 10
LOST_MESSAGE = "Redis lost this session's data (FLUSHALL or a restart without persistence); push it again"
LOST_IMAGE = "Redis no longer has this session's image (expired or lost); push it again"


class ClaimLost(Exception):
    """Another worker owns this session now: stop serving it, publish nothing more."""


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
        self.batcher = make_batcher(settings, runtime)
        threads = settings.max_sessions_per_worker if self.batcher else settings.inference_threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="ort")  # batching: one per session
        self.live: dict[bytes, Live] = {}
        self.stopping = asyncio.Event()
        self.slot_free = asyncio.Event()
        self.served = 0
        self.claims_confirmed_at = time.monotonic()  # when _keep_claims last saw all our claims as ours
        self.gone: set[bytes] = set()  # claims whose session Redis no longer has

    # -- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Claim and serve until stop(); then drain and hand back what did not finish in time."""
        await self._until_redis_answers(self.streams.ensure_groups)
        helpers = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._keep_claims())]
        log.info("worker started", worker=self.name, max_sessions=self.settings.max_sessions_per_worker)
        try:
            await self._claim_until_stopped()
            await self._drain()
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._beat(draining=True)
            self.pool.shutdown(wait=False, cancel_futures=True)
        batching = self.batcher.describe() if self.batcher else {}
        log.info("worker stopped", worker=self.name, sessions_served=self.served, **batching)

    async def _claim_until_stopped(self) -> None:
        """The process's error boundary: a failing claim backs off (jittered) and is logged once."""
        next_reclaim, backoff, last_error = 0.0, Backoff(), ""
        while not self.stopping.is_set():
            try:
                next_reclaim = await self._claim_some(next_reclaim)
            except TRANSIENT_ERRORS as e:
                self.streams.link.failed(e)
            except Exception as e:
                if str(e) != last_error:
                    log.exception("claiming sessions failed: backing off", error=str(e))
                last_error = str(e)
            else:
                self.streams.link.ok()
                backoff.reset()
                last_error = ""
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff.next_s())

    async def _until_redis_answers(self, call: Any) -> None:
        backoff = Backoff()
        while True:
            try:
                await call()
                self.streams.link.ok()
                return
            except TRANSIENT_ERRORS as e:
                self.streams.link.failed(e)
                await asyncio.sleep(backoff.next_s())

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
            await self._release(claim)
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
            await self._release(live.claim)
            log.warning("drain deadline: session handed back", session_id=live.claim.session)

    async def _release(self, claim: Claim) -> None:
        """Hand a claim back; if Redis is unreachable it stays pending and is reclaimed when idle."""
        try:
            await self.streams.release(self.name, claim)
        except TRANSIENT_ERRORS as e:
            log.warning("could not hand the session back; it is reclaimed when idle", error=str(e))

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
        """Refresh our claims well within reclaim_idle_ms; a claim someone took over stops its session,
        one whose session Redis lost ends it with an error."""
        while True:
            await asyncio.sleep(self.settings.reclaim_idle_ms / 3000)
            checked_at = time.monotonic()
            try:
                lost = await self.streams.keep_claims(self.name, [live.claim for live in self.live.values()])
                for entry_id in lost:
                    await self._lost_claim(entry_id)
            except TRANSIENT_ERRORS as e:
                self.streams.link.failed(e)
                continue
            except Exception as e:
                log.warning("could not refresh claims", error=str(e))
                continue
            self.claims_confirmed_at = checked_at

    async def _lost_claim(self, entry_id: bytes) -> None:
        live = self.live.get(entry_id)
        if live is None or entry_id in self.gone:
            return
        if await self.streams.announce_exists(live.claim):
            log.warning("session taken over by another worker", session_id=live.claim.session)
            live.task.cancel()
        else:
            log.error("Redis lost the session's data: ending it with an error", session_id=live.claim.session)
            self.gone.add(entry_id)

    async def confirm_owner(self, claim: Claim) -> None:
        """Before publishing: if our claims were not confirmed lately (we were paused or cut off for
        long enough to be reclaimed), ask Redis whether this one is still ours."""
        stale_after_s = self.settings.reclaim_idle_ms / 2000
        if time.monotonic() - self.claims_confirmed_at < stale_after_s:
            return
        if await self.streams.still_owner(self.name, claim):
            return
        if not await self.streams.announce_exists(claim):
            self.gone.add(claim.entry_id)  # nobody owns it: Redis lost it; we end it with `lost`
            return
        raise ClaimLost(f"claim {claim.entry_id.decode()} is no longer ours")

    # -- one session ---------------------------------------------------------------------------

    async def _serve(self, claim: Claim) -> None:
        """The error boundary of one session."""
        with bind_session(claim.session):
            try:
                outcome = await self._serve_claim(claim)
            except asyncio.CancelledError:
                self.metrics.sessions_done.labels("handed_over").inc()
                raise
            except ClaimLost as e:
                log.warning("session taken over while we were away: publishing nothing more", error=str(e))
                outcome = "handed_over"
            except TRANSIENT_ERRORS as e:
                log.warning("redis unreachable too long: session left pending for a replay", error=str(e))
                outcome = "redis_unreachable"
            except Exception as e:
                log.exception("session failed", error=str(e))
                outcome = await self._fail(claim, f"{type(e).__name__}: {e}")
            finally:
                self.gone.discard(claim.entry_id)
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

    def step(self, session: StreamingSession) -> list[Event]:
        """One session step (in the pool): under the batcher, it counts as a session about to call."""
        if self.batcher is None:
            return session.step()
        with self.batcher.step():
            return session.step()

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
        self.sent: list[Event] = []  # what this run published: republished if Redis lost it (see _publish)
        self.outages_seen = self.streams.link.outages

    async def run(self) -> str:
        self.published = await self.streams.last_event_seq(self.session_id)
        self.handled = self.published
        if self.claim.deliveries > 1 or self.published:  # a dead owner's, or one handed over by a drain
            log.info(
                "replaying reclaimed session", deliveries=self.claim.deliveries, published=self.published
            )
        try:
            session = await self.worker.compute(self._open, await self._load_image())
        except ImageError as e:
            return await self._refuse(e)
        outcome = await self._pump(session)
        await self.streams.finish(self.claim)
        self._record(session)
        log.info("session done", outcome=outcome, audio_s=round(self._audio_s, 2), rtf=round(self._rtf, 4),
                 events=session.seq, replayed=self.published, **_decode_summary(session))  # fmt: skip
        return outcome

    def _open(self, image: bytes | None) -> StreamingSession:
        worker = self.worker
        return open_session(
            worker.runtime, worker.options, self.session_id, self.announce.respond, worker.batcher, image
        )

    async def _load_image(self) -> bytes | None:
        """The session's image, read from Redis on every delivery (a replay sees the same image)."""
        if not self.announce.has_image:
            return None
        image = await self.streams.load_image(self.session_id)
        if image is None:
            raise ImageError(LOST_IMAGE, "lost")
        return image

    async def _refuse(self, error: ImageError) -> str:
        """The session cannot start with its image: an error and done as its only events (seq 1 and 2)."""
        log.warning("session refused", code=error.code, message=str(error))
        s = self.session_id
        await self._publish([
            contract.ErrorEvent(session=s, seq=1, t_ms=0, code=error.code, message=str(error)),
            contract.DoneEvent(session=s, seq=2, t_ms=0),
        ])  # fmt: skip
        await self.streams.finish(self.claim)
        return error.code

    async def _pump(self, session: StreamingSession) -> str:
        """Read audio, compute, publish, until the session is done."""
        after, last_audio = 0, time.monotonic()
        while not session.done:
            if self.claim.entry_id in self.worker.gone:
                return await self._abort(session, "lost", LOST_MESSAGE)
            try:
                entries = await self.streams.read_audio(
                    self.session_id, after, count=64, block_ms=READ_BLOCK_MS
                )
            except ContractError as e:
                return await self._abort(session, "bad_audio", str(e))
            if entries:
                if entries[0].seq != after + 1:  # a hole: Redis came back without some audio
                    return await self._abort(session, "lost", _hole(after + 1, entries[0].seq - 1))
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
            except ClaimLost:
                raise
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
            elif entry.reason == "error":  # the file went bad midway: its transcript would be wrong
                return "bad_audio", entry.message or "the audio ended with an error"
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
            events = await self.worker.compute(self.worker.step, session)
            self.compute_s += time.perf_counter() - start
            if not events:
                return
            await self._publish(events)

    async def _publish(self, events: list[Event]) -> None:
        await self.worker.confirm_owner(self.claim)
        if self.streams.link.outages != self.outages_seen:
            await self._restore_lost_events()
        for event in events:
            fresh = event.seq > self.published and await self.streams.publish(event)
            if fresh:
                self.metrics.events.labels(event.type).inc()
                self.sent.append(event)
            else:
                self.metrics.suppressed.inc()
            self.handled = max(self.handled, event.seq)

    async def _restore_lost_events(self) -> None:
        """Redis was unreachable since we last published: if it came back from a snapshot that lacks
        our latest events (AOF everysec loses up to a second), publish them again, in order."""
        self.outages_seen = self.streams.link.outages
        last = await self.streams.last_event_seq(self.session_id)
        missing = [event for event in self.sent if event.seq > last]
        if missing:
            log.warning(
                "events lost by Redis: publishing them again", first=missing[0].seq, count=len(missing)
            )
        for event in missing:
            await self.streams.publish(event)

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


def make_batcher(settings: Settings, runtime: Runtime) -> Batcher | None:
    """The worker's batcher when batching is on (host caches only: the CPU device)."""
    if not settings.batching:
        return None
    if runtime.device != "cpu":
        log.warning("batching is for the CPU device (caches stay on the GPU): decoding unbatched")
        return None
    return Batcher(runtime, settings.batch_lanes, settings.max_batch, settings.batch_window_ms)


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


def _hole(first: int, last: int) -> str:
    return f"audio entries {first}..{last} are missing (Redis lost them); push the audio again"


def _now_ms() -> int:
    return int(time.time() * 1000)
