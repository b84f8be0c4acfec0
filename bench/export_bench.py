"""`export`: what the exported graphs cost per decode step.

1. The default model's decoder, one token after a past of PAST tokens: ONNX Runtime against PyTorch
   eager (export/model.py), one thread each, median ratio.
2. fp32 / int8 / int4 exports of the default model: greedy decode tokens/s through the worker's runtime,
   and top-1 agreement with fp32 (teacher-forced on fp32's own greedy tokens; the exporter's check too).
3. A 12B-shaped slice: SLICE_LAYERS decoder layers of the `12b` preset (hidden 3840, random weights, a
   small vocabulary so the LM head does not dominate): bytes read per token (weights + KV) against time
   per token, as a fraction of the rate this machine reads memory at with as many threads as ONNX Runtime
   uses (numpy sums over a 1 GiB array, split over the cores). A decode step reads its weights and writes
   little, so a copy's rate (reads and writes, one thread; also reported) is no bound: the slice reached
   118% of it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.models import SCRATCH, bench_model
from bench.report import median, write_result
from bench.workload import finite, load, utterances, versions
from rawwave.settings import Settings

PAST = 64
STEPS = 40
GREEDY_TOKENS = 48
SLICE_LAYERS = 2
SLICE_VOCAB = 1024
COPY_BYTES = 1 << 30


def _time(fn: Any, steps: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


# -- 1. ORT vs PyTorch eager --------------------------------------------------------------------------


def ort_vs_torch(model_dir: Path, checkpoint: Path, steps: int) -> dict[str, Any]:
    import torch

    from export.checkpoint import load_model
    from worker.runtime import Runtime

    torch.set_num_threads(1)
    model = load_model(checkpoint).eval()
    runtime = Runtime(model_dir, Settings(ort_intra_threads=1))
    ids = np.random.default_rng(0).integers(10, runtime.config.vocab_size, PAST + 1).tolist()
    _, _, cache = runtime.extend(runtime.empty_cache(), 0, ids[:PAST], keep=1)
    embeds = runtime.embed_tokens(ids[PAST:])  # (1, H)
    ort_s = _time(lambda: runtime.extend_embeds(cache, PAST, embeds, keep=1), steps)
    with torch.no_grad():
        past_embeds = model.embed_tokens(torch.tensor([ids[:PAST]]))
        _, _, past = model.decode(past_embeds, torch.arange(PAST)[None], model.empty_past(1))
        step = torch.from_numpy(embeds)[None]
        position = torch.tensor([[PAST]])
        torch_s = _time(lambda: model.decode(step, position, past, num_logits_to_keep=1), steps)
    return {
        "past": PAST,
        "ort_step_s": ort_s,
        "torch_step_s": torch_s,
        "ort_median_s": median(ort_s),
        "torch_median_s": median(torch_s),
        "speedup_ort_over_torch": median(torch_s) / median(ort_s),
    }


# -- 2. fp32 / int8 / int4 ------------------------------------------------------------------------------


def quant_variants(quick: bool) -> dict[str, Any]:
    from worker.decoding import StopRule, generate
    from worker.runtime import Runtime

    pcm = utterances(1, seed=3)[0].pcm
    never = StopRule(frozenset())
    out: dict[str, Any] = {}
    reference: dict[str, Any] = {}
    for quant in (None, "int8", "int4"):
        model = bench_model(quick, quant=quant)
        runtime = Runtime(model.directory, Settings(ort_intra_threads=1))
        ctx = _audio_ctx(runtime, pcm)
        runs = [generate(runtime, ctx, never, GREEDY_TOKENS) for _ in range(3)]
        tokens = runs[0].tokens
        name = quant or "fp32"
        if quant is None:
            reference = {"tokens": tokens, "logits": _forced_logits(runtime, ctx, tokens)}
        top1 = _forced_logits(runtime, ctx, reference["tokens"]).argmax(-1)
        from rawwave.model_dir import load_manifest

        exporter_check = load_manifest(model.directory).verification.get("quantized")
        out[name] = {
            "decoder_bytes": (model.directory / "decoder.onnx").stat().st_size,
            "tokens_per_s": [GREEDY_TOKENS / r.stats.seconds for r in runs],
            "median_tokens_per_s": median([GREEDY_TOKENS / r.stats.seconds for r in runs]),
            "top1_agreement_vs_fp32": float((top1 == reference["logits"].argmax(-1)).mean()),
            "greedy_identical_to_fp32": tokens == reference["tokens"],
            "exporter_check": exporter_check,
        }
    return out


def _audio_ctx(runtime: Any, pcm: np.ndarray) -> Any:
    from worker.decoding import Context
    from worker.session import Prompt

    prompt = Prompt.of(runtime, respond=False)
    frame = runtime.config.frame_samples
    pcm = np.concatenate([pcm, np.zeros(-len(pcm) % frame, np.int16)])
    start = runtime.start(prompt.prefix)
    embeds = np.concatenate([runtime.embed_audio(pcm), runtime.embed_tokens(prompt.suffix)])
    logits, hidden, cache = runtime.extend_embeds(start.cache, start.length, embeds, keep=1)
    return Context(cache, start.length + len(embeds), logits[-1], hidden[-1])


def _forced_logits(runtime: Any, ctx: Any, tokens: list[int]) -> np.ndarray:
    """(T, V): the prediction before each token, teacher-forced in one call."""
    logits, _, _ = runtime.extend(ctx.cache, ctx.length, tokens[:-1], keep=0)
    return np.concatenate([ctx.logits[None], logits])


# -- 3. the 12B-shaped slice ------------------------------------------------------------------------------


def slice_config(quick: bool) -> Any:
    from export.model import FULL, SLIDING, Config, with_text

    layers = 1 if quick else SLICE_LAYERS
    types = (FULL,) if quick else (SLIDING,) * (layers - 1) + (FULL,)
    extra = {"intermediate_size": 3840} if quick else {}
    cfg = with_text(
        Config.preset("12b"), num_hidden_layers=layers, layer_types=types, vocab_size=SLICE_VOCAB, **extra
    )
    return dataclasses.replace(cfg, vision=None)


def twelve_b_slice(quick: bool) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort
    import torch

    from export.exporter import export_decoder
    from export.model import Gemma4Unified

    cfg = slice_config(quick)
    path = SCRATCH / ("slice-12b-quick" if quick else "slice-12b") / "decoder.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        with torch.no_grad():
            export_decoder(Gemma4Unified(cfg).eval(), path)
    weights = sum(
        t.raw_data.__len__() or 0 for t in onnx.load(str(path), load_external_data=True).graph.initializer
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    text = cfg.text
    past = [
        np.random.default_rng(i).standard_normal(
            (1, text.layer_kv_heads(i // 2), PAST, text.layer_head_dim(i // 2)), dtype=np.float32
        )
        for i in range(2 * text.num_hidden_layers)
    ]
    feeds = {
        "inputs_embeds": np.random.default_rng(9).standard_normal((1, 1, text.hidden_size), dtype=np.float32),
        "position_ids": np.array([[PAST]]),
        "num_logits_to_keep": np.array(1),
    }
    names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values")]
    feeds.update(zip(names, past, strict=True))
    step_s = _time(lambda: session.run(None, feeds), 5 if quick else 15)
    kv = sum(p.nbytes for p in past)
    nbytes = COPY_BYTES // 8 if quick else COPY_BYTES
    bandwidth, reads = copy_bandwidth(nbytes), read_bandwidth(nbytes, os.cpu_count() or 1)
    per_token = median(step_s)
    achieved = (weights + kv) / per_token
    return {
        "layers": text.num_hidden_layers,
        "layer_types": list(text.layer_types),
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "vocab_size": text.vocab_size,
        "past": PAST,
        "weight_bytes": weights,
        "kv_bytes": kv,
        "bytes_per_token": weights + kv,
        "step_s": step_s,
        "time_per_token_s": per_token,
        "achieved_bytes_per_s": achieved,
        "ort_threads": "default (all cores)",
        "copy_bandwidth": bandwidth,
        "read_bandwidth": reads,
        "fraction_of_bound": achieved / reads["read_bytes_per_s"],
    }


def copy_bandwidth(nbytes: int) -> dict[str, Any]:
    """Best of 5 single-threaded numpy copies of nbytes: a copy reads and writes nbytes each."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    times = _time(lambda: np.copyto(dst, src), 5)
    return {"bytes": nbytes, "copy_s": times, "read_write_bytes_per_s": 2 * nbytes / min(times)}


