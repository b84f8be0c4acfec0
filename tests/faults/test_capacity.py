"""Twice the capacity: one worker serving 4 sessions, ingest admitting 4 (max_queued_sessions), then
8 concurrent uploads. The extra ones get 503 + Retry-After at once; the accepted ones complete as fast
as a run at capacity does; worker and ingest memory stays bounded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from ingest.admission import CACHE_S
from rawwave.streams import Streams
from tests.faults.books import references
from tests.faults.conftest import client_settings, report
from tests.faults.stack import settle, start_workers
from tests.faults.test_redis import equal_uploads
from tests.faults.uploads import Upload, upload

pytestmark = pytest.mark.e2e

CAPACITY = 4


@pytest.fixture(scope="module")
def fault_free(tiny_model):
    return references(tiny_model)


async def test_twice_the_capacity_is_refused_early_and_accepted_sessions_keep_their_latency(
    fault_redis, procs, fault_free
) -> None:
    server = fault_redis(appendonly=False)
    streams = Streams.connect(client_settings(server.url))
    await streams.ensure_groups()
    limit = {"RAWWAVE_MAX_SESSIONS_PER_WORKER": str(CAPACITY), "RAWWAVE_MAX_QUEUED_SESSIONS": str(CAPACITY)}
    await start_workers(procs, streams, server.url, ["c0"], **limit)
    ingest, url = procs.ingest("ingest", server.url, **limit)

    at_capacity = await _burst(url, CAPACITY)
    await settle(streams)
    await asyncio.sleep(CACHE_S)
    overload = await _burst(url, 2 * CAPACITY)
    await settle(streams)
    accepted = [u for u, _ in overload if u.status == 201]
    refused = [(u, s) for u, s in overload if u.status == 503]
    figures = report("capacity", {
        "capacity": CAPACITY, "uploads_at_capacity": CAPACITY, "uploads_overload": 2 * CAPACITY,
        "at_capacity_accepted": sum(u.status == 201 for u, _ in at_capacity),
        "at_capacity_done_p95_s": _p95([s for _, s in at_capacity]),
        "overload_accepted": len(accepted),
        "overload_refused_503_with_retry_after": sum(u.retry_after is not None for u, _ in refused),
        "overload_other_status": sorted({u.status for u, _ in overload} - {201, 503}),
        "overload_refused_p95_s": _p95([s for _, s in refused]),
        "overload_done_p95_s": _p95([s for u, s in overload if u.status == 201]),
        "overload_accepted_completed": sum(u.done_at is not None for u in accepted),
        "overload_accepted_equal_to_fault_free": equal_uploads(accepted, fault_free),
        "worker_peak_rss_mb": _peak_rss_mb(procs.children["c0"].pid),
        "ingest_peak_rss_mb": _peak_rss_mb(ingest.pid),
        "pending_left": await streams.pending_count(), "backlog_left": await streams.backlog(),
    })  # fmt: skip
    await streams.close()
    assert figures["at_capacity_accepted"] == CAPACITY
    assert figures["overload_accepted"] == figures["overload_accepted_completed"] == CAPACITY
    assert figures["overload_refused_503_with_retry_after"] == CAPACITY
    assert not figures["overload_other_status"]
    assert figures["overload_refused_p95_s"] < 1.0
    assert figures["overload_done_p95_s"] < 2 * figures["at_capacity_done_p95_s"] + 1.0  # shared CPUs
    assert figures["overload_accepted_equal_to_fault_free"] == CAPACITY
    assert figures["worker_peak_rss_mb"] < 1024 and figures["ingest_peak_rss_mb"] < 512
    assert figures["pending_left"] == figures["backlog_left"] == 0


async def _burst(url: str, n: int) -> list[tuple[Upload, float]]:
    """n concurrent uploads; each with its seconds to `done` (accepted) or to the answer (refused)."""

    async def timed(i: int) -> tuple[Upload, float]:
        started = time.monotonic()
        result = await upload(url, i % 4, follow_s=30)
        return result, (result.done_at or time.monotonic()) - started

    return await asyncio.gather(*(timed(i) for i in range(n)))


def _p95(seconds: list[float]) -> float:
    return round(float(np.percentile(seconds, 95)), 2) if seconds else 0.0


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0
