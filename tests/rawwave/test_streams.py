"""The stream contract against a real redis-server."""

import asyncio

import pytest
import redis.asyncio as aioredis

from rawwave import contract
from rawwave.contract import AudioChunk, AudioEnd, FinalEvent, SessionAnnounce
from rawwave.settings import Settings
from rawwave.streams import Streams


def announce(session: str) -> SessionAnnounce:
    return SessionAnnounce(session=session, source="file", created_ms=1)


async def test_audio_and_events_round_trip_and_reject_duplicates(streams: Streams) -> None:
    assert await streams.append_audio("s1", AudioChunk(seq=1, pcm=b"\x01\x00" * 10))
    assert not await streams.append_audio("s1", AudioChunk(seq=1, pcm=b"\x02\x00"))  # retried push
    assert await streams.append_audio("s1", AudioEnd(seq=2))
    entries = await streams.read_audio("s1", after_seq=0)
    assert entries == [AudioChunk(seq=1, pcm=b"\x01\x00" * 10), AudioEnd(seq=2)]
    assert await streams.read_audio("s1", after_seq=1) == [AudioEnd(seq=2)]

    event = FinalEvent(session="s1", seq=1, t_ms=400, text="hello")
    assert await streams.publish(event)
    assert not await streams.publish(event.model_copy(update={"text": "stale"}))
    assert await streams.read_events("s1") == [event]
    assert await streams.last_event_seq("s1") == 1


async def test_each_session_is_owned_once_by_two_consumers(streams: Streams, settings: Settings) -> None:
    other = Streams.connect(settings)
    for i in range(10):
        await streams.announce(announce(f"s{i}"))
    owned: list[str] = []
    for _ in range(10):
        for client, name in ((streams, "w1"), (other, "w2")):
            owned += [c.session for c in await client.claim_new(name, count=1, block_ms=10)]
    await other.close()
    assert sorted(owned) == sorted(f"s{i}" for i in range(10))
    assert await streams.pending_count() == 10


async def test_session_of_a_vanished_owner_is_reclaimed(settings: Settings) -> None:
    fast = Streams.connect(settings.model_copy(update={"reclaim_idle_ms": 200}))
    await fast.ensure_groups()
    await fast.announce(announce("orphan"))
    [claim] = await fast.claim_new("dead-worker", block_ms=10)
    assert await fast.reclaim_idle("w2") == []  # not idle long enough yet
    await asyncio.sleep(0.3)
    [taken] = await fast.reclaim_idle("w2")
    assert (taken.session, taken.deliveries) == ("orphan", 2)
    assert await fast.keep_claims("dead-worker", [claim]) == {
        claim.entry_id
    }  # the old owner learns it lost it
    assert await fast.keep_claims("w2", [taken]) == set()
    await fast.finish(taken)
    assert await fast.pending_count() == 0
    await fast.close()


async def test_handed_back_sessions_are_not_counted_as_deliveries(settings: Settings) -> None:
    fast = Streams.connect(settings.model_copy(update={"reclaim_idle_ms": 200}))
    await fast.ensure_groups()
    await fast.announce(announce("rolling"))
    owner = "w1"
    [claim] = await fast.claim_new(owner, block_ms=10)
    for worker in ("w2", "w3", "w4", "w5", "w6"):  # more rolling restarts than max_deliveries
        await fast.release(owner, claim)
        [claim], owner = await fast.reclaim_idle(worker), worker  # at once: it looks idle already
        assert (claim.session, claim.deliveries) == ("rolling", 1)
    await asyncio.sleep(0.3)  # its owner dies: that one counts
    [taken] = await fast.reclaim_idle("w7")
    assert taken.deliveries == 2
    await fast.close()


async def test_live_owner_keeps_its_claim(settings: Settings) -> None:
    fast = Streams.connect(settings.model_copy(update={"reclaim_idle_ms": 300}))
    await fast.ensure_groups()
    await fast.announce(announce("busy"))
    claims = await fast.claim_new("w1", block_ms=10)
    for _ in range(4):
        await asyncio.sleep(0.15)
        assert await fast.keep_claims("w1", claims) == set()
        assert await fast.reclaim_idle("w2") == []
    await fast.close()


async def test_finished_session_keys_expire(streams: Streams, settings: Settings) -> None:
    await streams.announce(announce("short"))
    await streams.append_audio("short", AudioEnd(seq=1))
    await streams.publish(FinalEvent(session="short", seq=1, t_ms=0, text=""))
    [claim] = await streams.claim_new("w1", block_ms=10)
    await streams.finish(claim)
    await streams.expire_session("short", ttl_s=1)
    assert await streams.audio_exists("short")
    await asyncio.sleep(1.3)
    assert not await streams.audio_exists("short")
    assert await streams.read_events("short") == []


