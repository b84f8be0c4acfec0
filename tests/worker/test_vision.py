"""Sessions with an image: the tiny vision model in ONNX Runtime against PyTorch, and through Redis.

The image's soft tokens open the user turn (before the instruction and the audio) and attend each
other both ways on sliding layers; the ORT logits must equal the PyTorch model's for the same prompt,
and a worker session with an image must equal the same session decoded offline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from rawwave import contract
from rawwave.model_dir import ModelDirError
from rawwave.settings import Settings, load_settings
from rawwave.streams import Streams
from tests.models import export_vision_model
from tests.worker.conftest import collect_events, push_audio, runtime_settings, speech_like
from tests.worker.test_image import CASES
from worker.image import image_patches
from worker.metrics import WorkerMetrics
from worker.ownership import Worker
from worker.runtime import Runtime
from worker.session import Prompt, StreamingOptions, StreamingSession, image_soft_tokens

torch = pytest.importorskip("torch")
PICTURE = CASES["landscape_300x500"]  # 12 x 21 merged patches: 252 soft tokens
SPEECH = [("speech", 0.6)]
NO_PARTIALS = {"partial_interval_ms": 60_000}  # the final is then the only decode: plain greedy


@pytest.fixture(scope="module")
def vision_dir() -> Path:
    return export_vision_model()


@pytest.fixture(scope="module")
def vision_runtime(vision_dir: Path) -> Runtime:
    return Runtime(vision_dir, runtime_settings())


@pytest.fixture(scope="module")
def torch_model(vision_dir: Path):
    from export.checkpoint import load_model
    from tests.models import ARTIFACTS

    return load_model(ARTIFACTS / "tiny-vision-checkpoint").eval()


def options(runtime: Runtime, **overrides: object) -> StreamingOptions:
    return StreamingOptions.of(runtime.config, runtime_settings(**overrides))


def torch_prompt(model, runtime: Runtime, image: bytes, pcm: np.ndarray, respond: bool = False):
    """The whole prompt for PyTorch: ids (1, T), embeddings with image and audio in place, image groups."""
    from export.model import image_groups_from_ids

    assert runtime.config.vision is not None
    patches = image_patches(image, runtime.config.vision)
    frames = len(pcm) // runtime.config.frame_samples
    prompt = Prompt.of(runtime, respond, len(patches))
    ids = torch.tensor([[*prompt.prefix, *[runtime.config.tokens.audio] * frames, *prompt.suffix]])
    audio = torch.from_numpy(pcm[: frames * runtime.config.frame_samples].astype(np.float32) / 32768)
    with torch.no_grad():
        pictures = model.embed_vision(
            torch.from_numpy(patches.patches)[None], torch.from_numpy(patches.xy)[None]
        )
        sounds = model.embed_audio(audio.reshape(1, frames, -1))
        embeds = model.embed_inputs(ids, sounds, pictures)  # (1, T, H)
    return ids, embeds, image_groups_from_ids(ids, (runtime.config.tokens.image,))


def torch_logits(model, embeds, groups) -> np.ndarray:
    positions = torch.arange(embeds.shape[1])[None]
    with torch.no_grad():
        return model.decode(embeds, positions, model.empty_past(1), image_groups=groups)[0][0].numpy()


def test_embed_image_equals_pytorch(vision_runtime: Runtime, torch_model) -> None:
    assert vision_runtime.config.vision is not None
    patches = image_patches(PICTURE(), vision_runtime.config.vision)
    ours = vision_runtime.embed_image(patches.patches, patches.xy)  # (N, H)
    with torch.no_grad():
        theirs = torch_model.embed_vision(
            torch.from_numpy(patches.patches)[None], torch.from_numpy(patches.xy)[None]
        )
    assert ours.shape == (len(patches), vision_runtime.config.hidden_size)
    assert np.abs(ours - theirs[0].numpy()).max() < 1e-5


def test_a_vision_spec_that_does_not_match_the_graph_is_refused(vision_dir: Path, tmp_path: Path) -> None:
    from tests.worker.test_runtime import edited_copy

    bad = edited_copy(vision_dir, tmp_path, lambda c: c["vision"].update(patch_size=3))
    with pytest.raises(ModelDirError, match=r"vision graph: vision_embed\.onnx pixel_patches dim -1"):
        Runtime(bad, runtime_settings())


def test_the_image_opens_the_user_turn(vision_runtime: Runtime) -> None:
    tokens = vision_runtime.config.tokens
    prefix = Prompt.of(vision_runtime, respond=False, image_tokens=3).prefix
    expanded = "<bos><|turn>user\n<|image><|image|><|image|><|image|><image|>Transcribe the audio.<|audio>"
    assert prefix == vision_runtime.encode(expanded)
    head = vision_runtime.encode("<bos><|turn>user\n")
    assert prefix[len(head) : len(head) + 5] == [tokens.boi, *[tokens.image] * 3, tokens.eoi]


def test_first_token_logits_equal_pytorch(vision_runtime: Runtime, torch_model) -> None:
    """Prefix with the image (one call, image groups fed), audio, then the suffix: as a session does it."""
    image, pcm = PICTURE(), speech_like(SPEECH, seed=3)
    ids, embeds, groups = torch_prompt(torch_model, vision_runtime, image, pcm)
    prompt = Prompt.of(vision_runtime, False, int((ids == vision_runtime.config.tokens.image).sum()))
    ctx = vision_runtime.start(prompt.prefix, image_soft_tokens(vision_runtime, image))
    frames = len(pcm) // vision_runtime.config.frame_samples
    audio = vision_runtime.embed_audio(pcm[: frames * vision_runtime.config.frame_samples])
    _, _, cache = vision_runtime.extend_embeds(ctx.cache, ctx.length, audio)
    logits, _, _ = vision_runtime.extend(cache, ctx.length + frames, prompt.suffix, keep=1)
    reference = torch_logits(torch_model, embeds, groups)[-1]
    assert np.abs(logits[-1] - reference).max() < 1e-4
    causal = torch_logits(torch_model, embeds, None)[-1]  # the image groups matter: not plain causal
    assert np.abs(causal - reference).max() > 1e-3


def test_session_with_an_image_equals_pytorch_greedy(vision_runtime: Runtime, torch_model) -> None:
    image, pcm = PICTURE(), speech_like(SPEECH, seed=3)
    opts = options(vision_runtime, **NO_PARTIALS)
    session = StreamingSession(vision_runtime, opts, "pic", respond=False, image=image)
    session.feed(pcm.tobytes())
    session.end()
    events = session.step()
    assert [e.type for e in events] == ["final", "done"]
    ids, embeds, groups = torch_prompt(torch_model, vision_runtime, image, pcm)
    tokens = torch_greedy(torch_model, vision_runtime, ids, embeds, groups, session.prompt, opts)
    assert events[0].text == vision_runtime.decode(tokens)
    blind = StreamingSession(vision_runtime, opts, "blind", respond=False)
    blind.feed(pcm.tobytes())
    blind.end()
    assert blind.step()[0].text != events[0].text  # the image changed what the model wrote


def torch_greedy(model, runtime: Runtime, ids, embeds, groups, prompt: Prompt, opts: StreamingOptions):
    """Greedy transcript tokens as the session's stop rule ends them (transcript_end stripped)."""
    tokens: list[int] = []
    end = list(prompt.transcript_stop.end)
    while len(tokens) < opts.max_transcript_tokens:
        token = int(torch_logits(model, embeds, groups)[-1].argmax())
        if prompt.transcript_stop.stops_before(token):
            break
        tokens.append(token)
        if end and tokens[-len(end) :] == end:
            return tokens[: -len(end)]
        with torch.no_grad():
            embeds = torch.cat([embeds, model.embed_tokens(torch.tensor([[token]]))], dim=1)
        groups = torch.cat([groups, torch.tensor([[-1]])], dim=1)
    return tokens


