"""A whole audio file as one session: validate, announce, stream the PCM in, end.

Shared by `rawwave push` and `POST /v1/sessions`. The file is opened and its first block decoded
before the session is announced, so a bad file never leaves a half-written session; a file that
goes bad midway ends its audio with `AudioEnd(reason="error")`. Decoding runs in a thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

from ingest.audio_files import (
    AudioSource,
    AudioTooLongError,
    BadAudioError,
    DecodedAudio,
    DecodeLimits,
    open_audio,
)
from ingest.sink import SessionAudio
from rawwave.contract import SAMPLE_RATE, SAMPLE_WIDTH, new_session_id
from rawwave.logs import bind_session, get_logger
from rawwave.settings import Settings
from rawwave.streams import Streams

log = get_logger(__name__)

BATCH_BYTES = SAMPLE_RATE * SAMPLE_WIDTH  # 32000 bytes = 1 s of PCM per hop to the decoding thread


class FileSession:
    """An announced session fed from a validated file; `pump` writes the rest of the audio."""

    def __init__(self, audio: SessionAudio, decoded: DecodedAudio) -> None:
        self.audio = audio
        self.session = audio.session
        self._decoded = decoded
        # set once the session's audio exists in Redis (or the pump is over): from then on its events
        # can be followed (an events reader refuses a session with neither audio nor events)
        self.started = asyncio.Event()

    async def pump(self, realtime: bool = False) -> None:
        """Write all audio, then the end marker (reason end, error, or shutdown when cancelled)."""
        with bind_session(self.session):
            try:
                await self._write_all(realtime)
                await self.audio.end("end")
            except BadAudioError as e:
                log.warning("audio file went bad midway", error=str(e))
                await self.audio.end("error", str(e))
            except asyncio.CancelledError:
                await asyncio.shield(self.audio.end("shutdown", "ingest shut down while pushing the audio"))
                raise
            finally:
                self.started.set()

    async def _write_all(self, realtime: bool) -> None:
        # the generator closes the container itself when it ends or fails; a cancelled pump leaves
        # it to the garbage collector, never closing it under a decoding thread
        blocks = self._decoded.blocks()
        batch = BATCH_BYTES // 5 if realtime else BATCH_BYTES
        started = time.monotonic()
        while pcm := await asyncio.to_thread(_take, blocks, batch):
            if not await self.audio.write(pcm):
                raise AudioTooLongError(f"{self._decoded.name}: longer than a session may carry")
            if self.audio.chunks:
                self.started.set()
            if realtime:
                await _pace(started, self.audio.seconds)


async def open_file_session(
    streams: Streams,
    settings: Settings,
    source: AudioSource,
    *,
    name: str | None = None,
    source_kind: str = "file",
    respond: bool = False,
    image: bytes | None = None,
) -> FileSession:
    """Validate `source` (raises a BadAudioError subclass), then announce its session."""
    limits = DecodeLimits.for_session(settings.max_session_s)
    decoded = await asyncio.to_thread(open_audio, source, limits, name)
    audio = SessionAudio(streams, settings, new_session_id())
    try:
        await audio.announce(source_kind, respond=respond, image=image)
    except BaseException:
        decoded.close()
        raise
    with bind_session(audio.session):
        log.info(
            "file session announced",
            file=decoded.name,
            rate=decoded.input_rate,
            channels=decoded.input_channels,
        )
    return FileSession(audio, decoded)


def _take(blocks: Iterator[bytes], at_least: int) -> bytes:
    """Decode blocks until `at_least` bytes (or the end); runs in the decoding thread."""
    out = bytearray()
    for block in blocks:
        out += block
        if len(out) >= at_least:
            break
    return bytes(out)


async def _pace(started: float, audio_seconds: float) -> None:
    ahead = audio_seconds - (time.monotonic() - started)
    if ahead > 0:
        await asyncio.sleep(ahead)