async def test_group_is_recreated_after_redis_lost_it(streams: Streams) -> None:
    await streams.redis.flushall()
    await streams.announce(announce("after-flush"))  # the stream exists again, the group does not
    claims = await streams.claim_new("w1", block_ms=10)
    # the group is created at the stream's start, so the new session is delivered
    assert [c.session for c in claims] == ["after-flush"]
    await streams.ensure_groups()  # BUSYGROUP is success


async def test_malformed_announce_is_claimed_with_its_error(streams: Streams) -> None:
    await streams.redis.xadd(contract.announce_key(0), {b"v": b"1", b"json": b"{broken"})
    [claim] = await streams.claim_new("w1", block_ms=10)
    assert claim.announce is None and "malformed" in claim.error
    await streams.dead_letter(claim, claim.error, worker="w1")
    [letter] = await streams.read_dead_letters()
    assert letter.session == claim.entry_id.decode() and "malformed" in letter.reason
    assert await streams.pending_count() == 0


async def test_trimming_never_drops_a_pending_entry(streams: Streams) -> None:
    for i in range(5):
        await streams.announce(announce(f"t{i}"))
    first = await streams.claim_new("w1", count=1, block_ms=10)  # t0 stays pending
    rest = await streams.claim_new("w1", count=4, block_ms=10)
    for claim in rest:
        await streams.finish(claim)
    await asyncio.sleep(0.01)
    await streams.trim_announcements(max_age_ms=0)
    remaining = await streams.redis.xrange(contract.announce_key(0))
    assert remaining[0][0] == first[0].entry_id  # everything older than the pending entry is gone...
    assert len(remaining) == 5  # ...and nothing newer than it


async def test_partitioned_announce_streams_are_read_round_robin(settings: Settings) -> None:
    split = Streams.connect(settings.model_copy(update={"announce_partitions": 3}))
    await split.ensure_groups()
    # four sessions in each partition: 12 random ids left one partition empty in ~2% of runs
    by_partition: dict[int, list[str]] = {p: [] for p in range(3)}
    while min(len(group) for group in by_partition.values()) < 4:
        session = contract.new_session_id()
        by_partition[contract.partition_of(session, 3)].append(session)
    sessions = [s for group in by_partition.values() for s in group[:4]]
    for session in sessions:
        await split.announce(announce(session))
    assert [await split.redis.xlen(contract.announce_key(p)) for p in range(3)] == [4, 4, 4]
    owned = []
    for _ in range(12):
        owned += [c.session for c in await split.claim_new("w1", count=4, block_ms=10)]
    assert sorted(owned) == sorted(sessions)
    await split.close()


async def test_connection_errors_surface_as_redis_errors(settings: Settings) -> None:
    dead = Streams.connect(settings, url="redis://127.0.0.1:1/0")
    with pytest.raises(aioredis.ConnectionError):
        await dead.ping()
    await dead.close()


def test_backoff_is_jittered_doubling_and_capped() -> None:
    from rawwave.streams import BACKOFF_FIRST_S, BACKOFF_MAX_S, Backoff

    backoff = Backoff()
    delays = [backoff.next_s() for _ in range(12)]
    assert BACKOFF_FIRST_S / 2 <= delays[0] <= BACKOFF_FIRST_S
    assert all(d <= BACKOFF_MAX_S for d in delays) and max(delays) >= BACKOFF_MAX_S / 2
    backoff.reset()
    assert backoff.next_s() <= BACKOFF_FIRST_S


def test_redis_link_logs_once_per_state_change() -> None:
    from structlog.testing import capture_logs

    from rawwave.streams import RedisLink

    link = RedisLink()
    with capture_logs() as logs:
        for _ in range(50):
            link.failed(ConnectionError("refused"))
        link.ok()
        link.ok()
        link.failed(ConnectionError("a stale pooled connection, right after recovering"))
        link.ok()
    assert [entry["event"] for entry in logs] == [
        "redis unreachable: retrying with backoff",
        "redis reachable again",
    ]
    assert link.outages == 2  # the flap still counts: callers re-check what Redis may have lost


async def test_backlog_counts_unread_and_unfinished_sessions(streams: Streams) -> None:
    assert await streams.backlog() == 0
    for i in range(3):
        await streams.announce(announce(f"b{i}"))
    assert await streams.backlog() == 3  # unread (lag)
    [claim] = await streams.claim_new("c1", count=1, block_ms=10)
    assert await streams.backlog() == 3  # 1 pending + 2 unread
    await streams.finish(claim)
    assert await streams.backlog() == 2
    rows = await streams.redis.xrange(contract.announce_key(0))
    await streams.redis.xdel(contract.announce_key(0), rows[-1][0])  # Redis may no longer know the lag
    assert await streams.backlog() == 1
