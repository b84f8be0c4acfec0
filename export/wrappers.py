"""Traceable views of a finished model, one per ONNX graph: every tensor an explicit named input or output.

The graph I/O names are the model-directory contract (rawwave/model_dir.py); this module only adapts
`export/model.py` and `export/assistant.py` to them (sherpa-onnx style: KV cache as named tensors).
It knows nothing of files, quantization or verification.
"""

from __future__ import annotations

import torch
from torch import nn

from export.assistant import Assistant, draft
from export.model import Gemma4Unified


def past_names(num_kv_layers: int, prefix: str = "past_key_values") -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_kv_layers) for kind in ("key", "value")]


def pair(flat: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def optional_rows(given: torch.Tensor, batch: torch.Tensor, length: torch.Tensor, fill: int) -> torch.Tensor:
    """An optional (B, S) input: its own S columns when given, else `fill`. The exporter feeds a (1, 0)
    default, so the graph pads: cat([given, fill], 1)[:, :S] is `given` or all `fill`."""
    filler = given.new_full((1, 1), fill).expand(batch, length)  # (B, S)
    return torch.cat([given.expand(batch, -1), filler], dim=1)[:, :length]  # (B, S)


class EmbedTokens(nn.Module):
    """input_ids (B, T) int64 -> inputs_embeds (B, T, H), the sqrt(H) scale included."""

    def __init__(self, model: Gemma4Unified):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)


class AudioEmbed(nn.Module):
    """audio_frames (B, N, frame_samples) float32 -> audio_embeds (B, N, H); frame by frame: stateless."""

    def __init__(self, model: Gemma4Unified):
        super().__init__()
        self.embed = model.embed_audio

    def forward(self, audio_frames: torch.Tensor) -> torch.Tensor:
        return self.embed(audio_frames)


class VisionEmbed(nn.Module):
    """pixel_patches (B, P, patch_dim) float32, patch_xy (B, P, 2) int64 -> image_embeds (B, P, H)."""

    INPUTS = ("pixel_patches", "patch_xy")
    OUTPUTS = ("image_embeds",)

    def __init__(self, model: Gemma4Unified):
        super().__init__()
        self.embed = model.embed_vision

    def forward(self, pixel_patches: torch.Tensor, patch_xy: torch.Tensor) -> torch.Tensor:
        return self.embed(pixel_patches, patch_xy)


class Decoder(nn.Module):
    """One decode call: new embeddings plus the past of every KV-owning layer -> logits, hidden, present.

    `num_logits_to_keep` k (int64 scalar): logits for the last k rows only, 0 = all rows. `attention_mask`
    (B, P+T) and `image_groups` (B, P+T or T) are optional: unfed, the graph uses all-ones / no images.
    """

    def __init__(self, model: Gemma4Unified, with_image_groups: bool):
        super().__init__()
        self.model = model
        self.with_image_groups = with_image_groups
        self.num_kv_layers = model.cfg.text.first_kv_shared_layer

    def input_names(self) -> list[str]:
        names = ["inputs_embeds", "position_ids", "attention_mask"]
        names += ["image_groups"] if self.with_image_groups else []
        return [*names, "num_logits_to_keep", *past_names(self.num_kv_layers)]

    def output_names(self) -> list[str]:
        return ["logits", "last_hidden_state", *past_names(self.num_kv_layers, "present")]

    def forward(self, inputs_embeds, position_ids, attention_mask, *rest):
        image_groups, num_logits_to_keep, *past = rest if self.with_image_groups else (None, *rest)
        batch, new = inputs_embeds.shape[0], inputs_embeds.shape[1]
        total = past[0].shape[2] + new  # P + T
        mask = optional_rows(attention_mask, batch, total, 1)  # (B, P+T)
        groups = None
        if image_groups is not None:
            groups = optional_rows(image_groups.flip(1), batch, total, -1).flip(1)  # right-aligned, (B, P+T)
        hidden, present = self.model.language_model(inputs_embeds, position_ids, pair(past), mask, groups)
        start = torch.where(num_logits_to_keep > 0, new - num_logits_to_keep, 0)
        rows = hidden.index_select(1, torch.arange(start, new, device=hidden.device))  # (B, K, H)
        flat = [t for kv in present for t in kv]
        return self.model.logits(rows), hidden, *flat


class Drafter(nn.Module):
    """One MTP draft step (export/assistant.py) reading the target's last sliding and last full KV.

    token_embeds (B, T, Hb) from embed_tokens, prev_hidden (B, T, Hb) the target's last hidden state (or
    the previous step's next_hidden), position_ids (B, T), shared.{sliding,full}.{key,value} the target's
    present of DrafterSpec.shared_layers, attention_mask (B, S) optional -> logits (B, T, V), next_hidden.
    """

    INPUTS = (
        "token_embeds",
        "prev_hidden",
        "position_ids",
        "shared.sliding.key",
        "shared.sliding.value",
        "shared.full.key",
        "shared.full.value",
        "attention_mask",
    )
    OUTPUTS = ("logits", "next_hidden")

    def __init__(self, assistant: Assistant):
        super().__init__()
        self.assistant = assistant

    def forward(self, token_embeds, prev_hidden, position_ids, sk, sv, fk, fv, attention_mask):
        mask = optional_rows(attention_mask, token_embeds.shape[0], fk.shape[2], 1)  # (B, S)
        return self.assistant.step(token_embeds, prev_hidden, (sk, sv, fk, fv), position_ids, mask)


class DrafterSteps(nn.Module):
    """A whole greedy draft round in one call: `steps` Drafter steps unrolled, each token embedded with the
    target's (tied, scaled) embedding table and chosen by argmax inside the graph, all at the same fixed
    position (as the reference drafts). The shared KV is read once; masks, RoPE tables and the repeated KV
    heads are computed once and shared by every step.

    token_ids (B, 1) the target's next token, prev_hidden (B, 1, Hb) its hidden state before it,
    position_ids (B, 1), shared.* and attention_mask as `Drafter` -> draft_ids (B, steps) int64,
    draft_logits (B, steps, V).
    """

    INPUTS = ("token_ids", *Drafter.INPUTS[1:])
    OUTPUTS = ("draft_ids", "draft_logits")

    def __init__(self, assistant: Assistant, target: Gemma4Unified, steps: int):
        super().__init__()
        self.assistant, self.target, self.steps = assistant, target, steps

    def forward(self, token_ids, prev_hidden, position_ids, sk, sv, fk, fv, attention_mask):
        mask = optional_rows(attention_mask, token_ids.shape[0], fk.shape[2], 1)  # (B, S)
        shared = (sk, sv, fk, fv)
        a, t = self.assistant, self.target
        return draft(a, t, token_ids, prev_hidden, shared, position_ids, self.steps, mask)  # (B,k), (B,k,V)


__all__ = ["AudioEmbed", "Decoder", "Drafter", "DrafterSteps", "EmbedTokens", "VisionEmbed", "past_names"]
