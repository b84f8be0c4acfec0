"""Gemma 4 Unified ("gemma4_unified"): an encoder-free multimodal decoder whose audio (raw 16 kHz frames) and
images (merged pixel patches) enter the token-embedding space through one projection each.

Our own implementation, checked against Hugging Face transformers in tests/export/test_model.py. It knows
nothing of the MTP drafter, quantization, ONNX or training: those take a finished `Gemma4Unified`.

API (all explicit tensors, no cache objects; traceable by torch.onnx.export):

    model = Gemma4Unified(Config.preset("tiny"))          # or checkpoint.load_model(path)
    embeds = model.embed_tokens(input_ids)                 # (B, T) -> (B, T, H), embedding scale included
    audio = model.embed_audio(frames)                      # (B, N, 640) float -> (B, N, H), per frame
    image = model.embed_vision(patches, patch_xy)          # (B, P, 6912), (B, P, 2) -> (B, P, H)
    embeds = model.embed_inputs(input_ids, audio_features=..., image_features=...)  # placeholders replaced
    logits, hidden, present = model.decode(embeds, position_ids, past_key_values,
                                           attention_mask=None, image_groups=None, num_logits_to_keep=0)

- `past_key_values`: one (k, v) per KV-owning layer (every layer unless `num_kv_shared_layers` > 0), each
  (B, kv_heads, past, head_dim) with per-layer-type kv_heads/head_dim; an empty list or length-0 tensors
  mean "no past". `present` is past concatenated with the new step, never truncated: sliding layers mask
  keys older than their window instead, so the result past the window is exact.
- `attention_mask`: optional (B, past + T) padding mask, 1 = real token.
- `image_groups`: optional (B, T) or (B, past + T) long, the image index of each image placeholder token
  and -1 elsewhere (`image_groups_from_ids` builds it): sliding layers attend bidirectionally within one
  image, full layers stay causal (the reference's `create_masks_for_vision_model`).
- `num_logits_to_keep`: k > 0 computes logits for the last k rows only; `hidden` is always all rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SLIDING, FULL = "sliding_attention", "full_attention"
KV = tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------------------------- config


def _default_layer_types(num_layers: int) -> list[str]:
    # 5 sliding layers then 1 full, as transformers does when config.json names none.
    return [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)]


def _default_rope() -> dict[str, dict[str, Any]]:
    return {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }


@dataclass(frozen=True)
class TextConfig:
    """The decoder. Full-attention layers have their own head_dim and kv heads (`global_*`)."""

    # sizes
    vocab_size: int = 262_144
    hidden_size: int = 3840
    intermediate_size: int = 15_360
    num_hidden_layers: int = 48
    # attention
    num_attention_heads: int = 16
    num_key_value_heads: int = 8  # sliding layers
    head_dim: int = 256  # sliding layers
    global_head_dim: int = 512  # full layers
    num_global_key_value_heads: int = 8  # full layers
    attention_k_eq_v: bool = False  # full layers reuse the key projection as values
    attention_bias: bool = False
    layer_types: tuple[str, ...] = ()
    sliding_window: int = 1024  # a query sees itself and the previous sliding_window - 1 keys
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=_default_rope)
    use_bidirectional_attention: str | None = "vision"  # image tokens see each other on sliding layers
    # KV sharing: the last num_kv_shared_layers layers reuse the KV of the last earlier layer of their type
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False  # KV-shared layers get a 2x wide MLP
    # the rest
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    max_position_embeddings: int = 262_144

    def __post_init__(self):
        types = list(self.layer_types) or _default_layer_types(self.num_hidden_layers)
        types[-1] = FULL  # the reference forces the last layer to full attention
        object.__setattr__(self, "layer_types", tuple(types))
        if len(types) != self.num_hidden_layers:
            raise ValueError(f"{len(types)} layer_types for {self.num_hidden_layers} layers")

    def layer_head_dim(self, i: int) -> int:
        return self.global_head_dim if self.layer_types[i] == FULL else self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        return self.num_global_key_value_heads if self.layer_types[i] == FULL else self.num_key_value_heads

    def type_head_dim(self, layer_type: str) -> int:
        return self.global_head_dim if layer_type == FULL else self.head_dim

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_shared(self, i: int) -> bool:
        return i >= self.first_kv_shared_layer

    def last_kv_layer(self, layer_type: str) -> int:
        """Index, among the KV-owning layers, of the last one of this type (the one an MTP drafter reads)."""
        owners = self.layer_types[: self.first_kv_shared_layer]
        return len(owners) - 1 - owners[::-1].index(layer_type)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> TextConfig:
        num_layers = d["num_hidden_layers"]
        types = d.get("layer_types") or _default_layer_types(num_layers)
        if d.get("use_bidirectional_attention") == "all":
            raise ValueError("use_bidirectional_attention='all' is not a causal decoder; not supported")
        kwargs = {k: d[k] for k in _TEXT_HF_KEYS if d.get(k) is not None}
        kwargs.update(_full_layer_shape(d, types))
        kwargs["layer_types"] = tuple(types)
        kwargs["final_logit_softcapping"] = d.get("final_logit_softcapping")
        kwargs["use_bidirectional_attention"] = d.get("use_bidirectional_attention")
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in _TEXT_HF_KEYS}
        d.update(model_type="gemma4_unified_text", layer_types=list(self.layer_types))
        d["final_logit_softcapping"] = self.final_logit_softcapping
        d["use_bidirectional_attention"] = self.use_bidirectional_attention
        full = {"head_dim": self.global_head_dim, "num_key_value_heads": self.num_global_key_value_heads}
        d["per_layer_config"] = {str(i): dict(full) for i, t in enumerate(self.layer_types) if t == FULL}
        return d


_TEXT_HF_KEYS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "attention_k_eq_v",
    "attention_bias",
    "sliding_window",
    "rope_parameters",
    "num_kv_shared_layers",
    "use_double_wide_mlp",
    "hidden_activation",
    "rms_norm_eps",
    "tie_word_embeddings",
    "pad_token_id",
    "max_position_embeddings",
]


def _full_layer_shape(d: dict[str, Any], types: list[str]) -> dict[str, int]:
    """Full layers' head_dim / kv heads. A saved config holds them as per-layer overrides (none where they
    equal the global values); a hand-written one may give global_head_dim (transformers' default 512)
    and num_global_key_value_heads (used only with attention_k_eq_v)."""
    if "per_layer_config" in d:
        full = _full_layer_overrides(d["per_layer_config"], types)
        head_dim, kv_heads = full.get("head_dim", d["head_dim"]), full.get("num_key_value_heads")
    else:
        head_dim = d.get("global_head_dim", 512)
        kv_heads = d.get("num_global_key_value_heads") if d.get("attention_k_eq_v") else None
    return {"global_head_dim": head_dim, "num_global_key_value_heads": kv_heads or d["num_key_value_heads"]}


def _full_layer_overrides(per_layer: dict | None, types: list[str]) -> dict[str, Any]:
    """transformers writes full-layer head_dim / kv heads as per-layer overrides; they must be per type."""
    seen = {}
    for key, value in (per_layer or {}).items():
        layer_type = types[int(key)]
        if layer_type != FULL or set(value) - {"head_dim", "num_key_value_heads"}:
            raise ValueError(f"unsupported per_layer_config override for layer {key} ({layer_type}): {value}")
        if seen and value != seen:
            raise ValueError(f"full-attention layers differ in per_layer_config: {value} vs {seen}")
        seen = value
    return seen


@dataclass(frozen=True)
class AudioConfig:
    """Raw audio: one soft token per frame of audio_embed_dim samples (640 = 40 ms at 16 kHz)."""

    audio_embed_dim: int = 640
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> AudioConfig:
        return cls(audio_embed_dim=d.get("audio_embed_dim", 640), rms_norm_eps=d.get("rms_norm_eps", 1e-6))

    def to_hf(self) -> dict[str, Any]:
        return {"model_type": "gemma4_unified_audio", **asdict(self)}


@dataclass(frozen=True)
class VisionConfig:
    """Images: 16-px patches merged 3x3 into 48-px model patches, each one soft token."""

    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120  # entries per axis of the X/Y position tables
    rms_norm_eps: float = 1e-6
    output_proj_dims: int = 3840  # the reference's projection input; must equal mm_embed_dim

    def __post_init__(self):
        if self.output_proj_dims != self.mm_embed_dim:
            raise ValueError(f"output_proj_dims {self.output_proj_dims} != mm_embed_dim {self.mm_embed_dim}")

    @property
    def patch_dim(self) -> int:
        return (self.patch_size * self.pooling_kernel_size) ** 2 * 3  # 48 * 48 * 3 = 6912 pixel values

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> VisionConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def to_hf(self) -> dict[str, Any]:
        return {"model_type": "gemma4_unified_vision", **asdict(self)}


@dataclass(frozen=True)
class Config:
    """The whole model: decoder, optional embedders, and the placeholder token ids."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    audio: AudioConfig | None = field(default_factory=AudioConfig)
    image_token_id: int = 258_880
    audio_token_id: int = 258_881
    video_token_id: int = 258_884
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    boa_token_id: int = 256_000
    eoa_token_index: int = 258_883

    @classmethod
    def preset(cls, name: str) -> Config:
        return PRESETS[name]

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Config:
        vision, audio = d.get("vision_config"), d.get("audio_config")
        ids = {k: d[k] for k in _TOKEN_ID_KEYS if d.get(k) is not None}
        return cls(
            text=TextConfig.from_hf(d["text_config"]),
            vision=VisionConfig.from_hf(vision) if vision else None,
            audio=AudioConfig.from_hf(audio) if audio else None,
            **ids,
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "model_type": "gemma4_unified",
            "architectures": ["Gemma4UnifiedForConditionalGeneration"],
            "text_config": self.text.to_hf(),
            "vision_config": self.vision.to_hf() if self.vision else None,
            "audio_config": self.audio.to_hf() if self.audio else None,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            **{k: getattr(self, k) for k in _TOKEN_ID_KEYS},
        }


_TOKEN_ID_KEYS = [
    "image_token_id",
    "audio_token_id",
    "video_token_id",
    "boi_token_id",
    "eoi_token_id",
    "boa_token_id",
    "eoa_token_index",
]

_TINY_TEXT = TextConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    layer_types=(SLIDING, SLIDING, FULL, FULL),
    sliding_window=8,
    final_logit_softcapping=30.0,
)

