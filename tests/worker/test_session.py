"""The branch-scheme streaming session (worker/session.py) on a real exported model: chunking invariance,
stable prefix, end of turn. The model is the suite's when it streams in the branch format, else the tiny
random one (tests/worker/test_interleaved.py covers the interleaved scheme)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from rawwave.contract import FinalEvent, PartialEvent
from tests.models import export_tiny_model
from tests.worker.conftest import offline_events, runtime_settings, speech_like, streamed
from worker.runtime import Runtime
from worker.session import StreamingOptions, StreamingSession

TALK = [("speech", 1.5), ("silence", 1.2), ("speech", 1.3), ("silence", 0.3)]


@pytest.fixture(scope="module")
def runtime(runtime: Runtime) -> Runtime:
    if runtime.config.streaming.format == "branch":
        return runtime
    return Runtime(export_tiny_model(), runtime_settings())


@pytest.fixture(scope="module")
def options(runtime: Runtime) -> StreamingOptions:
    return StreamingOptions.of(
        runtime.config, runtime_settings(endpoint_silence_ms=800, partial_interval_ms=400)
    )


def test_same_audio_same_events_however_chunked(runtime: Runtime, options: StreamingOptions) -> None:
    pcm = speech_like(TALK).tobytes()
    reference = offline_events(runtime, options, "s1", pcm)
    for size in (1280, 6400, 12346):
        assert streamed(runtime, options, pcm, size) == reference


def test_events_are_contiguous_and_partials_keep_their_promise(
    runtime: Runtime, options: StreamingOptions
) -> None:
    events = offline_events(runtime, options, "s1", speech_like(TALK, seed=3).tobytes())
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].type == "done"
    stable, revision = "", 0
    for event in events:
        if isinstance(event, PartialEvent):
            assert event.stable.startswith(stable) and event.revision > revision
            stable, revision = event.stable, event.revision
        elif isinstance(event, FinalEvent):
            assert event.text.startswith(stable)  # what was stable is in the final
            stable, revision = "", 0


def test_end_pointing_splits_turns_on_silence(runtime: Runtime, options: StreamingOptions) -> None:
    events = offline_events(runtime, options, "s1", speech_like(TALK).tobytes())
    finals = [e for e in events if e.type == "final"]
    assert len(finals) == 2
    assert 2300 <= finals[0].t_ms <= 2400  # 1.5 s speech + 800 ms silence
    without = dataclasses.replace(options, endpoint_frames=0)
    events = offline_events(runtime, without, "s1", speech_like(TALK).tobytes())
    assert [e.type for e in events].count("final") == 1


def test_silence_alone_makes_no_turns(runtime: Runtime, options: StreamingOptions) -> None:
    pcm = speech_like([("silence", 2.0), ("speech", 0.8), ("silence", 0.2)]).tobytes()
    events = offline_events(runtime, options, "s1", pcm)
    assert [e.type for e in events].count("final") == 1
    assert all(e.t_ms > 2000 for e in events if e.type == "partial")


def test_a_segment_never_exceeds_max_audio(runtime: Runtime, options: StreamingOptions) -> None:
    short = dataclasses.replace(options, max_frames=50, endpoint_frames=0)  # 2 s
    parts = [("speech", 1.4), ("silence", 0.3), ("speech", 1.4), ("silence", 0.3), ("speech", 1.0)]
    events = offline_events(runtime, short, "s1", speech_like(parts).tobytes())
    ends = [0] + [e.t_ms for e in events if e.type == "final"]
    assert len(ends) >= 4
    assert all(0 < b - a <= 2000 for a, b in itertools.pairwise(ends))
    assert 1400 <= ends[1] <= 1700  # cut inside the first silence, not at 2.0 s


def test_respond_streams_a_response_after_the_final(runtime: Runtime, options: StreamingOptions) -> None:
    pcm = speech_like([("speech", 1.0)]).tobytes()
    events = offline_events(runtime, options, "s1", pcm, respond=True)
    kinds = [e.type for e in events]
    assert kinds[-1] == "done" and kinds[-2] == "response.done"
    assert kinds.index("final") < kinds.index("response.done")
    deltas = "".join(e.text for e in events if e.type == "response.delta")
    done = events[-2]
    assert done.text.startswith(deltas)
    assert streamed(runtime, options, pcm, 3200, respond=True) == events


def test_mtp_does_not_change_events(runtime: Runtime, options: StreamingOptions) -> None:
    pcm = speech_like(TALK, seed=5).tobytes()
    plain = dataclasses.replace(options, mtp=False)
    assert offline_events(runtime, plain, "s1", pcm) == offline_events(runtime, options, "s1", pcm)


def test_abort_ends_with_error_then_done(runtime: Runtime, options: StreamingOptions) -> None:
    session = StreamingSession(runtime, options, "s1", False)
    events = session.abort("bad_audio", "odd bytes")
    assert [e.type for e in events] == ["error", "done"]
    assert session.done and session.step() == []
