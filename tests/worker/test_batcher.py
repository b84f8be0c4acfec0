"""Continuous batching on the real exported model: a batched decoder call equals the calls alone, and
sessions stepping concurrently through a Batcher publish exactly the events they publish alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rawwave.contract import Event
from tests.worker.conftest import offline_events, runtime_settings, speech_like
from worker.batcher import Batcher
from worker.interleaved import open_session
from worker.runtime import KvCache, Runtime
from worker.session import StreamingOptions

LOGIT_TOLERANCE = 1e-4  # float rounding of a longer (padded) key axis; measured ~2e-5
TALKS = [  # utterances of different lengths: pasts differ, so rows are padded differently
    [("speech", 1.1), ("silence", 0.9), ("speech", 0.7), ("silence", 0.2)],
    [("speech", 2.3), ("silence", 0.3)],
    [("silence", 0.4), ("speech", 0.9), ("silence", 1.0), ("speech", 1.6)],
    [("speech", 0.5)],
    [("speech", 1.7), ("silence", 0.9), ("speech", 0.4)],
    [("speech", 3.1), ("silence", 0.5), ("speech", 1.2)],
    [("silence", 1.5), ("speech", 0.6)],
    [("speech", 0.8), ("silence", 0.9), ("speech", 0.8), ("silence", 0.9), ("speech", 0.8)],
]


@pytest.fixture(scope="module")
def options(runtime: Runtime) -> StreamingOptions:
    return StreamingOptions.of(runtime.config, runtime_settings(endpoint_silence_ms=800))


def prefilled(runtime: Runtime, length: int, width: int, seed: int) -> tuple[KvCache, int, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(16, runtime.config.vocab_size, length + width).tolist()
    _, _, cache = runtime.extend(runtime.empty_cache(), 0, tokens[:length], keep=1)
    return cache, length, runtime.embed_tokens(tokens[length:])


def test_one_batched_call_equals_the_calls_alone(runtime: Runtime) -> None:
    shapes = [(37, 1, 1), (120, 3, 0), (5, 10, 1), (300, 2, 2), (64, 1, 0)]  # past, new tokens, keep
    calls = [
        (*prefilled(runtime, past, width, seed), keep) for seed, (past, width, keep) in enumerate(shapes)
    ]
    for call, (logits, hidden, cache) in zip(calls, runtime.extend_batch(calls), strict=True):
        alone_logits, alone_hidden, alone_cache = runtime.extend_embeds(*call)
        assert logits.shape == alone_logits.shape and hidden.shape == alone_hidden.shape
        assert np.abs(logits - alone_logits).max() <= LOGIT_TOLERANCE
        assert (logits.argmax(-1) == alone_logits.argmax(-1)).all()
        assert np.abs(hidden - alone_hidden).max() <= LOGIT_TOLERANCE
        for got, want in zip(cache.tensors, alone_cache.tensors, strict=True):
            assert got.shape == want.shape and got.flags.c_contiguous
            assert np.abs(got - want).max() <= LOGIT_TOLERANCE


def concurrent_events(
    runtime: Runtime, options: StreamingOptions, batcher: Batcher, pcms: list[bytes]
) -> list[list[Event]]:
    """Every session in its own thread, stepping frame chunk by chunk through the batcher."""
    start = threading.Barrier(len(pcms))

    def serve(i: int) -> list[Event]:
        session = open_session(runtime, options, f"s{i}", respond=i % 2 == 1, decoder=batcher)
        start.wait()
        events: list[Event] = []
        for offset in range(0, len(pcms[i]), 6400):
            session.feed(pcms[i][offset : offset + 6400])
            with batcher.step():
                while batch := session.step():
                    events += batch
        session.end()
        with batcher.step():
            while batch := session.step():
                events += batch
        return events

    with ThreadPoolExecutor(len(pcms)) as pool:
        return list(pool.map(serve, range(len(pcms))))


@pytest.mark.parametrize("lanes", [1, 2])
def test_batched_sessions_publish_the_unbatched_events(
    runtime: Runtime, options: StreamingOptions, lanes: int
) -> None:
    pcms = [speech_like(talk, seed=i).tobytes() for i, talk in enumerate(TALKS)]
    alone = [offline_events(runtime, options, f"s{i}", pcm, respond=i % 2 == 1) for i, pcm in enumerate(pcms)]
    batcher = Batcher(runtime, lanes=lanes, max_batch=8)
    assert concurrent_events(runtime, options, batcher, pcms) == alone
    assert batcher.stats.batched > 0  # batches really formed


def test_a_gather_window_batches_more_and_changes_nothing(
    runtime: Runtime, options: StreamingOptions
) -> None:
    pcms = [speech_like(talk, seed=10 + i).tobytes() for i, talk in enumerate(TALKS[:3])]
    alone = [offline_events(runtime, options, f"s{i}", pcm, respond=i % 2 == 1) for i, pcm in enumerate(pcms)]
    batcher = Batcher(runtime, lanes=1, max_batch=8, window_ms=5)
    assert concurrent_events(runtime, options, batcher, pcms) == alone


def test_a_lone_call_runs_at_once(runtime: Runtime) -> None:
    batcher = Batcher(runtime, lanes=1, max_batch=8, window_ms=2000)
    cache, length, embeds = prefilled(runtime, 40, 1, seed=3)
    with batcher.step():
        started = time.perf_counter()
        logits, _, _ = batcher.extend_embeds(cache, length, embeds, keep=1)
        assert time.perf_counter() - started < 1.0  # the window only waits for other stepping sessions
    assert np.array_equal(logits, runtime.extend_embeds(cache, length, embeds, keep=1)[0])
    assert (batcher.stats.calls, batcher.stats.batched) == (1, 0)


def test_a_failing_batch_fails_each_of_its_calls_and_frees_the_lane(runtime: Runtime) -> None:
    batcher = Batcher(runtime, lanes=1, max_batch=8)
    cache, length, embeds = prefilled(runtime, 20, 1, seed=4)
    with pytest.raises(Exception, match=r"inputs_embeds|dimension|shape|Got invalid"):
        batcher.extend_embeds(cache, length, embeds[:, :3])  # a wrong hidden size
    assert batcher.free == 1 and not batcher.queue
    assert batcher.extend_embeds(cache, length, embeds, keep=1)[0].shape == (1, runtime.config.vocab_size)
