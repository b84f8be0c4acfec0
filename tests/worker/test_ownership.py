"""The worker against the suite's real Redis, in process: streaming end to end, poison, dead letters."""

from __future__ import annotations

import asyncio

import pytest
import redis as sync_redis

from rawwave import contract
from rawwave.settings import Settings, load_settings
from rawwave.streams import Streams
from tests.conftest import free_port
from tests.worker.conftest import (
    collect_events,
    offline_events,
    push_audio,
    push_session,
    read_wav,
    speech_like,
    wav_bytes,
)
from worker.metrics import WorkerMetrics, serve_health
from worker.ownership import Worker
from worker.runtime import Runtime

TALK = [("speech", 1.2), ("silence", 0.9), ("speech", 0.8), ("silence", 0.2)]


async def test_wav_streamed_through_redis_equals_offline_decode(
    streams: Streams, running_worker: Worker, runtime: Runtime
) -> None:
    pcm = read_wav(wav_bytes(speech_like(TALK, seed=1)))
    await push_session(streams, "talk1", pcm, chunk_bytes=3200)
    events = await collect_events(streams, "talk1")
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    stable = ""
    for event in events:
        if event.type == "partial":
            assert event.stable.startswith(stable)
            stable = event.stable
        elif event.type == "final":
            assert event.text.startswith(stable)
            stable = ""
    assert events == offline_events(runtime, running_worker.options, "talk1", pcm)
    for _ in range(100):  # `done` is published just before the announce entry is acked
        if await streams.pending_count() == 0:
            break
        await asyncio.sleep(0.02)
    assert await streams.pending_count() == 0


async def test_concurrent_sessions_batched_publish_their_unbatched_events(
    streams: Streams, worker_settings: Settings, runtime: Runtime
) -> None:
    """With batching on, several sessions of different lengths at once share decoder calls, and each
    publishes exactly what it publishes decoded alone, unbatched."""
    settings = load_settings(**{**worker_settings.model_dump(), "batching": True})
    worker = Worker(settings, runtime, Streams.connect(settings), WorkerMetrics())
    assert worker.batcher is not None and worker.pool._max_workers == settings.max_sessions_per_worker
    task = asyncio.create_task(worker.run())
    talks = [TALK, [("speech", 2.1), ("silence", 0.3)], [("speech", 0.6)], [*TALK, ("speech", 1.4)]]
    pcms = [read_wav(wav_bytes(speech_like(talk, seed=20 + i))) for i, talk in enumerate(talks)]
    await asyncio.gather(*(push_session(streams, f"b{i}", pcm) for i, pcm in enumerate(pcms)))
    for i, pcm in enumerate(pcms):
        alone = offline_events(runtime, worker.options, f"b{i}", pcm)
        assert await collect_events(streams, f"b{i}") == alone
    assert worker.batcher.stats.batched > 0
    worker.stop()
    await asyncio.wait_for(task, 30)
    await worker.streams.close()


async def test_batching_is_off_by_default(running_worker: Worker) -> None:
    assert running_worker.batcher is None
    assert running_worker.pool._max_workers == running_worker.settings.inference_threads


async def test_poison_audio_gets_an_error_and_the_next_session_works(
    streams: Streams, running_worker: Worker, settings: Settings
) -> None:
    await push_session(streams, "poison", b"", end=False)
    raw = sync_redis.Redis.from_url(settings.redis_url)
    raw.xadd(
        contract.audio_key("poison"),
        {b"v": b"1", b"seq": b"1", b"kind": b"chunk", b"pcm": b"\x00" * 3},
        id="0-1",
    )
    events = await collect_events(streams, "poison")
    assert [e.type for e in events] == ["error", "done"]
    assert events[0].code == "bad_audio"
    pcm = speech_like([("speech", 0.5)]).tobytes()
    await push_session(streams, "healthy", pcm)
    assert [e.type for e in await collect_events(streams, "healthy")][-2:] == ["final", "done"]


