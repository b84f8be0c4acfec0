"""The HTTP API: `POST /v1/sessions` (an audio file becomes a session) and its events as SSE.

An upload is read with its size capped as it arrives, validated (decoded far enough to know it is
audio) and announced; the 201 goes out then, while the rest of the audio is pushed in the
background. `GET /v1/sessions/{id}/events` streams the session's events as Server-Sent Events
(`id:` is the event seq) and resumes after `Last-Event-ID`; it ends after the terminal event.
"""

from __future__ import annotations

import time

from aiohttp import web

from ingest.audio_files import AudioTooLongError, BadAudioError
from ingest.file_session import FileSession, open_file_session
from ingest.images import BadImageError, check_image
from ingest.state import INGEST_KEY, HttpError, Ingest, check_length, read_capped, seq_param, session_param
from rawwave.contract import TERMINAL_EVENT_TYPES, Event, event_to_json
from rawwave.logs import bind_session, get_logger

log = get_logger(__name__)

AUDIO_PARTS = ("audio", "file")  # multipart field names that carry the audio
IMAGE_PART = "image"
EVENTS_BLOCK_MS = 1000  # longest blocking read; also how soon a stream notices shutdown
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream


async def create_session(request: web.Request) -> web.Response:
    ingest: Ingest = request.app[INGEST_KEY]
    ingest.check_accepting()
    async with ingest.new_session():  # before the body: a refused upload costs no bandwidth
        upload = await _open_upload(request, ingest)
    ingest.spawn_upload(upload.pump())
    await upload.started.wait()  # the events URL we answer with must find the session at once
    location = f"/v1/sessions/{upload.session}/events"
    return web.json_response({"session": upload.session, "events": location}, status=201)


async def _open_upload(request: web.Request, ingest: Ingest) -> FileSession:
    """Read and validate the upload, then announce its session."""
    audio, image, name = await _read_upload(request, ingest.settings.max_upload_bytes)
    respond = request.query.get("respond", "") in ("1", "true", "yes")
    if image is not None:
        try:
            check_image(image)
        except BadImageError as e:
            raise HttpError(400, str(e), e.code) from e
    try:
        return await open_file_session(
            ingest.streams,
            ingest.settings,
            audio,
            name=name,
            source_kind="http",
            respond=respond,
            image=image,
        )
    except AudioTooLongError as e:
        raise HttpError(413, str(e), e.code) from e
    except BadAudioError as e:
        raise HttpError(400, str(e), e.code) from e


async def session_events(request: web.Request) -> web.StreamResponse:
    ingest: Ingest = request.app[INGEST_KEY]
    session = session_param(request.match_info["session"])
    after = seq_param(request.headers.get("Last-Event-ID") or request.query.get("after"), "Last-Event-ID")
    if not await ingest.streams.audio_exists(session) and await ingest.streams.last_event_seq(session) == 0:
        raise HttpError(404, "no such session", "not_found")
    response = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    with bind_session(session):
        sent = await _stream_events(ingest, response, session, after)
        log.info("event stream ended", after=after, sent=sent)
    return response


async def _stream_events(ingest: Ingest, response: web.StreamResponse, session: str, after: int) -> int:
    sent, quiet_since = 0, time.monotonic()
    while not ingest.draining:
        events = await ingest.streams.read_events(session, after, block_ms=EVENTS_BLOCK_MS)
        for event in events:
            await response.write(_sse(event))
            after, sent = event.seq, sent + 1
            if event.type in TERMINAL_EVENT_TYPES:
                return sent
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > KEEPALIVE_S:
            await response.write(b": keepalive\n\n")
            quiet_since = time.monotonic()
    return sent


def _sse(event: Event) -> bytes:
    return f"id: {event.seq}\nevent: {event.type}\ndata: {event_to_json(event)}\n\n".encode()


async def _read_upload(request: web.Request, max_bytes: int) -> tuple[bytes, bytes | None, str]:
    """(audio, image or None, a name for messages) from a raw body or a multipart form."""
    check_length(request, max_bytes, "upload")
    if request.content_type.startswith("multipart/"):
        return await _read_multipart(request, max_bytes)
    audio = await read_capped(request.content.readany, max_bytes, "upload")
    if not audio:
        raise HttpError(
            400, "empty upload: send the audio as the body or as a multipart 'audio' part", "empty"
        )
    return audio, None, "upload"


async def _read_multipart(request: web.Request, max_bytes: int) -> tuple[bytes, bytes | None, str]:
    reader = await request.multipart()
    audio, image, name, budget = b"", None, "upload", max_bytes
    while (part := await reader.next()) is not None:
        data = await read_capped(lambda part=part: part.read_chunk(64 * 1024), budget, "upload")  # type: ignore[misc]
        budget -= len(data)
        if part.name in AUDIO_PARTS:
            audio, name = data, part.filename or part.name
        elif part.name == IMAGE_PART:
            image = data
    if not audio:
        raise HttpError(400, f"multipart upload without a non-empty {' or '.join(AUDIO_PARTS)} part", "empty")
    return audio, image, name