PRESETS: dict[str, Config] = {
    # For tests: every feature on, small enough for milliseconds on a CPU; token ids fit the small vocab.
    "tiny": Config(
        text=_TINY_TEXT,
        vision=VisionConfig(patch_size=2, mm_embed_dim=32, mm_posemb_size=16, output_proj_dims=32),
        audio=AudioConfig(),
        image_token_id=500,
        audio_token_id=501,
        video_token_id=502,
        boi_token_id=503,
        eoi_token_id=504,
        boa_token_id=505,
        eoa_token_index=506,
    ),
    # Gemma 4 12B: the widths the reference's defaults name (3840 = mm_embed_dim = the drafter's
    # backbone_hidden_size); depth and heads are our best knowledge. A checkpoint's config.json wins.
    "12b": Config(
        text=TextConfig(attention_k_eq_v=True, num_global_key_value_heads=4, final_logit_softcapping=30.0)
    ),
}


# ------------------------------------------------------------------------------------------------ norms


class RMSNorm(nn.Module):
    """x / rms(x), times a weight (plain, not 1 + weight) unless with_scale=False; computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            h = h * self.weight.float()
        return h.type_as(x)


# ----------------------------------------------------------------------------------------------- embedders


class MultimodalProjection(nn.Module):
    """Weightless RMSNorm, then one Linear (no bias) into the decoder width."""

    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(in_dim, eps, with_scale=False)
        self.embedding_projection = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.embedding_projection.weight.dtype)
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


class AudioEmbedder(MultimodalProjection):
    """Raw audio frames (B, N, 640) -> soft tokens (B, N, H). Each frame alone: no positions, no context,
    so embedding a stream chunk by chunk equals embedding it whole."""

    def __init__(self, cfg: AudioConfig, hidden_size: int):
        super().__init__(cfg.audio_embed_dim, hidden_size, cfg.rms_norm_eps)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        w = self.embedding_projection.weight  # (H, F)
        x = self.embedding_pre_projection_norm(frames.to(w.dtype))  # (B, N, F)
        rows = x.reshape(-1, 1, x.shape[-1])  # (B*N, 1, F)
        # One product per frame, not one GEMM over all frames: a GEMM's summation order depends on how many
        # rows it gets, so chunked and whole embeddings would differ in the last bits.
        y = torch.bmm(rows, w.T.expand(rows.shape[0], -1, -1))  # (B*N, 1, H)
        return y.view(*x.shape[:-1], -1)  # (B, N, H)


class VisionEmbedder(nn.Module):
    """Merged pixel patches -> soft tokens: LayerNorm, Dense, LayerNorm, + X and Y position rows, LayerNorm,
    then the same weightless-RMSNorm + Linear projection as audio."""

    def __init__(self, cfg: VisionConfig, hidden_size: int):
        super().__init__()
        self.patch_ln1 = nn.LayerNorm(cfg.patch_dim)
        self.patch_dense = nn.Linear(cfg.patch_dim, cfg.mm_embed_dim)
        self.patch_ln2 = nn.LayerNorm(cfg.mm_embed_dim)
        self.pos_embedding = nn.Parameter(torch.zeros(cfg.mm_posemb_size, 2, cfg.mm_embed_dim))  # [pos, axis]
        self.pos_norm = nn.LayerNorm(cfg.mm_embed_dim)
        self.multimodal_embedder = MultimodalProjection(cfg.output_proj_dims, hidden_size, cfg.rms_norm_eps)

    def forward(self, patches: torch.Tensor, patch_xy: torch.Tensor) -> torch.Tensor:
        """patches (B, P, patch_dim) as the Gemma4Unified image processor makes them (pixels rescaled to
        [0, 1]); patch_xy (B, P, 2) long (x, y) of each merged patch, (-1, -1) for padding patches."""
        x = patches.to(self.patch_dense.weight.dtype)
        x = self.patch_ln2(self.patch_dense(self.patch_ln1(x)))  # (B, P, D)
        x = self.pos_norm(x + self.position_rows(patch_xy))  # (B, P, D)
        return self.multimodal_embedder(x)  # (B, P, H)

    def position_rows(self, patch_xy: torch.Tensor) -> torch.Tensor:
        axes = torch.arange(2, device=patch_xy.device)
        rows = self.pos_embedding[patch_xy.clamp(min=0), axes]  # (B, P, 2, D): table[x, 0], table[y, 1]
        valid = (patch_xy != -1).to(rows.dtype).unsqueeze(-1)  # (B, P, 2, 1) padding adds nothing
        return (rows * valid).sum(-2)  # (B, P, D)


class ScaledEmbedding(nn.Embedding):
    """Token embedding times sqrt(hidden_size), the scale rounded to the weight dtype as the reference."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.embedding_dim**0.5, dtype=torch.float32).to(self.weight.dtype)
        return super().forward(input_ids) * scale


