"""Redis faults under load: kill -9 and restart from the AOF, data loss (FLUSHALL, a restart without
persistence), a network cut between one worker and Redis. Workers, a running `rawwave ingest` and
its HTTP clients must ride them out on their own, logging once per state change."""

from __future__ import annotations

import asyncio
import time

import pytest

from rawwave import contract
from rawwave.streams import Streams
from tests.faults.books import Books, references
from tests.faults.conftest import SOAK, client_settings, report
from tests.faults.proxy import CuttableProxy
from tests.faults.stack import assert_nothing_lost, check, owners, start_workers, wait_heartbeat, wait_owned
from tests.faults.uploads import upload

pytestmark = pytest.mark.e2e
DOWN = "redis unreachable"
UP = "redis reachable again"


@pytest.fixture(scope="module")
def fault_free(tiny_model):
    return references(tiny_model)


def log_counts(procs, names: list[str]) -> dict[str, dict[str, int]]:
    return {
        name: {"down": procs.log_lines(name, DOWN), "up": procs.log_lines(name, UP),
               "lines": len(procs.log(name).splitlines())}
        for name in names
    }  # fmt: skip


def equal_uploads(uploads, fault_free) -> int:
    ref = {i: [e.model_copy(update={"session": "ref"}) for e in events] for i, events in fault_free.items()}
    return sum([e.model_copy(update={"session": "ref"}) for e in u.events] == ref[u.clip] for u in uploads)


@pytest.mark.parametrize("fsync", ["everysec", "always"])
async def test_redis_kill_9_and_restart_from_its_aof(fault_redis, procs, fault_free, fsync) -> None:
    server = fault_redis(appendonly=True, appendfsync=fsync)
    streams = Streams.connect(client_settings(server.url))
    await streams.ensure_groups()
    await start_workers(procs, streams, server.url, ["r0", "r1"])
    _, url = procs.ingest("ingest", server.url)
    books = Books(streams, 20, f"aof-{fsync}", pace=1.0)
    run = asyncio.create_task(books.run(timeout_s=60, stagger_s=0.1))

    async def uploads_across_the_outage():
        await asyncio.sleep(1.0)
        return await asyncio.gather(*(upload(url, i % 4) for i in range(4)), *(
            _later(0.5 + 0.5 * i, upload(url, i % 4)) for i in range(4)))  # fmt: skip

    http = asyncio.create_task(uploads_across_the_outage())
    await asyncio.sleep(1.5)
    server.kill9()
    await asyncio.sleep(2.0)
    restarted_ms = int(time.time() * 1000)
    load_s = server.start()
    back = await asyncio.gather(*(wait_heartbeat(streams, n, 30, restarted_ms) for n in ("r0", "r1")))
    await run
    uploads = await http
    figures = await check(books, fault_free)
    figures = report(f"redis_kill9_aof_{fsync}", {
        "appendfsync": fsync, "redis_down_s": 2.0, "redis_load_s": round(load_s, 3),
        "workers_recovered_s": round(max(back), 2),
        "http_uploads": len(uploads), "http_accepted": sum(u.status == 201 for u in uploads),
        "http_completed": sum(u.done_at is not None for u in uploads),
        "http_equal_to_fault_free": equal_uploads(uploads, fault_free),
        "sse_reconnects": sum(u.sse_reconnects for u in uploads),
        "log_lines": log_counts(procs, ["r0", "r1", "ingest"]), **figures,
    })  # fmt: skip
    for name, counts in figures["log_lines"].items():
        assert counts["down"] <= 2 and counts["up"] <= 2, (name, counts)  # once per state change
    assert figures["http_completed"] == len(uploads)
    if fsync == "always":
        assert_nothing_lost(figures)
        assert figures["http_equal_to_fault_free"] == len(uploads)


async def _later(delay: float, coro):
    await asyncio.sleep(delay)
    return await coro


@pytest.mark.parametrize("how", ["flushall", "restart_without_persistence"])
async def test_redis_loses_its_data(fault_redis, procs, fault_free, how) -> None:
    server = fault_redis(appendonly=False)
    streams = Streams.connect(client_settings(server.url))
    await streams.ensure_groups()
    await start_workers(procs, streams, server.url, ["g0", "g1"])
    books = Books(streams, 10, f"gone-{how}", pace=1.0)
    run = asyncio.create_task(books.run(timeout_s=40, stagger_s=0.05))
    while len(await owners(streams)) < 10:  # every session owned: the loss hits live sessions only
        await asyncio.sleep(0.05)
    if how == "flushall":
        server.client().flushall()
    else:
        server.kill9()
        server.start()
    await run
    lost = [b for b in books.books if any(e.type == "error" and e.code == "lost" for e in b.events)]
    hung = [b.session for b in books.books if b.done_at is None]
    after = Books(streams, 6, f"after-{how}", pace=0)
    await after.run(timeout_s=30)
    groups = await streams.redis.xinfo_groups(contract.announce_key(0))
    figures = report(f"redis_data_loss_{how}", {
        "live_sessions": len(books.books), "ended_with_lost_error": len(lost),
        "completed_normally": sum(b.done_at is not None for b in books.books) - len(lost),
        "hung": len(hung), "group_recreated": bool(groups),
        "log_lines": log_counts(procs, ["g0", "g1"]), "sessions_after": await check(after, fault_free),
    })  # fmt: skip
    assert not hung, hung
    assert figures["group_recreated"]
    assert_nothing_lost(figures["sessions_after"])


@pytest.mark.parametrize("cut_s", [10, pytest.param(30, marks=pytest.mark.skipif(not SOAK, reason="soak"))])
async def test_network_cut_between_a_worker_and_redis(fault_redis, procs, fault_free, cut_s) -> None:
    server = fault_redis(appendonly=False)
    streams = Streams.connect(client_settings(server.url))
    await streams.ensure_groups()
    proxy = CuttableProxy(server.port)
    await proxy.start()
    procs.worker("cut", f"redis://127.0.0.1:{proxy.port}/0")
    procs.worker("direct", server.url)
    await asyncio.gather(wait_heartbeat(streams, "cut"), wait_heartbeat(streams, "direct"))
    books = Books(streams, 16, f"cut{cut_s}", pace=1.0)
    run = asyncio.create_task(books.run(timeout_s=60 + cut_s, stagger_s=0.1))
    held = await wait_owned(streams, "cut", 3)
    proxy.cut_now()
    await asyncio.sleep(cut_s)
    proxy.restore()
    restored_ms = int(time.time() * 1000)
    back_s = await wait_heartbeat(streams, "cut", 30, restored_ms)
    await run
    figures = await check(books, fault_free)
    await proxy.close()
    figures = report(f"network_cut_{cut_s}s", {
        "cut_s": cut_s, "sessions_held_by_cut_worker": held, "cut_worker_back_s": round(back_s, 2),
        "log_lines": log_counts(procs, ["cut", "direct"]), **figures,
    })  # fmt: skip
    assert_nothing_lost(figures)
    assert figures["log_lines"]["cut"]["down"] == 1 and figures["log_lines"]["cut"]["up"] == 1