# -- through Redis -------------------------------------------------------------------------------


async def push_with_image(streams: Streams, session: str, image: bytes | None, pcm: np.ndarray) -> None:
    if image is not None:
        await streams.store_image(session, image)
    announce = contract.SessionAnnounce(
        session=session, source="http", has_image=image is not None, created_ms=int(time.time() * 1000)
    )
    await streams.announce(announce)
    data = pcm.tobytes()
    await push_audio(streams, session, [data[i : i + 6400] for i in range(0, len(data), 6400)], 1, True)


async def start_worker(settings: Settings, runtime: Runtime) -> tuple[Worker, asyncio.Task[None]]:
    worker = Worker(settings, runtime, Streams.connect(settings), WorkerMetrics())
    return worker, asyncio.create_task(worker.run())


@pytest.fixture
async def vision_worker(
    worker_settings: Settings, vision_dir: Path, vision_runtime: Runtime
) -> AsyncIterator[Worker]:
    settings = load_settings(**{**worker_settings.model_dump(), "model_dir": vision_dir})
    worker, task = await start_worker(settings, vision_runtime)
    yield worker
    worker.stop()
    await asyncio.wait_for(task, 30)
    await worker.streams.close()


def offline(runtime: Runtime, opts: StreamingOptions, session: str, pcm: np.ndarray, image: bytes):
    s = StreamingSession(runtime, opts, session, respond=False, image=image)
    s.feed(pcm.tobytes())
    s.end()
    events: list[contract.Event] = []
    while batch := s.step():
        events += batch
    return events


