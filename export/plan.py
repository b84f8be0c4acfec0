"""The memory plan of an exported model: weights per graph, KV cache per layer type, runtime overhead.

Arithmetic on a Config only (no weights are read): `rawwave export --plan 12b --quant int4 --context 8192`.
The KV numbers follow the graphs as exported: every layer's present is its whole past plus the new tokens
(sliding layers mask old keys rather than drop them), and a decode call holds past and present at once.
"""

from __future__ import annotations

import json
from pathlib import Path

from export.model import FULL, SLIDING, Config

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "fp16": 2}
PREFILL_CHUNK = 512  # tokens per prefill call the plan assumes (the worker's chunked prefill)
RUNTIME_BASE_BYTES = 0.5 * GIB  # process, ONNX Runtime arenas' slack, tokenizer


def load_config(name: str) -> Config:
    """A preset name (tiny, 12b), an HF config.json, or a checkpoint directory holding one."""
    from export.model import PRESETS

    if name in PRESETS:
        return Config.preset(name)
    path = Path(name)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        from export.exporter import ExportError

        raise ExportError(f"--plan {name}: not a preset ({', '.join(PRESETS)}) nor a config.json")
    return Config.from_hf(json.loads(path.read_text()))


def weight_bytes_per_param(dtype: str, quant: str | None) -> float:
    """Quantized MatMul weights: int8 one byte (+ a per-channel scale, negligible); int4 half a byte plus,
    per block of 32, a scale in the float type and a 4-bit zero point."""
    if quant == "int8":
        return 1.0
    if quant == "int4":
        return 0.5 + (DTYPE_BYTES[dtype] + 0.5) / 32
    return DTYPE_BYTES[dtype]


def parameter_groups(cfg: Config) -> dict[str, int]:
    t = cfg.text
    h = t.hidden_size
    groups = {"decoder_matmuls": 0, "decoder_norms": h}
    for i, layer_type in enumerate(t.layer_types):
        q, kv = t.num_attention_heads * t.layer_head_dim(i), t.layer_kv_heads(i) * t.layer_head_dim(i)
        shared, k_eq_v = t.kv_shared(i), t.attention_k_eq_v and layer_type == FULL
        kv_weights = 0 if shared else h * kv * (1 if k_eq_v else 2)
        width = t.intermediate_size * (2 if t.use_double_wide_mlp and shared else 1)
        groups["decoder_matmuls"] += 2 * h * q + kv_weights + 3 * h * width
        groups["decoder_norms"] += 4 * h + 2 * t.layer_head_dim(i)
    groups["lm_head"] = t.vocab_size * h  # the tied embedding, as the decoder's last MatMul
    groups["embed_tokens"] = t.vocab_size * h
    groups["audio_embed"] = cfg.audio.audio_embed_dim * h if cfg.audio else 0
    v = cfg.vision
    groups["vision_embed"] = (
        (v.patch_dim * v.mm_embed_dim + 2 * v.mm_posemb_size * v.mm_embed_dim + v.mm_embed_dim * h)
        if v
        else 0
    )
    return groups


def kv_bytes_per_token(cfg: Config, dtype: str) -> dict[str, int]:
    t, out = cfg.text, {SLIDING: 0, FULL: 0}
    for i in range(t.first_kv_shared_layer):
        out[t.layer_types[i]] += 2 * t.layer_kv_heads(i) * t.layer_head_dim(i) * DTYPE_BYTES[dtype]
    return out


def memory_plan(
    cfg: Config, dtype: str = "fp32", quant: str | None = None, context: int = 8192, sessions: int = 1
) -> dict:
    params, t = parameter_groups(cfg), cfg.text
    wb, fb = weight_bytes_per_param(dtype, quant), DTYPE_BYTES[dtype]
    weights = {
        "decoder": (params["decoder_matmuls"] + params["lm_head"]) * wb + params["decoder_norms"] * 4,
        "embed_tokens": params["embed_tokens"] * fb,
        "audio_embed": params["audio_embed"] * 4,  # never quantized, fp32
        "vision_embed": params["vision_embed"] * fb,
    }
    per_token = kv_bytes_per_token(cfg, dtype)
    kv = {k: v * context * sessions for k, v in per_token.items()}
    chunk = min(PREFILL_CHUNK, context)
    overhead = {
        "present_copy": sum(per_token.values()) * context,  # one call holds its session's past and present
        "prefill_activations": chunk * context * t.num_attention_heads * 4 * 2
        + chunk * (t.intermediate_size * 3 + t.vocab_size) * 4,
        "runtime_base": RUNTIME_BASE_BYTES,
    }
    total = sum(weights.values()) + sum(kv.values()) + sum(overhead.values())
    window = {SLIDING: per_token[SLIDING] * min(context, t.sliding_window) * sessions, FULL: kv[FULL]}
    return {
        "config": {"layers": t.num_hidden_layers, "hidden": t.hidden_size, "vocab": t.vocab_size,
                   "sliding_window": t.sliding_window,
                   "parameters": sum(params.values()) - params["lm_head"]},
        "options": {"dtype": dtype, "quant": quant, "context": context, "sessions": sessions,
                    "prefill_chunk": chunk},
        "weights": weights,
        "kv_cache": kv,
        "kv_cache_if_sliding_windowed": window,
        "overhead": overhead,
        "total": total,
    }  # fmt: skip


def render(p: dict) -> str:
    c, o = p["config"], p["options"]
    lines = [
        f"model: {c['parameters'] / 1e9:.2f}B parameters, {c['layers']} layers, hidden {c['hidden']}, "
        f"vocab {c['vocab']}, sliding window {c['sliding_window']}",
        f"options: dtype {o['dtype']}, quant {o['quant'] or 'none'}, context {o['context']} tokens, "
        f"{o['sessions']} session(s), prefill chunk {o['prefill_chunk']}",
        "",
        "weights",
        *[f"  {name:<28}{_gib(b)}" for name, b in p["weights"].items()],
        "KV cache (as exported: every layer keeps the whole context)",
        *[f"  {name:<28}{_gib(b)}" for name, b in p["kv_cache"].items()],
        "runtime overhead",
        *[f"  {name:<28}{_gib(b)}" for name, b in p["overhead"].items()],
        f"total{'':<25}{_gib(p['total'])}",
        "",
        "if the runtime kept only the window on sliding layers: KV "
        f"{_gib(sum(p['kv_cache_if_sliding_windowed'].values())).strip()} instead of "
        f"{_gib(sum(p['kv_cache'].values())).strip()}",
    ]
    return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"
