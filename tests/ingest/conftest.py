"""Ingest fixtures: speech synthesized once (espeak-ng) in several formats, and a real ingest server."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from ingest.server import build_app
from ingest.state import INGEST_KEY, Ingest
from rawwave.logs import configure_logging
from rawwave.settings import Settings, load_settings
from rawwave.streams import Streams

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEECH_TEXT = "the quick brown fox jumps over the lazy dog"
# name -> ffmpeg output options; every one decodes to (nearly) the same 16 kHz mono PCM
FORMATS = {
    "wav": ["-ar", "44100", "-ac", "2"],  # ffmpeg's upmix is 3 dB down in each channel
    "flac": ["-ar", "48000"],
    "ogg": ["-c:a", "libopus", "-ar", "48000"],
    "mp3": ["-c:a", "libmp3lame", "-ar", "22050"],
    "m4a": ["-c:a", "aac", "-ar", "32000"],
}


@pytest.fixture(autouse=True)
def _logs_to_stderr() -> None:
    """As a real entry point does: log lines on stderr, so stdout holds only CLI output (again for
    every test: `rawwave.cli.main` re-configures logging onto a stream that capsys then closes)."""
    configure_logging(load_settings(log_format="console", log_level="info"))


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (shutil.which("espeak-ng") and shutil.which("ffmpeg") and shutil.which("sox")):
        pytest.fail("espeak-ng, ffmpeg and sox are needed: apt-get install espeak-ng ffmpeg sox")
    folder = tmp_path_factory.mktemp("audio")
    _run("espeak-ng", "-w", str(folder / "espeak.wav"), SPEECH_TEXT)
    _run("sox", str(folder / "espeak.wav"), "-r", "16000", "-b", "16", str(folder / "speech.wav"))
    for name, options in FORMATS.items():
        _run(
            "ffmpeg",
            "-loglevel",
            "error",
            "-y",
            "-i",
            str(folder / "speech.wav"),
            *options,
            str(folder / f"s.{name}"),
        )
    # dual mono at 44.1 kHz: sox copies the channel without attenuation, so its mean is the original
    _run("sox", str(folder / "speech.wav"), "-r", "44100", str(folder / "dual.wav"), "remix", "1", "1")
    return folder


@pytest.fixture(scope="session")
def speech_wav(audio_dir: Path) -> Path:
    """2.8 s of 16 kHz mono speech."""
    return audio_dir / "speech.wav"


@pytest.fixture
def ingest_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"ice_host_addresses": ["127.0.0.1"], "host": "127.0.0.1", "port": 0})


@dataclass
class Server:
    url: str
    app: web.Application
    http: aiohttp.ClientSession

    @property
    def ingest(self) -> Ingest:
        return self.app[INGEST_KEY]


async def start_server(settings: Settings) -> tuple[web.AppRunner, str]:
    app = build_app(settings, Streams.connect(settings))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def server(ingest_settings: Settings) -> AsyncIterator[Server]:
    runner, url = await start_server(ingest_settings)
    async with aiohttp.ClientSession() as http:
        yield Server(url, runner.app, http)
    await runner.cleanup()
