"""Push audio files into the queue: each becomes a session; its id is printed as soon as it exists.

Files are decoded locally (any format FFmpeg reads), resampled to 16 kHz mono and appended to
Redis directly; a worker picks the session up while the rest of the audio is still arriving.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from ingest.admission import Admission
from ingest.audio_files import BadAudioError
from ingest.client import connected, write_line
from ingest.file_session import open_file_session
from rawwave.errors import RawwaveError
from rawwave.settings import Settings
from rawwave.streams import Streams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files (any format FFmpeg reads)")
    parser.add_argument("--realtime", action="store_true", help="pace the audio as if it were live")
    parser.add_argument("--respond", action="store_true", help="ask for a response after the transcript")


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(push_all(settings, args.files, realtime=args.realtime, respond=args.respond))


async def push_all(
    settings: Settings, files: list[str], realtime: bool = False, respond: bool = False
) -> int:
    """Push each file in turn; a bad file is reported on stderr and the rest still go."""
    failed = 0
    async with connected(settings) as streams:
        admission = Admission(streams, settings.max_queued_sessions)
        for path in files:
            try:
                await admission.admit()  # QueueFullError stops here: the rest would be refused too
                await push_one(streams, settings, path, realtime=realtime, respond=respond)
            except BadAudioError as e:
                if len(files) == 1:
                    raise
                sys.stderr.write(f"rawwave: {e}\n")
                failed += 1
    if failed:
        raise RawwaveError(f"{failed} of {len(files)} files were not pushed")
    return 0


async def push_one(
    streams: Streams, settings: Settings, path: str, realtime: bool = False, respond: bool = False
) -> str:
    session = await open_file_session(streams, settings, path, source_kind="file", respond=respond)
    write_line(session.session)
    await session.pump(realtime=realtime)
    return session.session