async def test_malformed_announce_is_dead_lettered(
    streams: Streams, running_worker: Worker, settings: Settings
) -> None:
    raw = sync_redis.Redis.from_url(settings.redis_url)
    raw.xadd(contract.announce_key(0), {b"v": b"1", b"json": b"{not json"})
    for _ in range(100):
        if await streams.read_dead_letters():
            break
        await asyncio.sleep(0.05)
    [letter] = await streams.read_dead_letters()
    assert "malformed announce" in letter.reason
    await push_session(streams, "after", speech_like([("speech", 0.4)]).tobytes())
    assert (await collect_events(streams, "after"))[-1].type == "done"


async def test_too_many_deliveries_dead_letter_with_the_reason(
    worker_settings: Settings, runtime: Runtime, streams: Streams
) -> None:
    await push_session(streams, "cursed", speech_like([("speech", 0.4)]).tobytes())
    [claim] = await streams.claim_new("ghost", count=1, block_ms=100)  # a worker that dies at once
    assert claim.session == "cursed"
    strict = load_settings(**{**worker_settings.model_dump(), "max_deliveries": 1})
    own = Streams.connect(strict)
    worker = Worker(strict, runtime, own, WorkerMetrics())
    task = asyncio.create_task(worker.run())
    try:
        events = await collect_events(streams, "cursed", timeout_s=15)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await own.close()
    assert [e.type for e in events] == ["error", "done"]
    assert events[0].code == "dead_letter"
    [letter] = await streams.read_dead_letters()
    assert letter.session == "cursed" and letter.deliveries == 2 and "max_deliveries 1" in letter.reason


async def test_respond_session_streams_a_response(streams: Streams, running_worker: Worker) -> None:
    await push_session(streams, "chat", speech_like([("speech", 0.6)]).tobytes(), respond=True)
    kinds = [e.type for e in await collect_events(streams, "chat")]
    assert kinds[-3:] == ["response.delta", "response.done", "done"] or kinds[-2:] == [
        "response.done",
        "done",
    ]
    assert "final" in kinds


async def test_audio_that_stops_arriving_ends_the_session(
    worker_settings: Settings, runtime: Runtime, streams: Streams
) -> None:
    impatient = load_settings(**{**worker_settings.model_dump(), "audio_idle_timeout_s": 0.5})
    own = Streams.connect(impatient)
    worker = Worker(impatient, runtime, own, WorkerMetrics())
    task = asyncio.create_task(worker.run())
    try:
        await push_session(streams, "quiet", speech_like([("speech", 0.2)]).tobytes(), end=False)
        events = await collect_events(streams, "quiet", timeout_s=15)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await own.close()
    assert [e.type for e in events][-2:] == ["error", "done"] and events[-2].code == "lost"


async def test_health_and_metrics_endpoints() -> None:
    metrics = WorkerMetrics()
    metrics.chunks.inc(3)
    ready = {"value": True}
    port = free_port()
    server = await serve_health(port, metrics, lambda: ready["value"], host="127.0.0.1")

    async def get(path: str) -> tuple[str, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return head.split(b"\r\n")[0].decode(), body

    try:
        assert (await get("/livez"))[0].endswith("200 OK")
        assert (await get("/readyz"))[0].endswith("200 OK")
        status, body = await get("/metrics")
        assert status.endswith("200 OK") and b"rawwave_worker_audio_chunks_total 3.0" in body
        ready["value"] = False
        assert "503" in (await get("/readyz"))[0]
    finally:
        server.close()


@pytest.mark.parametrize("unused", [None])
async def test_audio_pushed_after_claim_is_picked_up(
    unused: None, streams: Streams, running_worker: Worker
) -> None:
    pcm = speech_like([("speech", 0.9)]).tobytes()
    parts = [pcm[:6400], pcm[6400:]]
    await push_session(streams, "late", parts[0], end=False)
    await asyncio.sleep(0.3)
    await push_audio(streams, "late", [parts[1]], 2, end=True)
    assert (await collect_events(streams, "late"))[-1].type == "done"
