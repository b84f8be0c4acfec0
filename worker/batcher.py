"""Continuous batching: decoder calls of concurrent sessions run as one ONNX Runtime call.

A `Batcher` is a decoding.Target over a Runtime, so sessions decode through it unchanged. Sessions
step in their own threads; at most `lanes` decoder calls run at once. A call that finds a lane free
and nobody waiting runs at once, alone, through `Runtime.extend_embeds`: a lone session never waits.
Calls that arrive while every lane is busy queue; the next lane to free up runs the oldest queued call
together with the queued calls of a similar width (new tokens: within a factor of two, the same
power-of-two bucket) as one [B, T] call (`Runtime.extend_batch`), and wakes their threads. The thread
whose call heads a batch runs it, so no thread ever computes after its own result is ready.

Which calls share a batch depends on timing, never on audio. Every row comes out as it would alone up
to float rounding (a padded key axis changes the summation order, ~1e-5 on the logits), so a greedy
token can differ only at a near-exact tie of its two best logits; tests/worker/test_batcher.py checks
that batched sessions publish exactly the unbatched events. Knows nothing of Redis or audio.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.runtime import KvCache, Runtime

Result = tuple[np.ndarray, np.ndarray, KvCache]  # logits (keep or T, V), hidden (T, H), cache


@dataclass(eq=False)
class Call:
    """One session's pending `extend_embeds`."""

    cache: KvCache
    length: int
    embeds: np.ndarray  # (T, H)
    keep: int
    woken: threading.Event = field(default_factory=threading.Event)
    lead: list[Call] | None = None  # set when this call's thread is handed a lane and a batch to run
    result: Result | None = None
    error: BaseException | None = None

    @property
    def bucket(self) -> int:
        return int(self.embeds.shape[0]).bit_length()  # widths 1 | 2-3 | 4-7 | 8-15 ...

    def args(self) -> tuple[KvCache, int, np.ndarray, int]:
        return self.cache, self.length, self.embeds, self.keep


@dataclass
class BatchStats:
    """Counters for the worker's shutdown line and the benchmarks."""

    calls: int = 0  # decoder calls made
    rows: int = 0  # session calls served by them
    batched: int = 0  # decoder calls with more than one row

    @property
    def mean_batch(self) -> float:
        return self.rows / self.calls if self.calls else 0.0


class Batcher:
    def __init__(self, runtime: Runtime, lanes: int, max_batch: int, window_ms: float = 0.0) -> None:
        self.runtime, self.max_batch, self.window_s = runtime, max_batch, window_ms / 1000
        self.lock = threading.Condition()
        self.queue: list[Call] = []
        self.free = lanes  # lanes not running a decoder call
        self.stepping = 0  # sessions inside a step (who might call soon)
        self.stats = BatchStats()

    # -- a decoding.Target -----------------------------------------------------------------------

    def extend(self, cache: KvCache, length: int, token_ids: Sequence[int], keep: int = 0) -> Result:
        return self.extend_embeds(cache, length, self.runtime.embed_tokens(token_ids), keep)

    def extend_embeds(self, cache: KvCache, length: int, embeds: np.ndarray, keep: int = 0) -> Result:
        call = Call(cache, length, embeds, keep)
        batch = self._enter(call)
        if batch is None:
            call.woken.wait()
            batch = call.lead
        if batch is not None:
            self._run(batch)
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    def truncate(self, cache: KvCache, length: int) -> KvCache:
        return self.runtime.truncate(cache, length)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Wrap a session's step: the gather window waits only for sessions that are stepping."""
        with self.lock:
            self.stepping += 1
        try:
            yield
        finally:
            with self.lock:
                self.stepping -= 1

    # -- lanes -----------------------------------------------------------------------------------

    def _enter(self, call: Call) -> list[Call] | None:
        """The batch to run now if a lane is free and nobody waits, else None: queued, wait to be woken."""
        with self.lock:
            if self.free == 0 or self.queue:  # a queue exists only while every lane is busy
                self.queue.append(call)
                self.lock.notify_all()  # a lane gathering its batch may be waiting for this call
                return None
            self.free -= 1
            self._gather()
            return self._batch_of(call)

    def _gather(self) -> None:
        """With a window set, wait (lock held) until every other stepping session has a call queued."""
        deadline = time.monotonic() + self.window_s
        while len(self.queue) + 1 < min(self.stepping, self.max_batch):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.lock.wait(left)

    def _batch_of(self, head: Call) -> list[Call]:
        """`head` and the oldest queued calls of its width bucket (taken off the queue)."""
        joining = [c for c in self.queue if c.bucket == head.bucket][: self.max_batch - 1]
        self.queue = [c for c in self.queue if c not in joining]
        return [head, *joining]

    def _run(self, batch: list[Call]) -> None:
        """Run a batch (its first call is this thread's), wake the others, pass the lane on."""
        outcome: list[Result] | BaseException
        try:
            outcome = self.runtime.extend_batch([call.args() for call in batch])
        except BaseException as e:  # every call of the batch fails with it; the lane still moves on
            outcome = e
        with self.lock:
            self._count(len(batch))
            for i, call in enumerate(batch):
                if isinstance(outcome, BaseException):
                    call.error = outcome
                else:
                    call.result = outcome[i]
                call.lead = None
                if i:
                    call.woken.set()
            self._hand_over()

    def _hand_over(self) -> None:
        """Lock held: give the freed lane to the oldest queued call's thread, with its batch."""
        if not self.queue:
            self.free += 1
            return
        head = self.queue.pop(0)
        head.lead = self._batch_of(head)
        head.woken.set()

    def _count(self, rows: int) -> None:
        self.stats.calls += 1
        self.stats.rows += rows
        self.stats.batched += rows > 1

    def describe(self) -> dict[str, Any]:
        stats = self.stats
        return {"decoder_calls": stats.calls, "batched_calls": stats.batched,
                "mean_batch": round(stats.mean_batch, 2)}  # fmt: skip
