"""Push one audio file and print what comes back: the final transcript (and the response).

`--json` prints every event as a JSON line instead. Exits non-zero when the session ends in an
error, or when no terminal event arrives within --timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from ingest.admission import Admission
from ingest.client import connected, follow_events, write_event, write_line
from ingest.file_session import open_file_session
from rawwave.contract import Event
from rawwave.errors import RawwaveError
from rawwave.settings import Settings
from rawwave.streams import Streams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="an audio file (any format FFmpeg reads)")
    parser.add_argument("--respond", action="store_true", help="also print the response")
    parser.add_argument("--json", action="store_true", help="print every event as a JSON line")
    parser.add_argument("--realtime", action="store_true", help="pace the audio as if it were live")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(transcribe(settings, args))


async def transcribe(settings: Settings, args: argparse.Namespace) -> int:
    async with connected(settings) as streams:
        await Admission(streams, settings.max_queued_sessions).admit()
        upload = await open_file_session(
            streams, settings, args.file, source_kind="file", respond=args.respond
        )
        pump = asyncio.create_task(upload.pump(realtime=args.realtime))
        try:
            error = await asyncio.wait_for(_print_events(streams, upload.session, args), args.timeout)
        except TimeoutError as e:
            raise RawwaveError(f"session {upload.session}: no result within {args.timeout:g} s") from e
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
    if error:
        raise RawwaveError(f"session {upload.session} ended in error: {error}")
    return 0


async def _print_events(streams: Streams, session: str, args: argparse.Namespace) -> str:
    """Print as events arrive; returns the error message if the session reported one."""
    error = ""
    async for event in follow_events(streams, session):
        if event.type == "error":
            error = f"{event.code}: {event.message}"
        if args.json:
            write_event(event)
        else:
            _print_text(event, args.respond)
    return error


def _print_text(event: Event, respond: bool) -> None:
    if event.type == "final":
        write_line(event.text)
    elif respond and event.type == "response.delta":
        sys.stdout.write(event.text)
        sys.stdout.flush()
    elif respond and event.type == "response.done":
        write_line("")
