"""Test helpers every folder shares: a real exported model directory, and 16 kHz s16 WAV audio.

The model is checkpoints/default (the trained default model) when it exists, with its MTP assistant
from checkpoints/default/assistant or checkpoints/default-assistant when one is there; else a tiny
random gemma4_unified + MTP assistant built with export/tiny.py. The tiny target gets an untied LM
head: a random tied head only copies its input token, an untied one writes varied, audio-dependent
text. The directory lives under tests/artifacts/ (git-ignored) and the exporter skips an up-to-date
export, so only the first run pays for it. (Tests may import export/ and torch; worker/ never does.)
"""

from __future__ import annotations

import io
import wave
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rawwave import contract
from rawwave.settings import Settings

if TYPE_CHECKING:  # the worker (and onnxruntime) load only when a test runs a model
    from worker.runtime import Runtime
    from worker.session import StreamingOptions

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "default"
DEFAULT_ASSISTANTS = (DEFAULT_CHECKPOINT / "assistant", REPO / "checkpoints" / "default-assistant")
SAMPLE_RATE = contract.SAMPLE_RATE


# -- the model directory -------------------------------------------------------------------------


def export_test_model() -> Path:
    """The model directory the tests run: checkpoints/default exported, else the tiny random model."""
    from export.exporter import export_model

    if (DEFAULT_CHECKPOINT / "config.json").is_file():
        assistant = next((p for p in DEFAULT_ASSISTANTS if (p / "config.json").is_file()), None)
        out = ARTIFACTS / "default-model"
        export_model(DEFAULT_CHECKPOINT, out, assistant)
        return out
    return export_tiny_model()


def export_tiny_model() -> Path:
    """The tiny random model with its MTP drafter (for tests that need a drafter the default lacks)."""
    from export.exporter import export_model

    checkpoint, assistant = build_tiny_checkpoint(ARTIFACTS / "tiny-checkpoint")
    out = ARTIFACTS / "tiny-model"
    export_model(checkpoint, out, assistant)
    return out


def export_tiny_interleaved_model() -> Path:
    """The tiny random model and drafter, declared as trained in the interleaved streaming format (its
    rawwave_runtime.json), so that worker.interleaved runs whatever format the default model has."""
    import json

    from export.exporter import TRAINER_FILE, export_model

    checkpoint, assistant = build_tiny_checkpoint(ARTIFACTS / "tiny-interleaved-checkpoint")
    user = "<bos><|turn>user\n"
    overrides = {
        "prompt": {"transcribe_prefix": user + "Transcribe the audio.",
                   "respond_prefix": user + "Transcribe the audio, then respond.",
                   "audio_suffix": "<turn|>\n<|turn>model\n"},
        "streaming": {"format": "interleaved", "chunk_frames": 4},
    }  # fmt: skip
    (checkpoint / TRAINER_FILE).write_text(json.dumps(overrides))
    out = ARTIFACTS / "tiny-interleaved-model"
    export_model(checkpoint, out, assistant)
    return out


def build_tiny_checkpoint(path: Path) -> tuple[Path, Path]:
    """A tiny random target (untied head) and MTP assistant in the HF layout; returns both folders."""
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


def export_vision_model() -> Path:
    """The tiny random model with vision (no drafter), for the image tests: the default model has none."""
    from export.exporter import export_model

    checkpoint = build_tiny_vision_checkpoint(ARTIFACTS / "tiny-vision-checkpoint")
    out = ARTIFACTS / "tiny-vision-model"
    export_model(checkpoint, out)
    return out


def build_tiny_vision_checkpoint(path: Path) -> Path:
    """The tiny target with vision and an untied head. Its X/Y position tables get 280 random rows (a
    zero table would hide a wrong patch position; 280 merged patches is the longest side of an image)."""
    from dataclasses import replace

    import torch

    from export.checkpoint import save_model
    from export.exporter import MAX_SOFT_TOKENS
    from export.model import Gemma4Unified, with_text
    from export.tiny import tiny_config, write_tiny_tokenizer

    torch.manual_seed(0)
    cfg = with_text(tiny_config(vision=True), tie_word_embeddings=False)
    assert cfg.vision is not None
    model = Gemma4Unified(replace(cfg, vision=replace(cfg.vision, mm_posemb_size=MAX_SOFT_TOKENS)))
    assert model.embed_vision is not None
    with torch.no_grad():
        model.embed_vision.pos_embedding.normal_()
    save_model(model, path)
    write_tiny_tokenizer(path / "tokenizer.json")
    return path


def runtime_settings(**overrides: object) -> Settings:
    """Settings for an in-process Runtime: one ONNX Runtime thread each way."""
    base = {"ort_intra_threads": 1, "ort_inter_threads": 1}
    return Settings(**{**base, **overrides})  # type: ignore[arg-type]


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
    """16 kHz mono s16 samples as a WAV file."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    return buffer.getvalue()


def read_wav(data: bytes) -> bytes:
    """The PCM of a 16 kHz mono s16 WAV file (anything else fails)."""
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SAMPLE_RATE, 1, 2)
        return w.readframes(w.getnframes())


def offline_events(
    runtime: Runtime, options: StreamingOptions, session: str, pcm: bytes, respond: bool = False
) -> list[contract.Event]:
    """The whole audio through one fresh worker session at once: the reference a stream must reproduce."""
    from worker.interleaved import open_session

    s = open_session(runtime, options, session, respond)
    s.feed(pcm)
    s.end()
    events: list[contract.Event] = []
    while batch := s.step():
        events += batch
    return events
