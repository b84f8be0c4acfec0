"""The MTP drafter ("gemma4_unified_assistant"): a few query-only decoder layers that read the target's KV.

Our own implementation of transformers' Gemma4UnifiedAssistantForCausalLM, from export/model.py's blocks.
One draft step, for the last seen token at position p (the reference keeps p fixed through a draft round):

    x      = pre_projection([target.embed_tokens(token); h_prev])     # (B, 1, 2*Hb) -> (B, 1, Ha)
    x      = layers(x): each attends, with its own q at position p, the target's KV of its layer type:
             full layers all of it, sliding layers its last sliding_window + 1 entries
    x      = norm(x)
    h_next = post_projection(x)                                        # (B, 1, Hb), the next step's h_prev
    logits = x @ embed.T, or, with use_ordered_embeddings, only the tokens of the top-k centroids
             (the rest get min - 1); no softcap

h_prev starts as the target's final (normed) hidden state of the last accepted token. API:

    assistant.step(token_embeds, prev_hidden, shared_kv, position_ids, kv_mask=None) -> (logits, next_hidden)
    shared_kv = shared_kv_from_present(target.cfg.text, present)  # (sliding_k, sliding_v, full_k, full_v)
    tokens, logits = draft(assistant, target, last_token, last_hidden, shared_kv, position, num_tokens)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from export.model import FULL, KV, SLIDING, Gemma4Unified, TextConfig, TextDecoder, _additive


@dataclass(frozen=True)
class AssistantConfig:
    """The drafter: a TextConfig whose layers are all KV-shared, plus its projections and LM head."""

    text: TextConfig
    backbone_hidden_size: int = 3840  # the target's hidden size
    use_ordered_embeddings: bool = False  # centroid-masked LM head
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True
    # transformers halves the window (+1) of a config that says use_bidirectional_attention="all"
    text_bidirectional_all: bool = False

    def __post_init__(self):
        if self.text.num_kv_shared_layers != self.text.num_hidden_layers:
            all_shared = replace(self.text, num_kv_shared_layers=self.text.num_hidden_layers)
            object.__setattr__(self, "text", all_shared)

    @property
    def window(self) -> int:
        """The window the reference's drafter mask uses (its config's sliding_window after conversion)."""
        sw = self.text.sliding_window
        return sw // 2 + 1 if self.text_bidirectional_all else sw

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> AssistantConfig:
        text = dict(d["text_config"])
        all_mode = text.get("use_bidirectional_attention") == "all"
        if all_mode:
            text["use_bidirectional_attention"] = None  # the drafter builds its own masks
        keys = "backbone_hidden_size use_ordered_embeddings num_centroids centroid_intermediate_top_k"
        extra = {k: d[k] for k in keys.split() if k in d}
        extra["tie_word_embeddings"] = d.get("tie_word_embeddings", True)
        return cls(TextConfig.from_hf(text), text_bidirectional_all=all_mode, **extra)

    def to_hf(self) -> dict[str, Any]:
        text = self.text.to_hf()
        if self.text_bidirectional_all:
            text["use_bidirectional_attention"] = "all"
        return {
            "model_type": "gemma4_unified_assistant",
            "architectures": ["Gemma4UnifiedAssistantForCausalLM"],
            "text_config": text,
            "backbone_hidden_size": self.backbone_hidden_size,
            "use_ordered_embeddings": self.use_ordered_embeddings,
            "num_centroids": self.num_centroids,
            "centroid_intermediate_top_k": self.centroid_intermediate_top_k,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


class CentroidHead(nn.Module):
    """LM head over the tokens of the top-k centroids only; token_ordering lists each centroid's tokens."""

    def __init__(self, cfg: AssistantConfig):
        super().__init__()
        self.top_k, self.num_centroids = cfg.centroid_intermediate_top_k, cfg.num_centroids
        self.centroids = nn.Linear(cfg.text.hidden_size, cfg.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(cfg.text.vocab_size, dtype=torch.long))

    def forward(self, h: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        B, T, _ = h.shape
        top = torch.topk(self.centroids(h), k=self.top_k, dim=-1).indices  # (B, T, k)
        tokens = self.token_ordering.view(self.num_centroids, -1)[top].reshape(B, T, -1)  # (B, T, k*K)
        rows = head[tokens]  # (B, T, k*K, Ha)
        picked = (h.unsqueeze(-2) @ rows.transpose(-1, -2)).squeeze(-2)  # (B, T, k*K)
        floor = picked.min() - 1.0  # one value over the whole batch, as the reference
        out = floor.expand(B, T, head.shape[0]).to(h.dtype).clone()  # (B, T, V)
        return out.scatter(-1, tokens, picked)


class Assistant(nn.Module):
    """Module names follow transformers' Gemma4UnifiedAssistantForCausalLM; a checkpoint maps unchanged."""

    def __init__(self, cfg: AssistantConfig):
        super().__init__()
        self.cfg = cfg
        h, hb = cfg.text.hidden_size, cfg.backbone_hidden_size
        self.model = TextDecoder(cfg.text)  # embed_tokens serves only as the tied LM head
        self.pre_projection = nn.Linear(2 * hb, h, bias=False)
        self.post_projection = nn.Linear(h, hb, bias=False)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(h, cfg.text.vocab_size, bias=False)
        self.masked_embedding = CentroidHead(cfg) if cfg.use_ordered_embeddings else None

    def step(
        self,
        token_embeds: torch.Tensor,
        prev_hidden: torch.Tensor,
        shared_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        position_ids: torch.Tensor,
        kv_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """token_embeds (B, T, Hb) from the target's embed_tokens (scaled); prev_hidden (B, T, Hb);
        shared_kv: the target's (sliding_k, sliding_v, full_k, full_v), (B, kvh, S, hd) each; position_ids
        (B, T); kv_mask (B, S) 1 = real key. Returns logits (B, T, V) and next_hidden (B, T, Hb)."""
        x = self.pre_projection(torch.cat([token_embeds, prev_hidden], dim=-1))  # (B, T, Ha)
        kv = {SLIDING: (shared_kv[0], shared_kv[1]), FULL: (shared_kv[2], shared_kv[3])}
        masks = self.masks(x, kv, kv_mask)
        ropes = self.model.ropes(position_ids, x.dtype)
        for layer in self.model.layers:
            x, _ = layer(x, ropes[layer.layer_type], masks[layer.layer_type], kv[layer.layer_type])
        x = self.model.norm(x)  # (B, T, Ha)
        return self.logits(x), self.post_projection(x)

    def masks(self, x: torch.Tensor, kv: dict[str, KV], kv_mask: torch.Tensor | None) -> dict:
        """Full layers see every (real) key. Sliding layers: query t sees key j when |t - (S-1-j)| <= window,
        i.e. for one query the newest window + 1 keys (the reference flips a bidirectional window mask)."""
        B, T, _ = x.shape
        s_full, s_slide = kv[FULL][0].shape[2], kv[SLIDING][0].shape[2]
        full = torch.ones(B, T, s_full, dtype=torch.bool, device=x.device)  # (B, T, S)
        t = torch.arange(T, device=x.device)[:, None]
        back = s_slide - 1 - torch.arange(s_slide, device=x.device)[None, :]  # distance from the newest key
        sliding = ((t - back).abs() <= self.cfg.window)[None].expand(B, -1, -1)  # (B, T, S')
        if kv_mask is not None:
            full = full & kv_mask[:, None, :s_full].bool()
            sliding = sliding & kv_mask[:, None, -s_slide:].bool()
        return {FULL: _additive(full, x.dtype), SLIDING: _additive(sliding, x.dtype)}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        head = self.lm_head.weight if self.lm_head is not None else self.model.embed_tokens.weight
        if self.masked_embedding is not None:
            return self.masked_embedding(x, head)
        return x @ head.T  # (B, T, V)


def shared_kv_from_present(target: TextConfig, present: list[KV]) -> tuple[torch.Tensor, ...]:
    """The KV the drafter reads: the target's last sliding and last full KV-owning layers."""
    sliding, full = present[target.last_kv_layer(SLIDING)], present[target.last_kv_layer(FULL)]
    return sliding[0], sliding[1], full[0], full[1]


@torch.no_grad()
def draft(
    assistant: Assistant,
    target: Gemma4Unified,
    last_token: torch.Tensor,
    last_hidden: torch.Tensor,
    shared_kv: tuple[torch.Tensor, ...],
    position_ids: torch.Tensor,
    num_tokens: int,
    kv_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy drafting as the reference's candidate generator: last_token (B, 1), last_hidden (B, 1, Hb) the
    target's normed hidden state there, position_ids (B, 1) its position, kept for every draft.
    Returns tokens (B, n) and logits (B, n, V)."""
    tokens, all_logits = [], []
    token, hidden = last_token, last_hidden
    for _ in range(num_tokens):
        logits, hidden = assistant.step(target.embed_tokens(token), hidden, shared_kv, position_ids, kv_mask)
        token = logits.argmax(-1)  # (B, 1)
        tokens.append(token)
        all_logits.append(logits)
    return torch.cat(tokens, dim=1), torch.cat(all_logits, dim=1)
