"""Ingest under faults: SIGTERM of a running `rawwave ingest` while uploads arrive."""

from __future__ import annotations

import asyncio
import signal

import pytest

from rawwave import contract
from rawwave.contract import AudioEnd
from rawwave.streams import Streams
from tests.faults.books import references
from tests.faults.conftest import client_settings, report
from tests.faults.stack import settle, start_workers
from tests.faults.test_redis import equal_uploads
from tests.faults.uploads import Upload, upload

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fault_free(tiny_model):
    return references(tiny_model)


async def test_sigterm_drains_ingest_under_load(fault_redis, procs, fault_free) -> None:
    server = fault_redis(appendonly=False)
    streams = Streams.connect(client_settings(server.url))
    await streams.ensure_groups()
    await start_workers(procs, streams, server.url, ["i0", "i1"])
    ingest, url = procs.ingest("ingest", server.url)

    async def staggered(i: int) -> Upload:
        await asyncio.sleep(0.03 * i)
        return await upload(url, i % 4, follow_s=0)  # ingest goes away: follow through Redis instead

    posts = asyncio.gather(*(staggered(i) for i in range(24)))
    await asyncio.sleep(0.35)
    ingest.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(ingest.wait, 30)
    uploads = await posts
    accepted = [u for u in uploads if u.status == 201]
    for u in accepted:
        u.events = await _events(streams, u.session)
    ends = [await _end_reason(streams, u.session) for u in accepted]
    await settle(streams)
    figures = report("sigterm_ingest", {
        "uploads": len(uploads), "accepted": len(accepted),
        "refused_503_with_retry_after": sum(u.status == 503 and u.retry_after is not None for u in uploads),
        "refused_connection": sum(u.status == -1 for u in uploads),
        "other_status": sorted({u.status for u in uploads} - {201, 503, -1}),
        "accepted_completed": sum(bool(u.events) and u.events[-1].type == "done" for u in accepted),
        "accepted_equal_to_fault_free": equal_uploads(accepted, fault_free),
        "accepted_audio_cut_short": sum(reason != "end" for reason in ends),
        "ingest_exit_code": code, "pending_left": await streams.pending_count(),
    })  # fmt: skip
    assert code == 0 and not figures["other_status"]
    assert figures["accepted_completed"] == len(accepted) > 0
    assert figures["accepted_audio_cut_short"] == 0
    assert figures["accepted_equal_to_fault_free"] == len(accepted)
    assert figures["pending_left"] == 0


async def _events(streams: Streams, session: str, timeout_s: float = 30) -> list[contract.Event]:
    events: list[contract.Event] = []
    async with asyncio.timeout(timeout_s):
        while not events or events[-1].type != "done":
            events += await streams.read_events(session, events[-1].seq if events else 0, block_ms=300)
    return events


async def _end_reason(streams: Streams, session: str) -> str:
    rows = await streams.redis.xrevrange(contract.audio_key(session), count=1)
    entry = contract.decode_audio(rows[0][1]) if rows else None
    return entry.reason if isinstance(entry, AudioEnd) else "missing"
