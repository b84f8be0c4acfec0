"""Cancellation safety: thousands of Redis calls cancelled mid-flight on one shared pool never hand one
session's data to another (the redis-py hazard of CVE-2023-28858/28859: a cancelled command left its
reply on a pooled connection, and the next caller read it)."""

from __future__ import annotations

import asyncio
import random

import pytest

from rawwave.contract import AudioChunk, FinalEvent
from rawwave.streams import Streams
from tests.faults.conftest import SOAK, client_settings, report

pytestmark = pytest.mark.e2e
SESSIONS = 24


def pcm_of(i: int, seq: int) -> bytes:
    return bytes([i, seq]) * 800  # 1600 bytes that say whose chunk this is


async def test_cancelled_reads_never_cross_sessions(fault_redis, clean_env) -> None:
    server = fault_redis(appendonly=False)
    streams = Streams.connect(client_settings(server.url))
    for i in range(SESSIONS):
        for seq in range(1, 9):
            await streams.append_audio(f"c{i}", AudioChunk(seq=seq, pcm=pcm_of(i, seq)))
            await streams.publish(FinalEvent(session=f"c{i}", seq=seq, t_ms=seq, text=f"c{i}/{seq}"))
    rng = random.Random(28858)
    counts = {"calls": 0, "cancelled": 0, "completed": 0, "crossed": 0}

    async def one() -> None:
        i = rng.randrange(SESSIONS)
        audio = rng.random() < 0.5
        call = streams.read_audio(f"c{i}", 0) if audio else streams.read_events(f"c{i}", 0)
        counts["calls"] += 1
        try:
            got = await asyncio.wait_for(call, timeout=rng.choice([0.0001, 0.0005, 0.001, 0.003, 0.05]))
        except TimeoutError:
            counts["cancelled"] += 1
            return
        counts["completed"] += 1
        expected = (
            [AudioChunk(seq=s, pcm=pcm_of(i, s)) for s in range(1, 9)]
            if audio
            else [FinalEvent(session=f"c{i}", seq=s, t_ms=s, text=f"c{i}/{s}") for s in range(1, 9)]
        )
        counts["crossed"] += got != expected

    rounds = 200 if SOAK else 40
    for _ in range(rounds):
        await asyncio.gather(*(one() for _ in range(100)))
    pool = streams.redis.connection_pool
    report("cancellation", {**counts, "pool_connections": len(pool._available_connections)})
    await streams.close()
    assert counts["crossed"] == 0
    assert counts["cancelled"] > 100 and counts["completed"] > 100
