"""End-to-end fixtures: the README path, for real — `rawwave up --workers 1` (its own redis-server, the
ingest server and one worker, all separate processes) on the suite's exported model, and clients that
find it the way a user's do (the stack's state file), plus one synthesized sentence in several formats.

One stack serves the whole folder, so the model loads once. CPU is scarce (two cores shared with a
training run): one ONNX Runtime thread, one inference thread, a partial every second of audio, a short
sentence, and short responses keep the folder's decoding to a few seconds per session.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from rawwave import contract
from rawwave.contract import Event
from rawwave.local_stack import free_port, read_stack_state
from rawwave.settings import Settings
from tests.models import REPO, offline_events, read_wav, runtime_settings

SENTENCE = "set the thermostat to seventy"
TAIL_SILENCE_S = 1.2  # longer than the model's end-point silence (800 ms): a live mic gets its final
# the worker and the offline reference run by the same numbers
STREAMING_ENV = {"RAWWAVE_PARTIAL_INTERVAL_MS": "1000", "RAWWAVE_MAX_RESPONSE_TOKENS": "16"}
STREAMING = {"partial_interval_ms": 1000, "max_response_tokens": 16}
FORMATS = {  # name -> ffmpeg output options
    "flac": ["-ar", "48000"],
    "ogg": ["-c:a", "libopus", "-ar", "48000"],
    "mp3": ["-c:a", "libmp3lame", "-ar", "22050"],
}
START_TIMEOUT_S = 60.0


# -- audio -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """speech.wav (16 kHz mono: the sentence, then TAIL_SILENCE_S of silence) and s.{flac,ogg,mp3}."""
    if not (shutil.which("espeak-ng") and shutil.which("ffmpeg") and shutil.which("sox")):
        pytest.fail("espeak-ng, ffmpeg and sox are needed: apt-get install espeak-ng ffmpeg sox")
    folder = tmp_path_factory.mktemp("speech")
    _run("espeak-ng", "-w", str(folder / "espeak.wav"), SENTENCE)
    speech = folder / "speech.wav"
    _run("sox", str(folder / "espeak.wav"), "-r", "16000", "-b", "16", "-c", "1", str(speech),
         "pad", "0", str(TAIL_SILENCE_S))  # fmt: skip
    for name, options in FORMATS.items():
        _run("ffmpeg", "-loglevel", "error", "-y", "-i", str(speech), *options, str(folder / f"s.{name}"))
    return folder


@pytest.fixture(scope="session")
def speech_wav(speech_dir: Path) -> Path:
    return speech_dir / "speech.wav"


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


Decode = Callable[[bytes, bool], list[Event]]


@pytest.fixture(scope="session")
def offline(model_dir: Path) -> Decode:
    """decode(pcm, respond): what the same model decodes offline from that audio (session "ref")."""
    from worker.runtime import Runtime
    from worker.session import StreamingOptions

    settings = runtime_settings(**STREAMING)
    runtime = Runtime(model_dir, settings)
    options = StreamingOptions.of(runtime.config, settings)
    return lambda pcm, respond=False: offline_events(runtime, options, "ref", pcm, respond)


@pytest.fixture(scope="session")
def reference(offline: Decode, speech_wav: Path) -> dict[bool, list[Event]]:
    """The offline decode of speech.wav: {respond: events}."""
    pcm = read_wav(speech_wav.read_bytes())
    return {respond: offline(pcm, respond) for respond in (False, True)}


# -- the stack -------------------------------------------------------------------------------------


@dataclass
class Stack:
    """A running `rawwave up`: its ingest URL, its Redis, and the environment its clients use."""

    process: subprocess.Popen[bytes]
    url: str
    redis_url: str
    client_env: dict[str, str]
    log: Path

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`rawwave ARGS` as a user runs it next to the stack (it finds Redis in the state file)."""
        return subprocess.run(
            [sys.executable, "-m", "rawwave.cli", *args],
            cwd=REPO, env=self.client_env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def settings(self) -> Settings:
        return Settings(redis_url=self.redis_url)  # type: ignore[call-arg]

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def clean_env(**variables: str) -> dict[str, str]:
    """This process's environment without any RAWWAVE_ variable, plus `variables`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAWWAVE_")} | variables


@pytest.fixture(scope="session")
def stack(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("stack")
    state_dir = str(folder / "state")
    env = clean_env(
        RAWWAVE_STATE_DIR=state_dir,
        RAWWAVE_MODEL_DIR=str(model_dir),
        RAWWAVE_ORT_INTRA_THREADS="1",
        RAWWAVE_INFERENCE_THREADS="1",
        RAWWAVE_ICE_HOST_ADDRESSES="127.0.0.1",
        RAWWAVE_DRAIN_TIMEOUT_S="2",
        RAWWAVE_LOG_FORMAT="json",
        **STREAMING_ENV,
    )
    port = free_port()
    log = folder / "up.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "rawwave.cli", "up", "--workers", "1", "--port", str(port)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=out,
        )  # fmt: skip
    try:
        running = _wait_until_up(process, Path(state_dir), port, log)
        yield Stack(process, f"http://127.0.0.1:{port}", running, clean_env(RAWWAVE_STATE_DIR=state_dir), log)
    finally:
        _stop(process)


def _wait_until_up(process: subprocess.Popen[bytes], state_dir: Path, port: int, log: Path) -> str:
    """Until ingest answers on its port and the worker has sent a heartbeat; returns the Redis URL."""
    line = process.stdout.readline()  # type: ignore[union-attr]
    assert b"rawwave is up" in line, f"`rawwave up` said {line!r}; log:\n{log.read_text()}"
    state = read_stack_state(state_dir)
    assert state is not None, "`rawwave up` wrote no state file"
    worker = f"{socket.gethostname()}-worker-1"
    deadline = time.monotonic() + START_TIMEOUT_S
    heartbeats = redis.Redis.from_url(state.redis_url)
    while not (_listening(port) and heartbeats.exists(contract.heartbeat_key(worker))):
        assert process.poll() is None, f"`rawwave up` exited; log:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"not ready in {START_TIMEOUT_S:g} s; log:\n{log.read_text()}"
        time.sleep(0.2)
    return state.redis_url


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