async def test_worker_session_with_an_image_equals_offline(
    streams: Streams, vision_worker: Worker, vision_runtime: Runtime
) -> None:
    image, pcm = PICTURE(), speech_like([("speech", 1.3)], seed=5)
    await push_with_image(streams, "seen", image, pcm)
    events = await collect_events(streams, "seen")
    assert events == offline(vision_runtime, vision_worker.options, "seen", pcm, image)
    assert [e.type for e in events][-2:] == ["final", "done"]


async def test_a_replay_rereads_the_image_and_publishes_the_same_events(
    streams: Streams, worker_settings: Settings, vision_dir: Path, vision_runtime: Runtime
) -> None:
    """A worker claims the session, publishes its first events and dies; the next one replays it."""
    image, pcm = PICTURE(), speech_like([("speech", 1.3)], seed=6)
    settings = load_settings(**{**worker_settings.model_dump(), "model_dir": vision_dir})
    expected = offline(
        vision_runtime, StreamingOptions.of(vision_runtime.config, settings), "again", pcm, image
    )
    await push_with_image(streams, "again", image, pcm)
    [claim] = await streams.claim_new("dead-worker", count=1, block_ms=100)
    assert claim.session == "again"
    for event in expected[:2]:  # what the dead owner got out before it died
        await streams.publish(event)
    worker, task = await start_worker(settings, vision_runtime)  # reclaims it once idle (1 s)
    try:
        events = await collect_events(streams, "again")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await worker.streams.close()
    assert events == expected and len(expected) > 3


async def test_a_model_without_vision_refuses_the_image_only(
    streams: Streams, running_worker: Worker, runtime: Runtime
) -> None:
    assert runtime.vision is None
    pcm = speech_like([("speech", 0.5)], seed=7)
    await push_with_image(streams, "blindpic", PICTURE(), pcm)
    await push_with_image(streams, "plain", None, pcm)
    events = await collect_events(streams, "blindpic")
    assert [(e.type, e.seq) for e in events] == [("error", 1), ("done", 2)]
    error = events[0]
    assert isinstance(error, contract.ErrorEvent) and error.code == "no_vision"
    assert f"model '{runtime.model_dir.name}' has no vision" in error.message
    assert [e.type for e in await collect_events(streams, "plain")][-2:] == ["final", "done"]


async def test_a_corrupt_image_fails_its_session_and_the_next_one_works(
    streams: Streams, vision_worker: Worker
) -> None:
    image, pcm = PICTURE(), speech_like([("speech", 0.5)], seed=8)
    await push_with_image(streams, "broken", image[: len(image) // 3], pcm)
    events = await collect_events(streams, "broken")
    assert [e.type for e in events] == ["error", "done"]
    assert isinstance(events[0], contract.ErrorEvent) and events[0].code == "bad_image"
    assert "corrupt image" in events[0].message
    await push_with_image(streams, "fine", image, pcm)
    assert [e.type for e in await collect_events(streams, "fine")][-2:] == ["final", "done"]


async def test_an_image_gone_from_redis_ends_the_session_as_lost(
    streams: Streams, vision_worker: Worker
) -> None:
    pcm = speech_like([("speech", 0.5)], seed=9)
    await streams.announce(contract.SessionAnnounce(session="noimage", source="http", has_image=True,
                                                    created_ms=int(time.time() * 1000)))  # fmt: skip
    await push_audio(streams, "noimage", [pcm.tobytes()], 1, True)
    events = await collect_events(streams, "noimage")
    assert [e.type for e in events] == ["error", "done"] and events[0].code == "lost"
