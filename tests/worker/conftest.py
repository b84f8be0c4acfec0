"""Worker test fixtures: a real exported model directory and real ONNX Runtime sessions.

The model is checkpoints/default (the trained default model) when it exists, else a tiny random
gemma4_unified + MTP assistant built with export/tiny.py. The tiny target gets an untied LM head: a
random tied head only copies its input token, an untied one writes varied, audio-dependent text.
The directory lives under tests/artifacts/ (git-ignored) and the exporter skips an up-to-date export,
so only the first run pays for it. (Tests may import export/ and torch; worker/ never does.)
"""

from __future__ import annotations

import asyncio
import io
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from rawwave import contract
from rawwave.settings import Settings, load_settings
from rawwave.streams import Streams
from tests.conftest import REPO
from worker.metrics import WorkerMetrics
from worker.ownership import Worker
from worker.runtime import Runtime
from worker.session import StreamingOptions, StreamingSession

ARTIFACTS = REPO / "tests" / "artifacts"
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "default"
SAMPLE_RATE = contract.SAMPLE_RATE


def _build_tiny_checkpoint(path: Path) -> tuple[Path, Path]:
    import torch

    from export.assistant import Assistant
    from export.checkpoint import save_assistant, save_model
    from export.model import Gemma4Unified, with_text
    from export.tiny import tiny_assistant_config, tiny_config, write_tiny_tokenizer

    torch.manual_seed(0)
    model = Gemma4Unified(with_text(tiny_config(vision=False), tie_word_embeddings=False))
    checkpoint, assistant_dir = path / "model", path / "assistant"
    save_model(model, checkpoint)
    write_tiny_tokenizer(checkpoint / "tokenizer.json")
    save_assistant(Assistant(tiny_assistant_config(model.cfg)), assistant_dir)
    return checkpoint, assistant_dir


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from export.exporter import export_model

    if (DEFAULT_CHECKPOINT / "config.json").is_file():
        candidates = (DEFAULT_CHECKPOINT / "assistant", REPO / "checkpoints" / "default-assistant")
        assistant = next((p for p in candidates if (p / "config.json").is_file()), None)
        out = ARTIFACTS / "worker-default-model"
        export_model(DEFAULT_CHECKPOINT, out, assistant)
        return out
    checkpoint, assistant = _build_tiny_checkpoint(ARTIFACTS / "worker-tiny-checkpoint")
    out = ARTIFACTS / "worker-tiny-model"
    export_model(checkpoint, out, assistant)
    return out


def runtime_settings(**overrides: object) -> Settings:
    base = {"ort_intra_threads": 1, "ort_inter_threads": 1}
    return Settings(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def runtime(model_dir: Path) -> Runtime:
    return Runtime(model_dir, runtime_settings())


# -- audio ---------------------------------------------------------------------------------------


def speech_like(seconds: list[tuple[str, float]], seed: int = 0) -> np.ndarray:
    """s16 audio from ("speech" | "silence", seconds) parts: loud shaped noise or digital silence."""
    rng = np.random.default_rng(seed)
    parts = []
    for kind, duration in seconds:
        n = int(duration * SAMPLE_RATE)
        if kind == "silence":
            parts.append(np.zeros(n))
        else:
            t = np.arange(n) / SAMPLE_RATE
            envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
            parts.append(rng.normal(size=n) * 4000 * envelope + 3000 * np.sin(2 * np.pi * 220 * t))
    return np.clip(np.concatenate(parts), -32768, 32767).astype(np.int16)


def wav_bytes(pcm: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    return buffer.getvalue()


def read_wav(data: bytes) -> bytes:
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SAMPLE_RATE, 1, 2)
        return w.readframes(w.getnframes())


def offline_events(
    runtime: Runtime, options: StreamingOptions, session: str, pcm: bytes, respond: bool = False
):
    """The whole audio through one fresh session at once: the reference a stream must reproduce."""
    s = StreamingSession(runtime, options, session, respond)
    s.feed(pcm)
    s.end()
    events = []
    while batch := s.step():
        events += batch
    return events


def chunks(pcm: bytes, size: int) -> list[bytes]:
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


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
