"""One session's audio on its way into Redis: announce once, chunks as PCM arrives, exactly one end.

Every ingest path (WebRTC peer, HTTP upload, `rawwave push`) writes through a `SessionAudio`, so
the duration cap, the chunking and the single end marker are enforced in one place.
"""

from __future__ import annotations

import asyncio
import time

from ingest.chunker import Chunker
from rawwave.contract import SAMPLE_RATE, SAMPLE_WIDTH, EndReason, SessionAnnounce
from rawwave.logs import bind_session, get_logger
from rawwave.settings import Settings
from rawwave.streams import Streams

log = get_logger(__name__)


class SessionAudio:
    def __init__(self, streams: Streams, settings: Settings, session: str) -> None:
        self.streams = streams
        self.session = session
        self.max_samples = int(settings.max_session_s * SAMPLE_RATE)
        self._chunker = Chunker(settings.chunk_samples)
        self.chunks = 0
        self.end_reason: EndReason | None = None
        self._lock = asyncio.Lock()  # appends of one session stay in seq order: Redis refuses a stale id

    @property
    def ended(self) -> bool:
        return self.end_reason is not None

    @property
    def seconds(self) -> float:
        return self._chunker.seconds

    async def announce(self, source: str, respond: bool = False, image: bytes | None = None) -> None:
        if image:
            await self.streams.store_image(self.session, image)
        message = SessionAnnounce(
            session=self.session, source=source, respond=respond, created_ms=_now_ms(), has_image=bool(image)
        )
        await self.streams.announce(message)  # type: ignore[arg-type]

    async def write(self, pcm: bytes) -> bool:
        """Append PCM; False (and nothing written) once ended or past the session's longest audio."""
        async with self._lock:
            if self.ended:
                return False
            room = (self.max_samples - self._chunker.total_samples) * SAMPLE_WIDTH
            for chunk in self._chunker.feed(pcm[: max(0, room)]):
                await self.streams.append_audio(self.session, chunk)
                self.chunks += 1
            return len(pcm) <= room

    async def end(self, reason: EndReason = "end", message: str = "") -> bool:
        """Flush the tail and write the end marker; False if the audio had already ended."""
        async with self._lock:
            if self.ended:
                return False
            self.end_reason = reason
            for entry in self._chunker.finish(reason, message):
                await self.streams.append_audio(self.session, entry)
        with bind_session(self.session):
            log.info("audio ended", reason=reason, seconds=round(self.seconds, 2), message=message or None)
        return True


def _now_ms() -> int:
    return int(time.time() * 1000)
