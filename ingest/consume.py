"""Follow sessions' events as JSON lines: named sessions, and with --all every new one.

Resumable: `--after SEQ` starts each named session after that event. Each session is read in seq
order from after the last event printed, so no event is printed twice. Without --all the command
exits once every named session has sent its terminal event.
"""

from __future__ import annotations

import argparse
import asyncio

from ingest.client import connected, follow_events, write_event
from rawwave.contract import SESSION_ID_PATTERN
from rawwave.errors import RawwaveError
from rawwave.settings import Settings
from rawwave.streams import Streams

ANNOUNCE_BLOCK_MS = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sessions", nargs="*", metavar="SESSION", help="session ids to follow")
    parser.add_argument("--all", action="store_true", help="also follow every session announced from now on")
    parser.add_argument("--after", type=int, default=0, metavar="SEQ", help="named sessions: start after SEQ")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if not args.sessions and not args.all:
        raise RawwaveError("name at least one SESSION, or pass --all")
    if bad := [s for s in args.sessions if not SESSION_ID_PATTERN.match(s)]:
        raise RawwaveError(f"not a session id: {bad[0]!r}")
    if args.after < 0:
        raise RawwaveError("--after must be >= 0")
    return asyncio.run(consume(settings, args.sessions, follow_all=args.all, after=args.after))


async def consume(settings: Settings, sessions: list[str], follow_all: bool = False, after: int = 0) -> int:
    async with connected(settings) as streams:
        followers = {s: asyncio.create_task(_follow(streams, s, after)) for s in dict.fromkeys(sessions)}
        try:
            if follow_all:
                await _follow_new(streams, followers)
            await asyncio.gather(*followers.values())
        finally:
            for task in followers.values():
                task.cancel()
            await asyncio.gather(*followers.values(), return_exceptions=True)
    return 0


async def _follow(streams: Streams, session: str, after: int) -> None:
    async for event in follow_events(streams, session, after):
        write_event(event)


async def _follow_new(streams: Streams, followers: dict[str, asyncio.Task[None]]) -> None:
    """Forever: start a follower for each newly announced session (from now on, not the backlog)."""
    positions: dict[int, str] = {}
    while True:
        for _, _, announce in await streams.follow_announcements(positions, block_ms=ANNOUNCE_BLOCK_MS):
            if announce.session not in followers:
                followers[announce.session] = asyncio.create_task(_follow(streams, announce.session, 0))
