"""WebRTC ingest with a real aiortc client over 127.0.0.1: audio in, events out, every way to end.

Both peers gather on loopback only (the server through RAWWAVE_ICE_HOST_ADDRESSES), so no packet
goes to this machine's other addresses.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import aioice.ice
import numpy as np

from ingest.webrtc import ice_configuration, ice_server, pinned_ice_hosts
from rawwave.contract import AudioChunk, DoneEvent, FinalEvent, PartialEvent
from rawwave.settings import Settings
from rawwave.streams import Streams

from .conftest import Server, start_server
from .test_audio_files import aligned_correlation, envelope, samples
from .test_http_api import announced, read_all_audio
from .webrtc_client import connect

LEAK_CYCLES = int(os.environ.get("RAWWAVE_LEAK_CYCLES", "30"))


async def audio_seconds(streams: Streams, session: str) -> float:
    entries = await streams.read_audio(session, 0, count=10_000)
    return sum(len(e.pcm) for e in entries if isinstance(e, AudioChunk)) / 32000


async def wait_until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


def test_ice_host_addresses_are_pinned_per_context() -> None:
    with pinned_ice_hosts(["127.0.0.1", "::1"]):
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1", "::1"]
    assert "127.0.0.1" not in aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)  # aioice's own


def test_ice_servers_setting(settings: Settings) -> None:
    assert ice_configuration(settings).iceServers == []  # never aiortc's default Google STUN
    turn = ice_server("turn:user:pa55@turn.example:3478")
    assert (turn.urls, turn.username, turn.credential) == ("turn:turn.example:3478", "user", "pa55")
    assert ice_server("stun:stun.example:3478").urls == "stun:stun.example:3478"


async def test_wav_over_webrtc_reaches_redis_and_events_reach_the_data_channel(
    server: Server, streams: Streams, speech_wav: Path
) -> None:
    client = await connect(server.url, str(speech_wav))
    [announce] = await announced(streams)
    assert (announce.session, announce.source) == (client.session, "webrtc")
    await wait_until(lambda: _at_least(streams, client.session, 2.6))
    await streams.publish(
        PartialEvent(session=client.session, seq=1, t_ms=400, text="the qu", stable="the", revision=0)
    )
    await streams.publish(FinalEvent(session=client.session, seq=2, t_ms=2700, text="the quick brown fox"))
    final = await client.wait_for(lambda e: e["type"] == "final")
    assert final["text"] == "the quick brown fox" and [e["seq"] for e in client.events] == [1, 2]

    client.channel.send("stop")  # the audio ends; the peer stays for the last events
    entries = await read_all_audio(streams, client.session)
    assert entries[-1].reason == "client_stop"
    chunks = [e for e in entries if isinstance(e, AudioChunk)]
    assert all(len(c.pcm) == 6400 for c in chunks[:-1])  # 200 ms chunks of 16 kHz mono s16
    _assert_same_speech(b"".join(c.pcm for c in chunks), speech_wav)

    await streams.publish(DoneEvent(session=client.session, seq=3, t_ms=2700))
    await client.wait_for(lambda e: e["type"] == "done")
    await wait_until(lambda: _no_peers(server))  # the session is over: the server closes the peer
    await client.close()


def _assert_same_speech(pcm: bytes, speech_wav: Path) -> None:
    """Opus at 48 kHz and back to 16 kHz: the speech envelope survives (shifted by a few frames)."""
    received, original = samples(pcm), samples(speech_wav.read_bytes()[44:])
    assert abs(len(received) - len(original)) < 0.5 * 16000
    assert aligned_correlation(envelope(received), envelope(original), max_lag=25) > 0.9
    assert np.abs(received).max() > 0.1


async def _at_least(streams: Streams, session: str, seconds: float) -> bool:
    return await audio_seconds(streams, session) >= seconds


async def _no_peers(server: Server) -> bool:
    return server.ingest.peers.count() == 0


async def test_client_closing_ends_the_audio(server: Server, streams: Streams) -> None:
    client = await connect(server.url)
    await asyncio.sleep(0.3)
    await client.close()
    entries = await read_all_audio(streams, client.session)
    assert entries[-1].reason in ("client_stop", "track_ended")
    await wait_until(lambda: _no_peers(server))


async def test_duration_cap_ends_the_session(
    ingest_settings: Settings, streams: Streams, speech_wav: Path
) -> None:
    runner, url = await start_server(ingest_settings.model_copy(update={"max_session_s": 1.0}))
    try:
        client = await connect(url, str(speech_wav))
        entries = await read_all_audio(streams, client.session)
        assert entries[-1].reason == "timeout"
        assert await audio_seconds(streams, client.session) <= 1.0
        await client.close()
    finally:
        await runner.cleanup()


async def test_shutdown_ends_live_peers(server: Server, streams: Streams) -> None:
    client = await connect(server.url)
    await server.ingest.drain()
    assert (await read_all_audio(streams, client.session))[-1].reason == "shutdown"
    assert server.ingest.peers.count() == 0
    await client.close()


async def test_reconnect_takes_over_the_audio_and_resumes_events(
    server: Server, streams: Streams, speech_wav: Path
) -> None:
    first = await connect(server.url, str(speech_wav))
    session = first.session
    for seq in (1, 2):
        await streams.publish(FinalEvent(session=session, seq=seq, t_ms=0, text=f"e{seq}"))
    await first.wait_for(lambda e: e["seq"] == 2)
    await streams.publish(FinalEvent(session=session, seq=3, t_ms=0, text="e3"))  # may not have reached it
    second = await connect(server.url, str(speech_wav), query=f"?session={session}&last_seq=2")
    assert second.session == session
    await streams.publish(FinalEvent(session=session, seq=4, t_ms=0, text="e4"))
    await second.wait_for(lambda e: e["seq"] == 4)
    assert [e["seq"] for e in second.events] == [3, 4]  # none missed, none repeated
    assert server.ingest.peers.count() == 1  # the old peer was closed...
    entries = await streams.read_audio(session, 0, count=10_000)
    assert not any(e.__class__.__name__ == "AudioEnd" for e in entries)  # ...without ending the audio

    second.channel.send(json.dumps({"resume": 1}))  # the data-channel way to resume
    await second.wait_for(lambda e: e["seq"] == 2)
    assert [e["seq"] for e in second.events] == [3, 4, 2, 3, 4]
    await second.close()
    assert (await read_all_audio(streams, session))[-1].reason in ("client_stop", "track_ended")
    await first.close()


async def test_rejoin_after_the_audio_ended_follows_events_only(server: Server, streams: Streams) -> None:
    first = await connect(server.url)
    session = first.session
    await first.close()
    await read_all_audio(streams, session)
    await streams.publish(FinalEvent(session=session, seq=1, t_ms=0, text="late"))
    again = await connect(server.url, query=f"?session={session}&last_seq=0")
    assert (await again.wait_for(lambda e: e["seq"] == 1))["text"] == "late"
    await again.close()
    missing = await _status_of_rejoin(server, "no-such-session")
    assert missing == 404


async def _status_of_rejoin(server: Server, session: str) -> int:
    try:
        await connect(server.url, query=f"?session={session}&last_seq=0")
    except AssertionError as e:
        return int(str(e).split("answered ")[1].split(":")[0])
    return 201


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_no_fd_or_task_leaks_over_connect_close_cycles(server: Server, streams: Streams) -> None:
    async def cycle() -> None:
        client = await connect(server.url, http=server.http)
        await asyncio.sleep(0.05)
        await client.close()
        await wait_until(lambda: _no_peers(server))

    for _ in range(3):  # warm up pools and caches
        await cycle()
    await asyncio.sleep(0.5)
    fds, tasks = _fds(), len(asyncio.all_tasks())
    for _ in range(LEAK_CYCLES):
        await cycle()
    await asyncio.sleep(1.0)
    grown_fds, grown_tasks = _fds() - fds, len(asyncio.all_tasks()) - tasks
    counts = f"fds {fds} -> {fds + grown_fds}, tasks {tasks} -> {tasks + grown_tasks}"
    print(f"leak check: {LEAK_CYCLES} cycles, {counts}")
    assert grown_fds <= 3 and grown_tasks <= 2