def read_bandwidth(nbytes: int, threads: int) -> dict[str, Any]:
    """Best of 5 sums of an nbytes float32 array, one part per thread (numpy's reductions release the
    GIL, and a sum is memory-bound): the pure-read rate, at ONNX Runtime's default thread count."""
    parts = np.array_split(np.ones(nbytes // 4, np.float32), threads)
    with ThreadPoolExecutor(threads) as pool:
        times = _time(lambda: list(pool.map(np.sum, parts)), 5)
    return {"bytes": nbytes, "threads": threads, "sum_s": times, "read_bytes_per_s": nbytes / min(times)}


def main(quick: bool = False) -> int:
    load_before, started = load(), time.monotonic()
    model = bench_model(quick)
    eager = ort_vs_torch(model.directory, model.checkpoint, 5 if quick else STEPS)
    variants = quant_variants(quick)
    slice_ = twelve_b_slice(quick)
    write_result(
        "export",
        finite(
            {
                "quick": quick,
                "versions": versions(),
                "model": model.describe(),
                "settings": {
                    "past": PAST,
                    "steps": STEPS,
                    "greedy_tokens": GREEDY_TOKENS,
                    "slice_layers": SLICE_LAYERS,
                    "slice_vocab": SLICE_VOCAB,
                    "ort_intra_threads": 1,
                    "torch_threads": 1,
                },
                "load_before": load_before,
                "load_after": load(),
                "seconds": round(time.monotonic() - started, 1),
                "ort_vs_torch": eager,
                "quantized": variants,
                "slice_12b": slice_,
                "headline": _headline(eager, variants, slice_),
            }
        ),
    )
    return 0


def _headline(eager: dict[str, Any], variants: dict[str, Any], slice_: dict[str, Any]) -> str:
    speed = "/".join(f"{variants[k]['median_tokens_per_s']:.0f}" for k in ("fp32", "int8", "int4"))
    agree = "/".join(f"{variants[k]['top1_agreement_vs_fp32']:.0%}" for k in ("int8", "int4"))
    achieved = slice_["achieved_bytes_per_s"] / 1e9
    bound = slice_["read_bandwidth"]["read_bytes_per_s"] / 1e9
    return (
        f"ORT decode step {eager['speedup_ort_over_torch']:.1f}x PyTorch eager; fp32/int8/int4 {speed} tok/s "
        f"(int8/int4 top-1 vs fp32 {agree}); 12B-shaped slice at {slice_['fraction_of_bound']:.0%} of the "
        f"memory-read bound ({achieved:.1f} of {bound:.1f} GB/s)"
    )
