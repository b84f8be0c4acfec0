"""Real `rawwave worker` processes: kill -9 mid-session and SIGTERM lose nothing and duplicate nothing."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rawwave.settings import Settings
from rawwave.streams import Streams
from tests.conftest import REPO
from tests.worker.conftest import (
    chunks,
    collect_events,
    offline_events,
    push_audio,
    push_session,
    runtime_settings,
    speech_like,
    wait_for_event,
)
from worker.runtime import Runtime
from worker.session import StreamingOptions

pytestmark = pytest.mark.e2e
TALK = [("speech", 1.6), ("silence", 0.9), ("speech", 1.2), ("silence", 0.3)]


class Workers:
    """Starts `python -m rawwave.cli worker` processes on the suite's Redis."""

    def __init__(self, settings: Settings, model_dir: Path, logs: Path) -> None:
        self.settings, self.model_dir, self.logs = settings, model_dir, logs
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        variables = {
            "RAWWAVE_REDIS_URL": str(self.settings.redis_url),
            "RAWWAVE_STATE_DIR": str(self.settings.state_dir),
            "RAWWAVE_MODEL_DIR": str(self.model_dir),
            "RAWWAVE_WORKER_NAME": name,
            "RAWWAVE_RECLAIM_IDLE_MS": "1000",
            "RAWWAVE_ORT_INTRA_THREADS": "1",
            "RAWWAVE_INFERENCE_THREADS": "1",
            "RAWWAVE_LOG_FORMAT": "json",
        }
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "rawwave.cli", "worker"],
            cwd=REPO, env={**os.environ, **variables, **env}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.processes.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def workers(settings: Settings, model_dir: Path, tmp_path: Path) -> Iterator[Workers]:
    group = Workers(settings, model_dir, tmp_path)
    yield group
    group.stop_all()


async def wait_ready(streams: Streams, name: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while await streams.heartbeat_of(name) is None:
        assert time.monotonic() < deadline, f"worker {name} never sent a heartbeat"
        await asyncio.sleep(0.1)


def expected(runtime: Runtime, session: str, pcm: bytes) -> list:
    options = StreamingOptions.of(runtime.config, runtime_settings())
    return offline_events(runtime, options, session, pcm)


async def start_mid_session(streams: Streams, workers: Workers, session: str, pcm: bytes, **env: str):
    """Worker A owns the session and has published a partial; half of the audio is still to come."""
    owner = workers.start("worker-a", **env)
    await wait_ready(streams, "worker-a")
    parts = chunks(pcm, 3200)
    half = len(parts) // 2
    await push_session(streams, session, b"".join(parts[:half]), chunk_bytes=3200, end=False)
    await wait_for_event(streams, session, "partial")
    return owner, parts[half:], half + 1


def assert_exactly_once(events: list, reference: list) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events == reference


async def test_kill_9_mid_session_another_worker_completes_it(
    streams: Streams, workers: Workers, runtime: Runtime
) -> None:
    pcm = speech_like(TALK, seed=11).tobytes()
    owner, rest, next_seq = await start_mid_session(streams, workers, "crash", pcm)
    owner.kill()
    owner.wait()
    await push_audio(streams, "crash", rest, next_seq, end=True)
    workers.start("worker-b")
    events = await collect_events(streams, "crash", timeout_s=40)
    assert_exactly_once(events, expected(runtime, "crash", pcm))
    assert re.search(r'"published": [1-9].*replaying reclaimed session', workers.log("worker-b"))


async def test_sigterm_drains_the_live_session(streams: Streams, workers: Workers, runtime: Runtime) -> None:
    pcm = speech_like(TALK, seed=12).tobytes()
    owner, rest, next_seq = await start_mid_session(
        streams, workers, "drain", pcm, RAWWAVE_DRAIN_TIMEOUT_S="20"
    )
    owner.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    await push_audio(streams, "drain", rest, next_seq, end=True)
    events = await collect_events(streams, "drain", timeout_s=30)
    assert await asyncio.to_thread(owner.wait, 20) == 0
    assert_exactly_once(events, expected(runtime, "drain", pcm))
    assert "worker stopped" in workers.log("worker-a")


async def test_sigterm_deadline_hands_the_session_over(
    streams: Streams, workers: Workers, runtime: Runtime
) -> None:
    pcm = speech_like(TALK, seed=13).tobytes()
    owner, rest, next_seq = await start_mid_session(
        streams, workers, "handoff", pcm, RAWWAVE_DRAIN_TIMEOUT_S="0.2"
    )
    owner.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(owner.wait, 20) == 0
    await push_audio(streams, "handoff", rest, next_seq, end=True)
    workers.start("worker-b")
    events = await collect_events(streams, "handoff", timeout_s=40)
    assert_exactly_once(events, expected(runtime, "handoff", pcm))
    assert "session handed back" in workers.log("worker-a")
    assert "replaying reclaimed session" in workers.log("worker-b")
