"""Worker test fixtures: real ONNX Runtime sessions on the suite's model directory (`model_dir`, in
tests/conftest.py), and helpers that push a session's audio and collect its events through Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rawwave import contract
from rawwave.settings import Settings, load_settings
from rawwave.streams import Streams
from tests.models import (
    SAMPLE_RATE,
    export_tiny_model,
    offline_events,
    read_wav,
    runtime_settings,
    speech_like,
    wav_bytes,
)
from worker.interleaved import open_session
from worker.metrics import WorkerMetrics
from worker.ownership import Worker
from worker.runtime import Runtime
from worker.session import StreamingOptions

# re-exported: the worker tests import these from here
__all__ = ["SAMPLE_RATE", "offline_events", "read_wav", "runtime_settings", "speech_like", "wav_bytes"]


@pytest.fixture(scope="session")
def runtime(model_dir: Path) -> Runtime:
    return Runtime(model_dir, runtime_settings())


@pytest.fixture(scope="session")
def drafter_model_dir(model_dir: Path) -> Path:
    """A model directory with an MTP drafter: the suite's when it has one, else the tiny random model
    (the default checkpoint may come without its assistant)."""
    if (model_dir / "drafter.onnx").is_file():
        return model_dir
    return export_tiny_model()


@pytest.fixture(scope="session")
def drafter_runtime(runtime: Runtime, model_dir: Path, drafter_model_dir: Path) -> Runtime:
    return runtime if drafter_model_dir == model_dir else Runtime(drafter_model_dir, runtime_settings())


def chunks(pcm: bytes, size: int) -> list[bytes]:
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


def streamed(runtime: Runtime, options: StreamingOptions, pcm: bytes, size: int, respond: bool = False):
    """The audio fed in `size`-byte pieces to one worker session (the model's scheme), stepping after
    each as a live session does; every event until done."""
    session = open_session(runtime, options, "s1", respond)
    events = []
    for part in chunks(pcm, size):
        session.feed(part)
        while batch := session.step():
            events += batch
    session.end()
    while batch := session.step():
        events += batch
    assert session.done
    return events


# -- Redis side ----------------------------------------------------------------------------------


async def push_session(
    streams: Streams,
    session: str,
    pcm: bytes,
    chunk_bytes: int = 6400,
    respond: bool = False,
    end: bool = True,
) -> int:
    """Announce a session and append its audio (and the end marker); returns the last audio seq."""
    await streams.announce(contract.SessionAnnounce(session=session, source="file", respond=respond,
                                                    created_ms=int(time.time() * 1000)))  # fmt: skip
    return await push_audio(streams, session, chunks(pcm, chunk_bytes), 1, end)


async def push_audio(streams: Streams, session: str, parts: list[bytes], first_seq: int, end: bool) -> int:
    seq = first_seq - 1
    for seq, part in enumerate(parts, start=first_seq):
        await streams.append_audio(session, contract.AudioChunk(seq=seq, pcm=part))
    if end:
        seq += 1
        await streams.append_audio(session, contract.AudioEnd(seq=seq))
    return seq


async def collect_events(streams: Streams, session: str, timeout_s: float = 30.0) -> list[contract.Event]:
    """Every event of a session until `done` (fails on timeout)."""
    events: list[contract.Event] = []
    deadline = time.monotonic() + timeout_s
    while not events or events[-1].type != "done":
        assert time.monotonic() < deadline, f"no done event after {timeout_s} s: {events[-3:]}"
        events += await streams.read_events(session, events[-1].seq if events else 0, block_ms=200)
    return events


async def wait_for_event(streams: Streams, session: str, kind: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(e.type == kind for e in await streams.read_events(session)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {kind} event for {session} within {timeout_s} s")


@pytest.fixture
def worker_settings(settings: Settings, model_dir: Path) -> Settings:
    overrides = {"model_dir": model_dir, "ort_intra_threads": 1, "reclaim_idle_ms": 1000}
    overrides |= {"worker_name": "test-worker", "inference_threads": 1}
    return load_settings(**{**settings.model_dump(), **overrides})


@pytest.fixture
async def running_worker(worker_settings: Settings, runtime: Runtime) -> AsyncIterator[Worker]:
    """An in-process worker on the suite's Redis, sharing the session's runtime."""
    streams = Streams.connect(worker_settings)
    worker = Worker(worker_settings, runtime, streams, WorkerMetrics())
    task = asyncio.create_task(worker.run())
    yield worker
    worker.stop()
    await asyncio.wait_for(task, 30)
    await streams.close()