# ------------------------------------------------------------------------------------------------ RoPE


class Rotary(nn.Module):
    """cos/sin tables for one layer type. "default" rotates every pair; "proportional" rotates only the first
    partial_rotary_factor of the pairs (frequencies over the full head_dim) and leaves the rest unrotated."""

    def __init__(self, params: dict[str, Any], head_dim: int):
        super().__init__()
        # Recomputed per call rather than a buffer: a model built on the meta device (lazy loading) has
        # nothing to restore, and tracing folds it to a constant anyway.
        self.params, self.head_dim = params, head_dim

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = _inv_freq(self.params, self.head_dim).to(position_ids.device)  # (hd/2,)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _inv_freq(params: dict[str, Any], head_dim: int) -> torch.Tensor:
    base, kind = params["rope_theta"], params["rope_type"]
    if kind == "default":
        return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    if kind != "proportional":
        raise ValueError(f"unsupported rope_type {kind!r}")
    rotated = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
    inv = 1.0 / base ** (torch.arange(0, 2 * rotated, 2, dtype=torch.float) / head_dim)
    inv = torch.cat([inv, torch.zeros(head_dim // 2 - rotated)])  # frequency 0: cos 1, sin 0
    return inv / params.get("factor", 1.0)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, hd); cos/sin (B, T, hd). Pairs dimension i with i + hd/2."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)


# ------------------------------------------------------------------------------------------------ masks


def attention_masks(
    cfg: TextConfig,
    batch: int,
    q_len: int,
    past_len: int,
    dtype: torch.dtype,
    device: torch.device,
    attention_mask: torch.Tensor | None = None,
    image_groups: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Additive masks (B, 1, T, past + T) per layer type. Full: causal. Sliding: causal or same image,
    and key no older than sliding_window - 1 positions."""
    q = torch.arange(q_len, device=device)[:, None] + past_len  # (T, 1) absolute index of each query
    k = torch.arange(past_len + q_len, device=device)[None, :]  # (1, S)
    full = (k <= q)[None].expand(batch, -1, -1)  # (B, T, S)
    sliding = full
    if image_groups is not None and cfg.use_bidirectional_attention == "vision":
        sliding = sliding | _same_image(image_groups, q_len, past_len + q_len)
    sliding = sliding & (k > q - cfg.sliding_window)
    if attention_mask is not None:
        keep = attention_mask.bool()[:, None, :]  # (B, 1, S)
        full, sliding = full & keep, sliding & keep
    return {FULL: _additive(full, dtype), SLIDING: _additive(sliding, dtype)}


def _same_image(groups: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    if groups.shape[1] != kv_len:  # only the new tokens given: the past holds no image of theirs
        groups = F.pad(groups, (kv_len - groups.shape[1], 0), value=-1)
    gq = groups[:, -q_len:, None]  # (B, T, 1)
    return (gq == groups[:, None, :]) & (gq >= 0)  # (B, T, S)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The dtype's minimum, not -inf, so a fully masked (padding) row stays finite, as in the reference.
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]  # (B, 1, T, S)


def image_groups_from_ids(input_ids: torch.Tensor, image_token_ids: tuple[int, ...]) -> torch.Tensor:
    """(B, T) -> (B, T): each run of consecutive image (or video) placeholders gets its own index, -1
    elsewhere, like the reference's get_block_sequence_ids_for_mask."""
    is_image = torch.isin(input_ids, torch.tensor(image_token_ids, device=input_ids.device))
    starts = is_image & ~F.pad(is_image[:, :-1], (1, 0), value=False)
    return torch.where(is_image, torch.cumsum(starts.long(), dim=1) - 1, -1)


# ----------------------------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Grouped-query attention with RMS-normed q and k (so scale 1.0), weightless-RMS-normed v.
    A KV-shared layer has only q and o: it attends keys/values handed to it."""

    def __init__(self, cfg: TextConfig, i: int):
        super().__init__()
        self.head_dim, self.kv_heads = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        self.heads, self.kv_shared = cfg.num_attention_heads, cfg.kv_shared(i)
        h, eps, bias = cfg.hidden_size, cfg.rms_norm_eps, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps)
        if not self.kv_shared:
            self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
            k_eq_v = cfg.attention_k_eq_v and cfg.layer_types[i] == FULL
            self.v_proj = None if k_eq_v else nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
            self.k_norm = RMSNorm(self.head_dim, eps)
            self.v_norm = RMSNorm(self.head_dim, eps, with_scale=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=bias)

    def forward(self, x: torch.Tensor, rope: tuple, mask: torch.Tensor, kv: KV | None) -> tuple:
        """x (B, T, H); kv: past (k, v) (B, kvh, past, hd) or None, or for a KV-shared layer the keys and
        values to attend. Returns the output and the present (k, v), or None for a KV-shared layer."""
        B, T, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)), *rope)  # (B, T, nh, hd)
        present = kv if self.kv_shared else self.new_kv(x, rope, kv)
        y = self.attend(q.transpose(1, 2), *present, mask)  # (B, nh, T, hd)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H)
        return y, None if self.kv_shared else present

    def new_kv(self, x: torch.Tensor, rope: tuple, past: KV | None) -> KV:
        B, T, _ = x.shape
        raw_k = self.k_proj(x).view(B, T, -1, self.head_dim)  # (B, T, kvh, hd)
        raw_v = raw_k if self.v_proj is None else self.v_proj(x).view(B, T, -1, self.head_dim)
        k = apply_rope(self.k_norm(raw_k), *rope).transpose(1, 2)  # (B, kvh, T, hd)
        v = self.v_norm(raw_v).transpose(1, 2)  # (B, kvh, T, hd)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, kvh, S, hd)
        return k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        groups = self.heads // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)  # (B, nh, S, hd)
        v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # (B, nh, T, hd)


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig, i: int):
        super().__init__()
        width = cfg.intermediate_size * (2 if cfg.use_double_wide_mlp and cfg.kv_shared(i) else 1)
        if cfg.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(f"unsupported hidden_activation {cfg.hidden_activation!r}")
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Sandwich norms around attention and MLP, then the whole output times a per-layer scalar."""

    def __init__(self, cfg: TextConfig, i: int):
        super().__init__()
        dim, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.layer_type = cfg.layer_types[i]
        self.self_attn = Attention(cfg, i)
        self.mlp = MLP(cfg, i)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps)
        self.post_feedforward_layernorm = RMSNorm(dim, eps)
        self.register_buffer("layer_scalar", torch.ones(1))  # persistent: checkpoints carry it

    def forward(self, x: torch.Tensor, rope: tuple, mask: torch.Tensor, kv: KV | None) -> tuple:
        a, present = self.self_attn(self.input_layernorm(x), rope, mask, kv)
        x = x + self.post_attention_layernorm(a)  # (B, T, H)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar, present


# ---------------------------------------------------------------------------------------------- decoder


class TextDecoder(nn.Module):
    """Scaled token embedding, the layers, a final RMSNorm; logits through the tied embedding, softcapped."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = nn.ModuleDict(
            {t: Rotary(cfg.rope_parameters[t], cfg.type_head_dim(t)) for t in sorted(set(cfg.layer_types))}
        )

    def ropes(self, position_ids: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple]:
        return {t: rotary(position_ids, dtype) for t, rotary in self.rotary.items()}

    def forward(self, x: torch.Tensor, position_ids, past: list[KV], attention_mask=None, image_groups=None):
        """x (B, T, H) -> (normed hidden (B, T, H), present KV per KV-owning layer)."""
        past_len = past[0][0].shape[2] if past else 0
        masks = attention_masks(self.cfg, x.shape[0], x.shape[1], past_len, x.dtype, x.device,
                                attention_mask, image_groups)  # fmt: skip
        ropes = self.ropes(position_ids, x.dtype)
        present, latest = [], {}  # latest: newest KV of each layer type, what KV-shared layers read
        for i, layer in enumerate(self.layers):
            t = layer.layer_type
            kv = latest[t] if self.cfg.kv_shared(i) else (past[i] if past else None)
            x, kv_out = layer(x, ropes[t], masks[t], kv)
            if kv_out is not None:
                present.append(kv_out)
                latest[t] = kv_out
        return self.norm(x), present


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else torch.tanh(logits / cap) * cap


# ------------------------------------------------------------------------------------------------- model


class Gemma4Unified(nn.Module):
    """The assembled model. Module names follow transformers' Gemma4UnifiedModel so that a checkpoint maps
    by adding the "model." prefix (see export/checkpoint.py)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        h = cfg.text.hidden_size
        self.language_model = TextDecoder(cfg.text)
        self.embed_vision = VisionEmbedder(cfg.vision, h) if cfg.vision else None
        self.embed_audio = AudioEmbedder(cfg.audio, h) if cfg.audio else None
        untied = not cfg.text.tie_word_embeddings
        self.lm_head = nn.Linear(h, cfg.text.vocab_size, bias=False) if untied else None

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)  # (B, T, H)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        audio_features: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the audio / image placeholders replaced, in order, by the rows of
        audio_features / image_features (n, H) (or (B, N, H), flattened). Placeholders embed as pad first."""
        c = self.cfg
        placeholders = torch.tensor([c.image_token_id, c.video_token_id, c.audio_token_id])
        is_mm = torch.isin(input_ids, placeholders.to(input_ids.device))
        x = self.embed_tokens(torch.where(is_mm, c.text.pad_token_id, input_ids))  # (B, T, H)
        x = _scatter_rows(x, input_ids == c.image_token_id, image_features)
        return _scatter_rows(x, input_ids == c.audio_token_id, audio_features)

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: list[KV],
        attention_mask: torch.Tensor | None = None,
        image_groups: torch.Tensor | None = None,
        num_logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, list[KV]]:
        """(B, T, H) -> logits (B, T or k, V), last hidden (B, T, H), present KV. See the module docstring."""
        hidden, present = self.language_model(
            inputs_embeds, position_ids, past_key_values, attention_mask, image_groups
        )
        rows = hidden[:, -num_logits_to_keep:] if num_logits_to_keep else hidden
        return self.logits(rows), hidden, present

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.lm_head.weight if self.lm_head is not None else self.language_model.embed_tokens.weight
        return softcap(hidden @ head.T, self.cfg.text.final_logit_softcapping)  # (B, T, V)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Text-only convenience: logits for a prompt with no past (positions 0..T-1)."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        return self.decode(self.embed_tokens(input_ids), positions, [], **kwargs)[0]

    def empty_past(self, batch: int, dtype=torch.float32, device=None) -> list[KV]:
        """Length-0 KV for every KV-owning layer, for a graph that always takes a past."""
        t = self.cfg.text

        def empty(i):
            return torch.zeros(batch, t.layer_kv_heads(i), 0, t.layer_head_dim(i), dtype=dtype, device=device)

        return [(empty(i), empty(i)) for i in range(t.first_kv_shared_layer)]


def _scatter_rows(x: torch.Tensor, where: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Place rows (n, H) at the True positions of where (B, T), in order; gather-based so it traces."""
    if rows is None:
        return x
    rows = rows.reshape(-1, x.shape[-1]).to(x.dtype)  # (n, H)
    index = (torch.cumsum(where.flatten().long(), 0) - 1).clamp(min=0)  # (B*T,) row for each position
    placed = rows[index].view_as(x)  # (B, T, H)
    return torch.where(where[..., None], placed, x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def with_text(cfg: Config, **changes) -> Config:
    """A copy of cfg with some decoder fields changed (tests, smaller training variants)."""
    return replace(cfg, text=replace(cfg.text, **changes))
