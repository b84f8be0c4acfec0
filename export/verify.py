"""Export-time verification: the ONNX graphs in a model directory against the PyTorch model they came from.

Each check returns its numbers as a dict for manifest.json and raises VerificationError when it fails;
the exporter then leaves nothing behind. What is checked (fp32 tolerance 1e-3 on logits):
- logits:       ORT (embed_tokens + audio_embed + decoder, one prefill) vs PyTorch on a reference prompt;
- incremental:  prefill then one token at a time equals one full prefill, past the sliding window;
- audio:        audio_embed chunk by chunk equals all at once, exactly;
- greedy:       32 greedy tokens after the reference prompt, ORT vs PyTorch, identical;
- drafter / vision: ORT vs PyTorch on the same inputs;
- drafter_steps: one call's drafts equal num_draft_tokens step-graph calls exactly, and PyTorch's within
                tolerance;
- quantized:    top-1 agreement and logit error of a quantized decoder against the unquantized one.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.assistant import Assistant, draft, shared_kv_from_present
from export.model import Gemma4Unified
from export.wrappers import past_names
from rawwave.errors import RawwaveError
from rawwave.model_dir import RuntimeConfig

TOLERANCE = {"fp32": 1e-3, "fp16": 0.1}  # max abs logit difference (logits are softcapped to +-30)
GREEDY_TOKENS = 32
INCREMENTAL_STEPS = 12
MIN_AGREEMENT = 0.97  # top-1 agreement a quantized decoder must reach without --force
AGREEMENT_TOKENS = 256


class VerificationError(RawwaveError):
    """An exported graph does not compute what the PyTorch model computes."""


class OrtModel:
    """The graphs of one model directory, driven the way the worker drives them."""

    def __init__(self, directory: Path, rc: RuntimeConfig, decoder_file: str | None = None):
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # the optional-input defaults warn at every load

        def session(name: str) -> ort.InferenceSession:
            return ort.InferenceSession(str(directory / name), options, providers=["CPUExecutionProvider"])

        self.rc = rc
        self.float = np.float16 if rc.dtype == "fp16" else np.float32
        self.embed_tokens = session(rc.graphs.embed_tokens)
        self.audio_embed = session(rc.graphs.audio_embed)
        self.decoder = session(decoder_file or rc.graphs.decoder)
        self.drafter = session(rc.graphs.drafter) if rc.graphs.drafter else None
        self.drafter_steps = session(rc.graphs.drafter_steps) if rc.graphs.drafter_steps else None
        self.vision = session(rc.graphs.vision_embed) if rc.graphs.vision_embed else None

    def embed(self, ids: np.ndarray, frames: np.ndarray | None = None) -> np.ndarray:
        """ids (1, T) with audio placeholders -> (1, T, H), the placeholders replaced by frame embeddings."""
        is_audio = ids == self.rc.tokens.audio
        x = self.embed_tokens.run(None, {"input_ids": np.where(is_audio, self.rc.tokens.pad, ids)})[0]
        if frames is not None:
            x[is_audio] = self.audio(frames)[0]
        return x

    def audio(self, frames: np.ndarray) -> np.ndarray:
        return self.audio_embed.run(None, {"audio_frames": frames})[0]

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        return [
            np.zeros((batch, layer.kv_heads, 0, layer.head_dim), self.float)
            for layer in self.rc.layers
            for _ in ("key", "value")
        ]

    def decode(self, embeds, start: int, past: list[np.ndarray], keep: int = 0):
        """-> logits (1, K, V), hidden (1, T, H), present (flat list)."""
        positions = np.arange(start, start + embeds.shape[1], dtype=np.int64)[None]
        feed = {"inputs_embeds": embeds, "position_ids": positions, "num_logits_to_keep": np.array(keep)}
        feed.update(zip(past_names(len(self.rc.layers)), past, strict=True))
        logits, hidden, *present = self.decoder.run(None, feed)
        return logits, hidden, present


# ---------------------------------------------------------------------------------------------- inputs


def reference_frames(num_frames: int, frame_samples: int, seed: int = 0) -> np.ndarray:
    """A deterministic 'utterance': a gliding tone in noise, (1, N, frame_samples) float32 in [-1, 1]."""
    t = np.arange(num_frames * frame_samples) / 16000
    tone = 0.4 * np.sin(2 * np.pi * (200 + 300 * t) * t)
    noise = 0.05 * np.random.default_rng(seed).standard_normal(t.shape)
    return (tone + noise).astype(np.float32).reshape(1, num_frames, frame_samples)


def torch_embeds(model: Gemma4Unified, ids: np.ndarray, frames: np.ndarray | None) -> torch.Tensor:
    audio = model.embed_audio(torch.from_numpy(frames))[0] if frames is not None else None
    return model.embed_inputs(torch.from_numpy(ids), audio_features=audio)


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise VerificationError(message)


# ---------------------------------------------------------------------------------------------- checks


@torch.no_grad()
def check_logits(model: Gemma4Unified, onnx: OrtModel, ids: np.ndarray, frames: np.ndarray) -> dict:
    expected = model.decode(torch_embeds(model, ids, frames), torch.arange(ids.shape[1])[None], [])[0]
    got = onnx.decode(onnx.embed(ids, frames), 0, onnx.empty_past())[0]
    diff, tol = _diff(got, expected.float()), TOLERANCE[onnx.rc.dtype]
    _require(diff <= tol, f"decoder logits differ from PyTorch by {diff:.2e} (allowed {tol:g})")
    return {"max_abs_diff": diff, "tokens": int(ids.shape[1])}


def check_incremental(onnx: OrtModel, ids: np.ndarray) -> dict:
    """Prefill all but the last few tokens, then one at a time, against one prefill of everything. The
    sequence is longer than the sliding window by more than the steps, so both paths cross it."""
    window = min((layer.sliding_window or math.inf) for layer in onnx.rc.layers)
    length = int(max(ids.shape[1], (window if window != math.inf else 0) + 2 * INCREMENTAL_STEPS))
    ids = np.resize(ids, (1, length))
    embeds = onnx.embed(ids)
    full = onnx.decode(embeds, 0, onnx.empty_past())[0]  # (1, L, V)
    split = length - INCREMENTAL_STEPS
    logits, _, past = onnx.decode(embeds[:, :split], 0, onnx.empty_past(), keep=1)
    rows = [logits[:, -1]]
    for t in range(split, length):
        logits, _, past = onnx.decode(embeds[:, t : t + 1], t, past, keep=1)
        rows.append(logits[:, -1])
    diff, tol = _diff(np.stack(rows[:-1], 1), full[:, split - 1 : length - 1]), TOLERANCE[onnx.rc.dtype]
    diff = max(diff, _diff(rows[-1], full[:, -1]))
    _require(diff <= tol, f"incremental decoding differs from one prefill by {diff:.2e} (allowed {tol:g})")
    return {"max_abs_diff": diff, "tokens": length, "sliding_window": None if window == math.inf else window}


def check_audio_chunked(model: Gemma4Unified, onnx: OrtModel, frames: np.ndarray) -> dict:
    whole = onnx.audio(frames)
    cuts = [0, 1, 3, frames.shape[1]]
    chunked = np.concatenate([onnx.audio(frames[:, a:b]) for a, b in itertools.pairwise(cuts)], 1)
    _require(
        np.array_equal(whole, chunked), f"chunked audio embedding differs by {_diff(whole, chunked):.2e}"
    )
    with torch.no_grad():
        diff = _diff(whole, model.embed_audio(torch.from_numpy(frames)).float())
    tol = TOLERANCE[onnx.rc.dtype]
    _require(diff <= tol, f"audio embedding differs from PyTorch by {diff:.2e} (allowed {tol:g})")
    return {"chunked_equal": True, "max_abs_diff_vs_torch": diff, "frames": int(frames.shape[1])}


@torch.no_grad()
def check_greedy(model: Gemma4Unified, onnx: OrtModel, ids: np.ndarray, frames: np.ndarray) -> dict:
    expected = torch_greedy(model, torch_embeds(model, ids, frames), GREEDY_TOKENS)
    got = ort_greedy(onnx, onnx.embed(ids, frames), GREEDY_TOKENS)
    _require(got == expected, f"greedy continuation differs: ONNX {got} vs PyTorch {expected}")
    return {"tokens": got, "identical": True}


def torch_greedy(model: Gemma4Unified, embeds: torch.Tensor, n: int) -> list[int]:
    tokens, past, start = [], [], 0
    for _ in range(n):
        positions = torch.arange(start, start + embeds.shape[1])[None]
        logits, _, past = model.decode(embeds, positions, past, num_logits_to_keep=1)
        start += embeds.shape[1]
        tokens.append(int(logits[0, -1].argmax()))
        embeds = model.embed_tokens(torch.tensor([[tokens[-1]]]))
    return tokens


def ort_greedy(onnx: OrtModel, embeds: np.ndarray, n: int) -> list[int]:
    tokens, past, start = [], onnx.empty_past(), 0
    for _ in range(n):
        logits, _, past = onnx.decode(embeds, start, past, keep=1)
        start += embeds.shape[1]
        tokens.append(int(logits[0, -1].argmax()))
        embeds = onnx.embed(np.array([[tokens[-1]]]))
    return tokens


@torch.no_grad()
def check_drafter(model: Gemma4Unified, assistant: Assistant, onnx: OrtModel, ids: np.ndarray) -> dict:
    """One draft step from the target's state after a prefill, ORT vs PyTorch."""
    embeds = onnx.embed(ids)
    _, hidden, present = onnx.decode(embeds, 0, onnx.empty_past())
    spec, last = onnx.rc.drafter, ids.shape[1] - 1
    shared = [present[2 * i + j] for i in spec.shared_layers for j in (0, 1)]
    token_embeds = onnx.embed(ids[:, last:])
    feed = {"token_embeds": token_embeds, "prev_hidden": hidden[:, last:], "position_ids": np.array([[last]])}
    feed.update(zip(spec.inputs[3:7], shared, strict=True))
    logits, next_hidden = onnx.drafter.run(None, feed)
    pairs = [
        (torch.from_numpy(present[2 * i]), torch.from_numpy(present[2 * i + 1]))
        for i in range(len(present) // 2)
    ]
    kv = shared_kv_from_present(model.cfg.text, pairs)
    t = torch.from_numpy
    ref_logits, ref_hidden = assistant.step(t(token_embeds), t(hidden[:, last:]), kv, t(feed["position_ids"]))
    diff, tol = (
        max(_diff(logits, ref_logits.float()), _diff(next_hidden, ref_hidden.float())),
        TOLERANCE[onnx.rc.dtype],
    )
    _require(diff <= tol, f"drafter differs from PyTorch by {diff:.2e} (allowed {tol:g})")
    return {"max_abs_diff": diff, "top1_equal": bool(logits.argmax(-1) == ref_logits.argmax(-1).numpy())}


@torch.no_grad()
def check_drafter_steps(model: Gemma4Unified, assistant: Assistant, onnx: OrtModel, ids: np.ndarray) -> dict:
    """A whole draft round in one drafter_steps call against the step graph called once per draft (the
    drafts must be identical) and against PyTorch's draft() (logits within tolerance)."""
    embeds = onnx.embed(ids)
    _, hidden, present = onnx.decode(embeds, 0, onnx.empty_past())
    spec, last = onnx.rc.drafter, ids.shape[1] - 1
    shared = [present[2 * i + j] for i in spec.shared_layers for j in (0, 1)]
    position, token = np.array([[last]]), ids[:, last:]
    kv = dict(zip(spec.steps.inputs[3:7], shared, strict=True))
    feed = {"token_ids": token, "prev_hidden": hidden[:, last:], "position_ids": position, **kv}
    drafts, logits = onnx.drafter_steps.run(None, feed)  # (1, k), (1, k, V)
    step_kv = dict(zip(spec.inputs[3:7], shared, strict=True))
    stepped = ort_draft(onnx, step_kv, token, hidden[:, last:], position, spec.num_draft_tokens)
    got = drafts[0].tolist()
    _require(got == stepped, f"drafter_steps drafted {got}, the step graph {stepped}")
    t = torch.from_numpy
    pairs = [(t(present[i]), t(present[i + 1])) for i in range(0, len(present), 2)]
    torch_kv = shared_kv_from_present(model.cfg.text, pairs)
    ref_tokens, ref_logits = draft(
        assistant, model, t(token), t(hidden[:, last:]), torch_kv, t(position), len(stepped)
    )
    diff, tol = _diff(logits, ref_logits.float()), TOLERANCE[onnx.rc.dtype]
    _require(diff <= tol, f"drafter_steps differs from PyTorch by {diff:.2e} (allowed {tol:g})")
    return {"max_abs_diff": diff, "drafts": stepped, "torch_equal": ref_tokens[0].tolist() == stepped}


def ort_draft(onnx: OrtModel, kv: dict, token: np.ndarray, hidden: np.ndarray, position, n: int) -> list[int]:
    """Greedy drafts from the step graph, one call per token, as the worker drafts without drafter_steps."""
    drafts = []
    for _ in range(n):
        feed = {"token_embeds": onnx.embed(token), "prev_hidden": hidden, "position_ids": position, **kv}
        logits, hidden = onnx.drafter.run(None, feed)
        token = logits[:, -1:].argmax(-1)  # (1, 1)
        drafts.append(int(token[0, 0]))
    return drafts


@torch.no_grad()
def check_vision(model: Gemma4Unified, onnx: OrtModel) -> dict:
    vision = model.cfg.vision
    rng = np.random.default_rng(0)
    patches = rng.random((1, 6, vision.patch_dim), dtype=np.float32)
    xy = np.array([[[0, 0], [1, 0], [0, 1], [1, 1], [-1, -1], [-1, -1]]], dtype=np.int64)
    got = onnx.vision.run(None, {"pixel_patches": patches, "patch_xy": xy})[0]
    diff = _diff(got, model.embed_vision(torch.from_numpy(patches), torch.from_numpy(xy)).float())
    _require(diff <= TOLERANCE[onnx.rc.dtype], f"vision embedding differs from PyTorch by {diff:.2e}")
    return {"max_abs_diff": diff}


def quantized_agreement(reference: OrtModel, quantized: OrtModel, ids: np.ndarray) -> dict:
    """Top-1 agreement and logit error of a quantized decoder against the unquantized one, per position of
    one prefill of AGREEMENT_TOKENS tokens (the reference prompt, then seeded random tokens)."""
    rng = np.random.default_rng(0)
    filler = rng.integers(0, reference.rc.vocab_size, (1, max(0, AGREEMENT_TOKENS - ids.shape[1])))
    ids = np.concatenate([ids, filler], 1)[:, :AGREEMENT_TOKENS]
    embeds = reference.embed(ids)
    a = reference.decode(embeds, 0, reference.empty_past())[0][0]  # (L, V)
    b = quantized.decode(embeds, 0, quantized.empty_past())[0][0]
    error = np.abs(a.astype(np.float64) - b)
    return {
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "logit_max_abs_diff": float(error.max()),
        "logit_mean_abs_diff": float(error.mean()),
        "tokens": int(ids.shape[1]),
    }
