"""The interleaved streaming session (worker/interleaved.py) on a real exported model: the suite's when it
streams in the interleaved format, else the tiny random model declared interleaved. Its words are exactly
what the training code's reference decode writes, however the audio is chunked; partials are never revised."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from export.checkpoint import load_model
from export.train import greedy_interleaved
from rawwave.contract import FinalEvent, PartialEvent
from tests.models import DEFAULT_CHECKPOINT, export_tiny_interleaved_model
from tests.worker.conftest import offline_events, runtime_settings, speech_like, streamed
from worker.interleaved import InterleavedSession, open_session
from worker.runtime import Runtime
from worker.session import Prompt, StreamingOptions

TALK = [("speech", 1.5), ("silence", 1.2), ("speech", 1.3), ("silence", 0.3)]


@pytest.fixture(scope="module")
def interleaved_dir(runtime: Runtime) -> Path:
    if runtime.config.streaming.format == "interleaved":
        return runtime.model_dir
    return export_tiny_interleaved_model()


@pytest.fixture(scope="module")
def runtime(runtime: Runtime, interleaved_dir: Path) -> Runtime:
    return runtime if runtime.model_dir == interleaved_dir else Runtime(interleaved_dir, runtime_settings())


@pytest.fixture(scope="module")
def options(runtime: Runtime) -> StreamingOptions:
    return StreamingOptions.of(runtime.config, runtime_settings(endpoint_silence_ms=800))


def test_the_model_directory_picks_the_scheme(runtime: Runtime, options: StreamingOptions) -> None:
    assert options.format == "interleaved"
    assert isinstance(open_session(runtime, options, "s1", False), InterleavedSession)


def test_same_audio_same_events_however_chunked(runtime: Runtime, options: StreamingOptions) -> None:
    pcm = speech_like(TALK).tobytes()
    reference = offline_events(runtime, options, "s1", pcm)
    for size in (1280, 6400, 12346):
        assert streamed(runtime, options, pcm, size) == reference


def test_words_are_the_reference_decode_of_the_chunks(runtime: Runtime, options: StreamingOptions) -> None:
    """One turn's final is what export/train.py's PyTorch decode writes chunk by chunk (the checkpoint
    the export came from), so worker and training agree on the format."""
    checkpoint = DEFAULT_CHECKPOINT if runtime.model_dir.name == "default-model" else None
    checkpoint = checkpoint or runtime.model_dir.parent / "tiny-interleaved-checkpoint" / "model"
    model = load_model(checkpoint).eval()
    prefix = Prompt.of(runtime, respond=False).prefix
    whole = dataclasses.replace(options, endpoint_frames=0)
    for seed in range(3):
        pcm = speech_like([("speech", 0.6 + 0.45 * seed)], seed=seed)
        frames = np.pad(pcm, (0, -len(pcm) % options.frame_samples)).astype(np.float32) / 32768
        frames = frames.reshape(-1, options.frame_samples)
        want = greedy_interleaved(model, runtime.tokenizer, frames, options.chunk_frames, prefix=prefix,
                                  stops=(*runtime.config.tokens.eos, *runtime.encode("\n")))  # fmt: skip
        finals = [e.text for e in offline_events(runtime, whole, "s1", pcm.tobytes()) if e.type == "final"]
        assert finals == [want]


def test_partials_grow_and_are_never_revised(runtime: Runtime, options: StreamingOptions) -> None:
    events = offline_events(runtime, options, "s1", speech_like(TALK, seed=3).tobytes())
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].type == "done"
    text, revision = "", 0
    for event in events:
        if isinstance(event, PartialEvent):
            assert event.stable == event.text and event.text.startswith(text) and event.text != text
            assert event.revision == revision + 1
            text, revision = event.text, event.revision
        elif isinstance(event, FinalEvent):
            assert event.text.startswith(text)
            text, revision = "", 0


def test_partials_come_at_chunk_boundaries(runtime: Runtime, options: StreamingOptions) -> None:
    chunk_ms = options.chunk_frames * options.frame_ms
    events = offline_events(runtime, options, "s1", speech_like(TALK, seed=4).tobytes())
    finals = [e.t_ms for e in events if e.type == "final"]
    assert len(finals) == 2 and 2300 <= finals[0] <= 2400  # 1.5 s of speech + 800 ms of silence
    for e in events:
        if e.type == "partial":  # a turn's chunks start where the turn starts
            assert any((e.t_ms - start) % chunk_ms == 0 for start in (0, finals[0]))


def test_a_turn_ends_at_max_audio_with_every_word_kept(runtime: Runtime, options: StreamingOptions) -> None:
    short = dataclasses.replace(options, max_frames=50, endpoint_frames=0)  # 2 s
    events = offline_events(runtime, short, "s1", speech_like([("speech", 4.48)]).tobytes())
    assert [e.t_ms for e in events if e.type == "final"] == [2000, 4000, 4480]


def test_respond_streams_a_response_after_the_final(runtime: Runtime, options: StreamingOptions) -> None:
    pcm = speech_like([("speech", 1.0)]).tobytes()
    events = offline_events(runtime, options, "s1", pcm, respond=True)
    kinds = [e.type for e in events]
    assert kinds[-1] == "done" and kinds[-2] == "response.done"
    assert kinds.index("final") < kinds.index("response.done")
    assert events[-2].text.startswith("".join(e.text for e in events if e.type == "response.delta"))
    assert streamed(runtime, options, pcm, 3200, respond=True) == events


def test_mtp_does_not_change_events(runtime: Runtime, options: StreamingOptions) -> None:
    assert runtime.drafter is not None
    pcm = speech_like(TALK, seed=5).tobytes()
    plain = dataclasses.replace(options, mtp=False)
    for respond in (False, True):
        assert offline_events(runtime, plain, "s1", pcm, respond) == offline_events(
            runtime, options, "s1", pcm, respond
        )
