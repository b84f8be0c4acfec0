"""Admission: refuse a new session while `max_queued_sessions` are announced and not finished.

The backlog (sessions waiting for a worker plus sessions a worker is running, `Streams.backlog`) is
read from Redis at most every CACHE_S; sessions admitted since the last reading are counted here, so
a burst inside one reading cannot overshoot the limit, and a request that fails before it announces
its session gives its place back. Reconnects to a live session are not new.
"""

from __future__ import annotations

import asyncio
import time

from rawwave.errors import RawwaveError
from rawwave.logs import get_logger
from rawwave.streams import Streams

log = get_logger(__name__)

CACHE_S = 0.25  # a burst of requests reads Redis at most this often


class QueueFullError(RawwaveError):
    """Too many sessions are waiting or running: a new one would only wait longer."""


class Admission:
    """Admit or refuse new sessions against `limit` (0 = unlimited)."""

    def __init__(self, streams: Streams, limit: int, cache_s: float = CACHE_S) -> None:
        self.streams = streams
        self.limit = limit
        self.cache_s = cache_s
        self._backlog = 0
        self._read_at = float("-inf")
        self._readings = 0  # which reading `_backlog` started from
        self._lock = asyncio.Lock()

    async def admit(self) -> int:
        """Count one new session in (returns a ticket for `release`), or raise QueueFullError."""
        if not self.limit:
            return -1
        async with self._lock:
            if time.monotonic() - self._read_at >= self.cache_s:
                self._backlog, self._read_at = await self.streams.backlog(), time.monotonic()
                self._readings += 1
            if self._backlog >= self.limit:
                raise QueueFullError(
                    f"busy: {self._backlog} sessions are queued or running "
                    f"(RAWWAVE_MAX_QUEUED_SESSIONS={self.limit}); try again later"
                )
            self._backlog += 1
            return self._readings

    def release(self, ticket: int) -> None:
        """The admitted session was never announced (bad request): give its place back, unless a
        newer reading (which cannot have counted it) has replaced the count since."""
        if ticket == self._readings:
            self._backlog -= 1
