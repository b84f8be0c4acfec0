"""The stream contract against a real 3-master Redis Cluster (redis-server --cluster-enabled, loopback)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from rawwave import contract
from rawwave.contract import AudioChunk, AudioEnd, FinalEvent, SessionAnnounce
from rawwave.settings import Settings, load_settings
from rawwave.streams import Streams
from tests.conftest import free_port

MASTERS = 3
PARTITIONS = 4


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Three masters on free loopback ports, slots split by `redis-cli --cluster create`."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server/redis-cli not found: apt-get install redis-server")
    root = tmp_path_factory.mktemp("cluster")
    ports = [_cluster_port() for _ in range(MASTERS)]
    nodes = [_start_node(root / str(port), port) for port in ports]
    try:
        _create_cluster(ports)
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            node.wait(timeout=5)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) exists too: a node above 55535 dies at start."""
    while (port := free_port()) > 65535 - 10000:
        pass
    return port


def _start_node(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    data_dir.mkdir()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir)]
    command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--save", ""]
    command += ["--appendonly", "no", "--cluster-node-timeout", "5000"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    for _ in range(200):
        try:
            client.ping()
            return process
        except redis.ConnectionError:
            time.sleep(0.025)
    process.kill()
    pytest.fail(f"cluster node did not start on port {port}")


def _create_cluster(ports: list[int]) -> None:
    command = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
    command += ["--cluster-replicas", "0", "--cluster-yes"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        infos = [redis.Redis(port=p).cluster("info") for p in ports]
        if all(info["cluster_state"] == "ok" for info in infos):
            return
        time.sleep(0.1)
    pytest.fail("the cluster did not reach cluster_state:ok")


@pytest.fixture
def cluster_settings(cluster_url: str, tmp_path: Path) -> Settings:
    RedisCluster.from_url(cluster_url).flushall()
    return load_settings(
        redis_url=cluster_url,
        redis_cluster=True,
        announce_partitions=PARTITIONS,
        reclaim_idle_ms=1000,
        state_dir=tmp_path / "state",
    )


@pytest.fixture
async def cluster(cluster_settings: Settings) -> AsyncIterator[Streams]:
    client = Streams.connect(cluster_settings)
    await client.ensure_groups()
    yield client
    await client.close()


def announce(session: str) -> SessionAnnounce:
    return SessionAnnounce(session=session, source="file", created_ms=1)


def test_announce_partitions_and_sessions_spread_over_the_masters(cluster_url: str) -> None:
    client = RedisCluster.from_url(cluster_url)
    partition_slots = {client.keyslot(contract.announce_key(p)) for p in range(PARTITIONS)}
    owners = {client.nodes_manager.get_node_from_slot(slot).port for slot in partition_slots}
    assert len(partition_slots) == PARTITIONS and len(owners) > 1
    session = contract.new_session_id()
    assert len({client.keyslot(key) for key in contract.session_keys(session)}) == 1  # one slot
    client.close()


async def test_announce_and_claim_round_robin_over_partitions(cluster: Streams) -> None:
    sessions = [contract.new_session_id() for _ in range(12)]
    for session in sessions:
        await cluster.announce(announce(session))
    claims = []
    for _ in range(2 * PARTITIONS):
        claims += await cluster.claim_new("w1", count=4, block_ms=40)
    assert sorted(c.session for c in claims) == sorted(sessions)
    assert {c.partition for c in claims} == {contract.partition_of(s, PARTITIONS) for s in sessions}
    assert await cluster.pending_count() == 12
    assert await cluster.keep_claims("w1", claims) == set()
    assert all([await cluster.still_owner("w1", c) for c in claims])
    for claim in claims:
        await cluster.finish(claim)
    assert await cluster.pending_count() == 0
    await cluster.trim_announcements(max_age_ms=0)


async def test_audio_events_and_image_of_a_session(cluster: Streams) -> None:
    session = contract.new_session_id()
    assert await cluster.append_audio(session, AudioChunk(seq=1, pcm=b"\x01\x00" * 160))
    assert not await cluster.append_audio(session, AudioChunk(seq=1, pcm=b"\x02\x00"))  # duplicate
    assert await cluster.append_audio(session, AudioEnd(seq=2))
    assert await cluster.read_audio(session, after_seq=0) == [
        AudioChunk(seq=1, pcm=b"\x01\x00" * 160),
        AudioEnd(seq=2),
    ]
    assert await cluster.read_audio(session, after_seq=2, block_ms=20) == []
    await cluster.store_image(session, b"\x89PNG")
    assert await cluster.load_image(session) == b"\x89PNG"

    event = FinalEvent(session=session, seq=1, t_ms=400, text="hello")
    assert await cluster.publish(event)
    assert not await cluster.publish(event.model_copy(update={"text": "stale"}))
    assert await cluster.read_events(session) == [event]
    assert await cluster.last_event_seq(session) == 1
    await cluster.expire_session(session, ttl_s=60)
    assert await cluster.audio_exists(session)


async def test_reclaim_release_dead_letter_and_heartbeat(cluster: Streams) -> None:
    session = contract.new_session_id()
    await cluster.announce(announce(session))
    claims = []
    for _ in range(PARTITIONS):
        claims += await cluster.claim_new("dead-worker", block_ms=20)
    assert [c.session for c in claims] == [session]
    await asyncio.sleep(1.1)  # past reclaim_idle_ms
    [taken] = await cluster.reclaim_idle("w2")
    assert (taken.session, taken.deliveries) == (session, 2)
    await cluster.dead_letter(taken, "gave up", worker="w2")
    [letter] = await cluster.read_dead_letters()
    assert (letter.session, letter.reason) == (session, "gave up")
    assert await cluster.pending_count() == 0

    handed_back = contract.new_session_id()  # a draining worker releases a live session
    await cluster.announce(announce(handed_back))
    claims = []
    for _ in range(PARTITIONS):
        claims += await cluster.claim_new("w2", block_ms=20)
    await cluster.release("w2", claims[0])
    assert [c.session for c in await cluster.reclaim_idle("w3")] == [handed_back]  # at once

    beat = contract.Heartbeat(worker="w2", sessions=1, at_ms=1)
    await cluster.beat(beat, ttl_s=30)
    assert await cluster.heartbeat_of("w2") == beat
    assert await cluster.ping()


async def test_observers_follow_announcements_on_every_partition(cluster: Streams) -> None:
    after = {p: "0-0" for p in range(PARTITIONS)}
    sessions = [contract.new_session_id() for _ in range(6)]
    for session in sessions:
        await cluster.announce(announce(session))
    found = await cluster.follow_announcements(after, block_ms=20)
    assert sorted(message.session for _, _, message in found) == sorted(sessions)
