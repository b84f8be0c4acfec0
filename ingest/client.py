"""What the command-line clients (`push`, `transcribe`, `consume`) share: Redis, and following events.

They talk to Redis directly through `Streams`, like a worker does; the ingest server is not needed.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rawwave.contract import TERMINAL_EVENT_TYPES, Event, event_to_json
from rawwave.errors import RawwaveError
from rawwave.settings import Settings
from rawwave.streams import Streams, resolve_redis_url

EVENTS_BLOCK_MS = 1000  # a follower wakes at least this often (to notice a timeout)


@asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[Streams]:
    """A Streams for a CLI; an unreachable Redis becomes one clear line, not a traceback."""
    streams = Streams.connect(settings)
    try:
        await streams.ping()
        yield streams
    except (RedisConnectionError, RedisTimeoutError, OSError) as e:
        raise RawwaveError(f"cannot reach Redis at {resolve_redis_url(settings)}: {e}") from e
    finally:
        await streams.close()


async def follow_events(streams: Streams, session: str, after: int = 0) -> AsyncIterator[Event]:
    """The session's events after `after`, in seq order, until (and including) the terminal one."""
    while True:
        for event in await streams.read_events(session, after, block_ms=EVENTS_BLOCK_MS):
            yield event
            after = event.seq
            if event.type in TERMINAL_EVENT_TYPES:
                return


def write_line(text: str) -> None:
    """CLI output: one line on stdout, flushed at once (a pipe must see it now)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def write_event(event: Event) -> None:
    write_line(event_to_json(event))
