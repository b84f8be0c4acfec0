"""The HTTP API on a real server and a real Redis: uploads become sessions, events stream as SSE.

The tests publish events themselves through `Streams.publish`, standing in for the worker (which
has its own tests); the end-to-end test with a real worker lives elsewhere.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import aiohttp
from PIL import Image

from ingest.file_session import open_file_session
from ingest.sink import SessionAudio
from rawwave.contract import AudioChunk, AudioEnd, DoneEvent, FinalEvent, PartialEvent, SessionAnnounce
from rawwave.streams import Streams

from .conftest import Server


def tiny_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


PNG = tiny_png()


async def read_all_audio(streams: Streams, session: str, timeout: float = 10.0) -> list:
    """Every audio entry of a session, waiting until its end marker has arrived."""
    entries: list = []
    async with asyncio.timeout(timeout):
        while not entries or not isinstance(entries[-1], AudioEnd):
            entries += await streams.read_audio(session, len(entries), count=1000, block_ms=200)
    return entries


async def announced(streams: Streams) -> list[SessionAnnounce]:
    found = await streams.follow_announcements({0: "0"}, block_ms=10)
    return [announce for _, _, announce in found]


async def test_upload_becomes_an_announced_session_with_chunks_and_end(
    server: Server, streams: Streams, speech_wav: Path
) -> None:
    async with server.http.post(f"{server.url}/v1/sessions?respond=1", data=speech_wav.read_bytes()) as r:
        assert r.status == 201, await r.text()
        body = await r.json()
    session = body["session"]
    assert body["events"] == f"/v1/sessions/{session}/events"
    [announce] = await announced(streams)
    assert (announce.session, announce.source, announce.respond) == (session, "http", True)
    entries = await read_all_audio(streams, session)
    chunks = [e for e in entries if isinstance(e, AudioChunk)]
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert all(len(c.pcm) == 6400 for c in chunks[:-1])  # 200 ms at 16 kHz mono s16
    assert b"".join(c.pcm for c in chunks) == speech_wav.read_bytes()[44:]
    assert entries[-1].reason == "end"


async def test_multipart_upload_with_image(server: Server, streams: Streams, audio_dir: Path) -> None:
    form = aiohttp.FormData()
    form.add_field("audio", (audio_dir / "s.ogg").read_bytes(), filename="talk.ogg")
    form.add_field("image", PNG, filename="x.png")
    async with server.http.post(f"{server.url}/v1/sessions", data=form) as r:
        assert r.status == 201, await r.text()
        session = (await r.json())["session"]
    [announce] = await announced(streams)
    assert announce.has_image and await streams.load_image(session) == PNG
    assert (await read_all_audio(streams, session))[-1].reason == "end"


async def test_bad_images_are_refused_before_a_session(
    server: Server, streams: Streams, audio_dir: Path
) -> None:
    huge = io.BytesIO()
    Image.new("L", (9000, 5000)).save(huge, format="PNG")  # 45 megapixels, a small file
    cases = [(b"\x89PNG fake", "not an image"), (b"hello", "not an image"), (b"", "empty"),
             (huge.getvalue(), "more than the 40000000 pixels")]  # fmt: skip
    for image, message in cases:
        form = aiohttp.FormData()
        form.add_field("audio", (audio_dir / "s.ogg").read_bytes(), filename="talk.ogg")
        form.add_field("image", image, filename="x.png")
        async with server.http.post(f"{server.url}/v1/sessions", data=form) as r:
            body = await r.json()
            assert (r.status, body["code"]) == (400, "bad_image") and message in body["error"], body
    assert await announced(streams) == []


async def test_bad_uploads_get_json_errors_and_no_session(
    server: Server, streams: Streams, tmp_path: Path
) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("notes", "hello")
    cases = [
        (b"", 400, "empty"),
        (b"not audio at all" * 100, 400, "bad_audio"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", 400, "bad_audio"),
        (form, 400, "empty"),
    ]
    for data, status, code in cases:
        async with server.http.post(f"{server.url}/v1/sessions", data=data) as r:
            assert r.status == status
            body = await r.json()
            assert body["code"] == code and body["error"]
    assert await announced(streams) == []


async def test_oversize_upload_is_refused_before_it_is_read(ingest_settings, streams: Streams) -> None:
    from .conftest import start_server

    runner, url = await start_server(ingest_settings.model_copy(update={"max_upload_bytes": 4096}))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/sessions", data=b"\0" * 100_000) as r:
                assert r.status == 413 and (await r.json())["code"] == "too_large"

            async def trickle():  # no Content-Length: the cap applies while reading
                for _ in range(100):
                    yield b"\0" * 1000

            async with http.post(f"{url}/v1/sessions", data=trickle()) as r:
                assert r.status == 413
    finally:
        await runner.cleanup()
    assert await announced(streams) == []


async def _sse(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """(id, data) of every event until the stream ends."""
    events, current = [], {}
    async with http.get(url, headers=headers or {}) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if not line:
                events.append((current.get("id", ""), current.get("data", "")))
                current = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                current[key] = value
    return events


async def _new_session(streams: Streams, settings) -> str:
    audio = SessionAudio(streams, settings, "sse-session")
    await audio.announce("http")
    await audio.write(b"\0" * 6400)
    return audio.session


async def test_sse_streams_events_and_resumes_after_last_event_id(server: Server, streams: Streams) -> None:
    session = await _new_session(streams, server.ingest.settings)
    url = f"{server.url}/v1/sessions/{session}/events"
    reader = asyncio.create_task(_sse(server.http, url))
    await asyncio.sleep(0.2)  # the stream is open and waiting before the first event exists
    published = [
        PartialEvent(session=session, seq=1, t_ms=200, text="hel", stable="", revision=0),
        PartialEvent(session=session, seq=2, t_ms=400, text="hello wor", stable="hello", revision=1),
        FinalEvent(session=session, seq=3, t_ms=600, text="hello world"),
        DoneEvent(session=session, seq=4, t_ms=600),
    ]
    for event in published:
        await streams.publish(event)
        await asyncio.sleep(0.05)
    events = await asyncio.wait_for(reader, 10)
    assert [i for i, _ in events] == ["1", "2", "3", "4"]
    assert '"text":"hello world"' in events[2][1]
    resumed = await _sse(server.http, url, {"Last-Event-ID": "2"})
    assert [i for i, _ in resumed] == ["3", "4"]  # nothing missed, nothing repeated


async def test_sse_errors(server: Server) -> None:
    async with server.http.get(f"{server.url}/v1/sessions/nope/events") as r:
        assert r.status == 404 and (await r.json())["code"] == "not_found"
    async with server.http.get(f"{server.url}/v1/sessions/bad%20id/events") as r:
        assert r.status == 400
    async with server.http.get(f"{server.url}/v1/sessions/x/events", headers={"Last-Event-ID": "x"}) as r:
        assert r.status == 400


async def test_health_and_drain(server: Server, streams: Streams, speech_wav: Path) -> None:
    async with server.http.get(f"{server.url}/livez") as r:
        assert r.status == 200
    async with server.http.get(f"{server.url}/readyz") as r:
        assert r.status == 200 and (await r.json())["ready"]
    upload = await open_file_session(streams, server.ingest.settings, speech_wav, source_kind="http")
    server.ingest.spawn_upload(upload.pump(realtime=True))  # 2.8 s of audio, paced: still live below
    await asyncio.sleep(0.05)
    await server.ingest.drain()  # what SIGTERM does
    async with server.http.get(f"{server.url}/readyz") as r:
        assert r.status == 503
    async with server.http.post(f"{server.url}/v1/sessions", data=speech_wav.read_bytes()) as r:
        assert r.status == 503 and r.headers["Retry-After"]
    entries = await read_all_audio(streams, upload.session)
    assert entries[-1].reason == "end" and len(entries) > 10  # accepted: pushed to the end while draining


async def test_drain_deadline_ends_a_still_pushing_upload_with_shutdown(
    server: Server, streams: Streams, speech_wav: Path
) -> None:
    server.ingest.settings = server.ingest.settings.model_copy(update={"drain_timeout_s": 0.2})
    upload = await open_file_session(streams, server.ingest.settings, speech_wav, source_kind="http")
    server.ingest.spawn_upload(upload.pump(realtime=True))  # 2.8 s of audio, paced: outlives the deadline
    await server.ingest.drain()
    entries = await read_all_audio(streams, upload.session)
    assert entries[-1].reason == "shutdown" and len(entries) < 10
