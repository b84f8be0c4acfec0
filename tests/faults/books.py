"""The books: push many short sessions through `rawwave.streams`, log every chunk Redis acknowledged
and every event a client received, then check that nothing was lost, duplicated or changed.

Used by every fault test: the faults differ, the books stay the same. A session's events are compared
with a fault-free run of the same model on the same audio (`offline_events`), so "equal" means
equal event by event, finals included.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rawwave import contract
from rawwave.contract import AudioChunk, AudioEnd, Event, SessionAnnounce
from rawwave.streams import Streams
from tests.models import offline_events, runtime_settings, speech_like

CHUNK_BYTES = 6400  # 200 ms of 16 kHz s16
CLIPS = [  # short talk: speech, a pause, speech; four different voices of noise
    speech_like([("speech", 0.8), ("silence", 0.6), ("speech", 0.6), ("silence", 0.2)], seed=seed).tobytes()
    for seed in range(4)
]


@dataclass
class Book:
    session: str
    clip: int
    pushed: list[int] = field(default_factory=list)  # audio seqs Redis acknowledged
    received: list[Event] = field(default_factory=list)  # every event read, before de-dup
    push_errors: int = 0
    read_errors: int = 0
    ended_at: float | None = None  # the end marker was acknowledged
    done_at: float | None = None  # the client saw `done`

    @property
    def events(self) -> list[Event]:
        """After consumer de-dup: first event per seq, in seq order."""
        by_seq: dict[int, Event] = {}
        for event in self.received:
            by_seq.setdefault(event.seq, event)
        return [by_seq[seq] for seq in sorted(by_seq)]


class Books:
    def __init__(self, streams: Streams, sessions: int, prefix: str, pace: float = 1.0) -> None:
        """pace: audio seconds pushed per wall second (1.0 = live); 0 pushes as fast as Redis takes it."""
        self.streams, self.pace = streams, pace
        self.books = [Book(f"{prefix}-{i}", i % len(CLIPS)) for i in range(sessions)]

    # -- running -------------------------------------------------------------------------------

    async def run(self, timeout_s: float, stagger_s: float = 0.05) -> None:
        """Push every session (starts staggered) and follow its events until done or the timeout."""

        async def one(index: int, book: Book) -> None:
            await asyncio.sleep(index * stagger_s)
            await asyncio.gather(self._push(book), self._follow(book, deadline))

        deadline = time.monotonic() + timeout_s
        await asyncio.gather(*(one(i, book) for i, book in enumerate(self.books)))

    async def _push(self, book: Book) -> None:
        pcm = CLIPS[book.clip]
        announce = SessionAnnounce(session=book.session, source="file", created_ms=int(time.time() * 1000))
        await self._retry(book, lambda: self.streams.announce(announce))
        parts = [pcm[i : i + CHUNK_BYTES] for i in range(0, len(pcm), CHUNK_BYTES)]
        started = time.monotonic()
        for seq, part in enumerate(parts, start=1):
            await self._retry(book, lambda seq=seq, part=part: self.streams.append_audio(
                book.session, AudioChunk(seq=seq, pcm=part)))  # fmt: skip
            book.pushed.append(seq)
            if self.pace:
                ahead = seq * 0.2 / self.pace - (time.monotonic() - started)
                await asyncio.sleep(max(0.0, ahead))
        end = AudioEnd(seq=len(parts) + 1)
        await self._retry(book, lambda: self.streams.append_audio(book.session, end))
        book.pushed.append(end.seq)
        book.ended_at = time.monotonic()

    async def _retry(self, book: Book, call) -> None:
        while True:  # Streams already retries for redis_retry_s; this outlasts even that
            try:
                await call()
                return
            except Exception:
                book.push_errors += 1
                await asyncio.sleep(0.2)

    async def _follow(self, book: Book, deadline: float) -> None:
        after = 0
        while time.monotonic() < deadline:
            try:
                events = await self.streams.read_events(book.session, after, block_ms=300)
            except Exception:
                book.read_errors += 1
                await asyncio.sleep(0.2)
                continue
            for event in events:
                book.received.append(event)
                after = max(after, event.seq)
                if event.type == "done":
                    book.done_at = time.monotonic()
                    return

    # -- the books -----------------------------------------------------------------------------

    async def check(self, references: dict[int, list[Event]] | None) -> dict:
        """The figures every fault test reports."""
        lost = [await self._chunks_lost(book) for book in self.books]
        latencies = [b.done_at - b.ended_at for b in self.books if b.done_at and b.ended_at]
        figures = {
            "sessions": len(self.books),
            "sessions_completed": sum(b.done_at is not None for b in self.books),
            "chunks_acknowledged": sum(len(b.pushed) for b in self.books),
            "chunks_lost": sum(lost),
            "events_received": sum(len(b.received) for b in self.books),
            "events_duplicated_before_dedup": sum(len(b.received) - len(b.events) for b in self.books),
            "events_duplicated_after_dedup": sum(_repeats(b.events) for b in self.books),
            "sessions_with_seq_gaps": sum(not _contiguous(b.events) for b in self.books),
            "error_events": sum(e.type == "error" for b in self.books for e in b.events),
            "pending_left": await self.streams.pending_count(),
            "push_errors_retried": sum(b.push_errors for b in self.books),
            "latency_end_to_done_s": _spread(latencies),
        }
        if references is not None:
            figures["sessions_equal_to_fault_free"] = sum(
                _same(b.events, references[b.clip]) for b in self.books
            )
            figures["finals_equal_to_fault_free"] = sum(
                _finals(b.events) == _finals(references[b.clip]) and b.done_at is not None for b in self.books
            )
        return figures

    async def _chunks_lost(self, book: Book) -> int:
        rows = await self.streams.redis.xrange(contract.audio_key(book.session))
        present = {contract.seq_of(entry_id) for entry_id, _ in rows}
        return len(set(book.pushed) - present)


def references(model_dir: Path) -> dict[int, list[Event]]:
    """The fault-free run: each clip through one session of the same model, at once."""
    from worker.runtime import Runtime
    from worker.session import StreamingOptions

    runtime = Runtime(model_dir, runtime_settings())
    options = StreamingOptions.of(runtime.config, runtime_settings())
    return {i: offline_events(runtime, options, "ref", pcm) for i, pcm in enumerate(CLIPS)}


def _same(events: list[Event], reference: list[Event]) -> bool:
    return [e.model_copy(update={"session": "ref"}) for e in events] == reference


def _finals(events: list[Event]) -> list[str]:
    return [e.text for e in events if e.type == "final"]


def _contiguous(events: list[Event]) -> bool:
    return [e.seq for e in events] == list(range(1, len(events) + 1))


def _repeats(events: list[Event]) -> int:
    """Events a client would show twice: the same content under two seqs."""
    seen = [e.model_dump(exclude={"seq"}) for e in events if e.type in ("final", "done")]
    return len(seen) - len({str(s) for s in seen})


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return {"p50": round(statistics.median(ordered), 3), "p95": round(p95, 3), "max": round(ordered[-1], 3)}


def silence(seconds: float) -> bytes:
    return np.zeros(int(seconds * contract.SAMPLE_RATE), np.int16).tobytes()
