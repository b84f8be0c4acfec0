"""Starting and watching a stack for a fault test: workers on a private Redis, heartbeats, the books."""

from __future__ import annotations

import asyncio
import time

import redis

from rawwave import contract
from rawwave.streams import Streams
from tests.faults.books import Books
from tests.faults.conftest import Processes


async def wait_heartbeat(streams: Streams, name: str, timeout_s: float = 60, after_ms: int = 0) -> float:
    """Seconds until worker `name` sends a heartbeat (newer than after_ms)."""
    started = time.monotonic()
    while True:
        try:
            beat = await streams.retrying(lambda: streams.heartbeat_of(name))
        except redis.exceptions.RedisError:
            beat = None  # Redis still loading its AOF
        if beat is not None and beat.at_ms > after_ms:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"worker {name} never sent a heartbeat"
        await asyncio.sleep(0.1)


async def start_workers(procs: Processes, streams: Streams, url: str, names: list[str], **env: str) -> None:
    for name in names:
        procs.worker(name, url, **env)
    for name in names:
        await wait_heartbeat(streams, name)


async def owners(streams: Streams) -> dict[bytes, str]:
    """Pending announce entry -> the consumer that owns it."""
    return {entry: owner for entry, (owner, _) in (await pending(streams)).items()}


async def wait_owned(streams: Streams, name: str, at_least: int, timeout_s: float = 20) -> int:
    """Wait until worker `name` owns `at_least` sessions; returns how many it owns."""
    deadline = time.monotonic() + timeout_s
    while (held := sum(o == name for o in (await owners(streams)).values())) < at_least:
        assert time.monotonic() < deadline, f"{name} owns only {held} sessions"
        await asyncio.sleep(0.05)
    return held


async def pending(streams: Streams) -> dict[bytes, tuple[str, int]]:
    """Pending announce entry -> (owner, times delivered)."""
    key = contract.announce_key(0)
    rows = await streams.redis.xpending_range(key, contract.WORKERS_GROUP, "-", "+", 1000)
    return {row["message_id"]: (row["consumer"].decode(), row["times_delivered"]) for row in rows}


async def settle(streams: Streams, timeout_s: float = 10) -> int:
    """Wait for the last acks after the last `done` (a worker publishes done, then acks)."""
    deadline = time.monotonic() + timeout_s
    while (pending := await streams.pending_count()) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return pending


async def check(books: Books, references: dict) -> dict:
    await settle(books.streams)
    return await books.check(references)


def assert_nothing_lost(figures: dict) -> None:
    n = figures["sessions"]
    assert figures["sessions_completed"] == n, figures
    assert figures["chunks_lost"] == 0, figures
    assert figures["events_duplicated_before_dedup"] == 0, figures
    assert figures["events_duplicated_after_dedup"] == 0, figures
    assert figures["sessions_with_seq_gaps"] == 0, figures
    assert figures["sessions_equal_to_fault_free"] == n, figures
    assert figures["pending_left"] == 0, figures
