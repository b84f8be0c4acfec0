"""Worker faults with real `rawwave worker` processes: kill -9 under load, SIGSTOP past the reclaim
time, poison sessions, SIGTERM drain. Each test prints its figures (see tests/faults/conftest.py)."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import pytest

from rawwave import contract
from rawwave.contract import FinalEvent
from rawwave.streams import Streams
from tests.faults.books import Books, references
from tests.faults.conftest import SOAK, client_settings, report
from tests.faults.stack import assert_nothing_lost, check, pending, start_workers, wait_owned

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fault_free(tiny_model):
    return references(tiny_model)


@pytest.fixture
async def stack(fault_redis, procs):
    server = fault_redis(appendonly=False)
    streams = Streams.connect(client_settings(server.url))
    await streams.ensure_groups()
    yield server, streams
    await streams.close()


async def test_kill_9_a_random_worker_every_few_seconds(stack, procs, fault_free) -> None:
    server, streams = stack
    env = {"RAWWAVE_MAX_DELIVERIES": "10"}  # a session may be on the killed worker several times
    names = ["w0", "w1", "w2"]
    await start_workers(procs, streams, server.url, names, **env)
    books = Books(streams, 120 if SOAK else 30, "kill", pace=1.0)
    kills, rng = 0, random.Random(9)

    async def killer() -> None:
        nonlocal kills
        while True:
            await asyncio.sleep(3.0)
            victim = rng.choice(names)
            procs.kill9(victim)
            kills += 1
            names[names.index(victim)] = replacement = f"w{kills + 2}"
            procs.worker(replacement, server.url, **env)

    task = asyncio.create_task(killer())
    await books.run(timeout_s=180 if SOAK else 90, stagger_s=0.25)  # >= 7 s of arrivals: >= 2 kills
    task.cancel()
    replays = sum(procs.log_lines(name, "replaying reclaimed session") for name in procs.children)
    figures = await check(books, fault_free)
    figures = report("kill9_workers", {"workers": 3, "kills": kills, "sessions_replayed": replays, **figures})
    assert kills >= 2
    assert_nothing_lost(figures)


async def test_sigstop_past_reclaim_then_sigcont_publishes_nothing_stale(stack, procs, fault_free) -> None:
    server, streams = stack
    await start_workers(procs, streams, server.url, ["a", "b"])
    books = Books(streams, 10, "stop", pace=1.0)
    run = asyncio.create_task(books.run(timeout_s=60, stagger_s=0.05))
    held = await wait_owned(streams, "a", 3)
    procs.signal("a", signal.SIGSTOP)
    await asyncio.sleep(4.0)  # well past RAWWAVE_RECLAIM_IDLE_MS=1500: b takes a's sessions over
    procs.signal("a", signal.SIGCONT)
    await run
    deadline = time.monotonic() + 10  # b may have finished everything while a slept: give a time to wake
    while (noticed := procs.log_lines("a", "taken over")) < held and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # anything a would still publish would be in Redis by now
    figures = await check(books, fault_free)
    stored = [await streams.read_events(book.session) for book in books.books]
    late = sum(len(events) - len(book.events) for events, book in zip(stored, books.books, strict=True))
    # Redis itself refuses a stale write to an event seq that exists, whatever its content
    first = books.books[0]
    refused = not await streams.publish(FinalEvent(session=first.session, seq=1, t_ms=0, text="stale"))
    unchanged = stored[0] == first.events == await streams.read_events(first.session)
    figures = report(
        "sigstop_worker",
        {"sessions_held_by_stopped_worker": held, "stale_publish_refused_by_redis": refused,
         "stopped_worker_noticed_lost_claims": noticed, "events_in_redis_after_sigcont_beyond_books": late,
         **figures},
    )  # fmt: skip
    assert_nothing_lost(figures)
    assert refused and unchanged and late == 0
    assert noticed >= held, procs.log("a")[-3000:]


async def test_poison_sessions_end_clearly_and_others_complete(stack, procs, fault_free) -> None:
    server, streams = stack
    names = ["p0", "p1"]
    await start_workers(procs, streams, server.url, names)
    baseline = Books(streams, 12, "base", pace=1.0)
    await baseline.run(timeout_s=60, stagger_s=0.1)
    base = await check(baseline, fault_free)

    # 1. a malformed audio entry (odd byte count): a deterministic failure, ended at the first delivery
    await streams.announce(contract.SessionAnnounce(session="bad-audio", source="file", created_ms=1))
    await streams.redis.xadd(contract.audio_key("bad-audio"), {b"v": b"1", b"kind": b"chunk", b"seq": b"1",
                                                              b"pcm": b"\x01\x02\x03"}, id="0-1")  # fmt: skip
    # 2. a malformed announce entry: dead-lettered at once
    await streams.redis.xadd(contract.announce_key(0), {b"v": b"1", b"json": b"{not json"})
    # 3. a crash loop: every worker that claims it dies (as if the input crashed ONNX Runtime)
    crash = Books(streams, 1, "crash", pace=0.1)  # live for ~20 s: every claimant is caught owning it
    loaded = Books(streams, 12, "load", pace=1.0)
    kills = 0

    async def crash_whoever_claims_it() -> None:
        nonlocal kills
        while True:
            entry = await _entry_of(streams, "crash-0")
            owner, deliveries = (await pending(streams)).get(entry, ("", 0)) if entry else ("", 0)
            if owner in names and deliveries <= 3:  # the 4th claimant dead-letters it (MAX_DELIVERIES=3)
                procs.kill9(owner)
                kills += 1
                names[names.index(owner)] = f"p{kills + 1}"
                procs.worker(f"p{kills + 1}", server.url)
            await asyncio.sleep(0.05)

    killer = asyncio.create_task(crash_whoever_claims_it())
    await asyncio.gather(crash.run(timeout_s=90), loaded.run(timeout_s=90, stagger_s=0.1))
    killer.cancel()
    events = await streams.read_events("bad-audio")
    letters = await streams.read_dead_letters()
    under_poison = await check(loaded, fault_free)
    crash_events = crash.books[0].events
    figures = report(
        "poison",
        {
            "bad_audio_events": [e.type + ":" + getattr(e, "code", "") for e in events],
            "dead_letters": [d.model_dump(include={"session", "deliveries", "reason"}) for d in letters],
            "crash_loop_kills": kills,
            "collateral_dead_lettered": sum(d.session.startswith("load-") for d in letters),
            "crash_loop_events": [e.type + ":" + getattr(e, "code", "") for e in crash_events],
            "baseline_latency_s": base["latency_end_to_done_s"],
            "others_under_poison": under_poison,
        },
    )  # fmt: skip
    assert [e.type for e in events] == ["error", "done"] and events[0].code == "bad_audio"
    assert any(d.reason.startswith("malformed announce") for d in letters)
    assert any(d.session == "crash-0" and d.deliveries == 4 for d in letters), letters
    assert [e.type for e in crash_events][-2:] == ["error", "done"] and crash_events[-2].code == "dead_letter"
    # a crash loop also kills whatever shares the worker with it: such a session may reach
    # MAX_DELIVERIES too and be dead-lettered (with a clear error), never left hanging or changed
    collateral = sum(d.session.startswith("load-") for d in letters)
    assert under_poison["sessions_completed"] == 12
    assert under_poison["sessions_equal_to_fault_free"] == 12 - collateral
    assert under_poison["error_events"] == collateral
    assert figures["others_under_poison"]["pending_left"] == 0


async def _entry_of(streams: Streams, session: str) -> bytes | None:
    for entry_id, fields in await streams.redis.xrange(contract.announce_key(0)):
        if b'"' + session.encode() + b'"' in fields.get(b"json", b""):
            return entry_id
    return None


async def test_sigterm_drains_a_worker_under_load(stack, procs, fault_free) -> None:
    server, streams = stack
    await start_workers(procs, streams, server.url, ["d0", "d1"], RAWWAVE_DRAIN_TIMEOUT_S="20")
    books = Books(streams, 20, "drain", pace=1.0)
    run = asyncio.create_task(books.run(timeout_s=60, stagger_s=0.1))
    held = await wait_owned(streams, "d0", 3)
    started = time.monotonic()
    procs.signal("d0", signal.SIGTERM)
    code = await asyncio.to_thread(procs.children["d0"].wait, 30)
    drain_s = time.monotonic() - started
    await run
    figures = report(
        "sigterm_worker",
        {"sessions_held_at_sigterm": held, "exit_code": code, "drain_s": round(drain_s, 2),
         **await check(books, fault_free)},
    )  # fmt: skip
    assert code == 0 and "worker stopped" in procs.log("d0")
    assert_nothing_lost(figures)
