"""Admission on a real server and a real Redis: past max_queued_sessions new sessions get 503 +
Retry-After (HTTP and WHIP; a WHIP reconnect is not a new session), and `push`/`transcribe` exit 1;
finishing sessions lets new ones in."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from ingest.admission import CACHE_S, QueueFullError
from ingest.push import push_all
from ingest.transcribe import transcribe
from rawwave import cli
from rawwave.contract import SessionAnnounce, new_session_id
from rawwave.settings import Settings
from rawwave.streams import Streams

from .conftest import Server, start_server

LIMIT = 3
OFFER = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=fingerprint:x\r\na=ice-ufrag:x\r\na=ice-pwd:x\r\n"


@pytest.fixture
async def full_server(ingest_settings: Settings) -> AsyncIterator[Server]:
    runner, url = await start_server(ingest_settings.model_copy(update={"max_queued_sessions": LIMIT}))
    async with aiohttp.ClientSession() as http:
        yield Server(url, runner.app, http)
    await runner.cleanup()


async def fill(streams: Streams) -> None:
    for _ in range(LIMIT):
        await streams.announce(SessionAnnounce(session=new_session_id(), source="file", created_ms=1))


async def test_full_queue_refuses_new_sessions_until_some_finish(
    full_server: Server, streams: Streams, speech_wav: Path
) -> None:
    await fill(streams)
    async with full_server.http.post(f"{full_server.url}/v1/sessions", data=speech_wav.read_bytes()) as r:
        assert (r.status, r.headers["Retry-After"]) == (503, "5")
        assert (await r.json())["code"] == "busy"
    whip = f"{full_server.url}/whip"
    headers = {"Content-Type": "application/sdp"}
    async with full_server.http.post(whip, data=OFFER, headers=headers) as r:
        assert r.status == 503 and r.headers["Retry-After"] and (await r.json())["code"] == "busy"
    async with full_server.http.post(f"{whip}?session={new_session_id()}", data=OFFER, headers=headers) as r:
        assert r.status == 404  # a reconnect is admitted; this session just does not exist

    claims = await streams.claim_new("w", count=LIMIT, block_ms=10)
    for claim in claims[:2]:
        await streams.finish(claim)
    await asyncio.sleep(CACHE_S)
    async with full_server.http.post(f"{full_server.url}/v1/sessions", data=speech_wav.read_bytes()) as r:
        assert r.status == 201, await r.text()
    for _ in range(3):  # a bad upload gives its place back
        async with full_server.http.post(f"{full_server.url}/v1/sessions", data=b"not audio") as r:
            assert r.status == 400
    async with full_server.http.post(f"{full_server.url}/v1/sessions", data=speech_wav.read_bytes()) as r:
        assert r.status == 201, await r.text()  # inside one cached reading: counted here, not re-read
    async with full_server.http.post(f"{full_server.url}/v1/sessions", data=speech_wav.read_bytes()) as r:
        assert r.status == 503


async def test_cli_clients_refuse_when_the_queue_is_full(
    settings: Settings,
    streams: Streams,
    speech_wav: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await fill(streams)
    limited = settings.model_copy(update={"max_queued_sessions": LIMIT})
    with pytest.raises(QueueFullError, match="RAWWAVE_MAX_QUEUED_SESSIONS=3"):
        await push_all(limited, [str(speech_wav)])
    args = argparse.Namespace(file=str(speech_wav), respond=False, json=False, realtime=False, timeout=5.0)
    with pytest.raises(QueueFullError):
        await transcribe(limited, args)
    monkeypatch.setenv("RAWWAVE_MAX_QUEUED_SESSIONS", str(LIMIT))
    assert await asyncio.to_thread(cli.main, ["push", str(speech_wav)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("rawwave: busy:")
    assert await streams.backlog() == LIMIT  # nothing was announced
