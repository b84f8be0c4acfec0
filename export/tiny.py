"""A tiny random `gemma4_unified` checkpoint (+ assistant) with a small Gemma-4-style tokenizer.json, so the
worker's and ingest's tests can run real ONNX sessions before a trained model exists.

The model is export/model.py's `tiny` preset cut to 3 layers (sliding, sliding, full; window 8): every
feature the 12B has (k_eq_v full layers with their own head_dim and kv heads, softcapping, vision, audio),
milliseconds per step on a CPU. Token ids match the preset's small vocabulary (512).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from export.assistant import Assistant, AssistantConfig
from export.checkpoint import save_assistant, save_model
from export.model import FULL, SLIDING, Config, Gemma4Unified, TextConfig, with_text

VOCAB_SIZE = 512
BYTES_START = 244  # 256 byte-level symbols at 244..499, then the multimodal placeholders at 500..506
# The Gemma 4 special tokens at their Gemma 4 ids where those fit the vocabulary, else the tiny preset's.
SPECIALS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<|turn>": 105,
    "<turn|>": 106,
    "<|image|>": 500,
    "<|audio|>": 501,
    "<|video|>": 502,
    "<|image>": 503,
    "<image|>": 504,
    "<|audio>": 505,
    "<audio|>": 506,
}


def tiny_config(vision: bool = True) -> Config:
    cfg = with_text(Config.preset("tiny"), num_hidden_layers=3, layer_types=(SLIDING, SLIDING, FULL))
    return cfg if vision else replace(cfg, vision=None)


def tiny_assistant_config(target: Config) -> AssistantConfig:
    t = target.text
    text = TextConfig(
        vocab_size=t.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=t.num_key_value_heads,  # the drafter attends the target's KV: same shapes
        head_dim=t.head_dim,
        global_head_dim=t.global_head_dim,
        num_global_key_value_heads=t.num_global_key_value_heads,
        attention_k_eq_v=t.attention_k_eq_v,
        layer_types=(SLIDING, FULL),
        sliding_window=t.sliding_window,
        num_kv_shared_layers=2,
    )
    return AssistantConfig(text=text, backbone_hidden_size=t.hidden_size)


def make_tiny_checkpoint(
    path: Path, with_assistant: bool = True, seed: int = 0, vision: bool = True
) -> tuple[Path, Path | None]:
    """Write a random tiny checkpoint to path/model (and its assistant to path/assistant).
    Returns (checkpoint dir, assistant dir or None). Deterministic for a seed."""
    torch.manual_seed(seed)
    model = _jitter_norms(Gemma4Unified(tiny_config(vision)))
    checkpoint = Path(path) / "model"
    save_model(model, checkpoint)
    write_tiny_tokenizer(checkpoint / "tokenizer.json")
    if not with_assistant:
        return checkpoint, None
    assistant_dir = Path(path) / "assistant"
    save_assistant(_jitter_norms(Assistant(tiny_assistant_config(model.cfg))), assistant_dir)
    return checkpoint, assistant_dir


def _jitter_norms(module: torch.nn.Module) -> torch.nn.Module:
    """Norm weights and layer scalars off 1, so an export that drops one is caught."""
    with torch.no_grad():
        for name, p in module.state_dict().items():
            if name.endswith(("norm.weight", "layer_scalar")):
                p.add_(0.1 * torch.randn_like(p))
    return module


def write_tiny_tokenizer(file: Path) -> None:
    """Byte-level BPE without merges: every byte is a token, the special tokens are single tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {f"<unused{i}>": i for i in range(VOCAB_SIZE)}
    vocab.update({symbol: BYTES_START + i for i, symbol in enumerate(sorted(alphabet))})
    vocab.update(SPECIALS)
    vocab = {token: i for token, i in vocab.items() if token not in _shadowed(vocab)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIALS))
    file.write_text(json.dumps(json.loads(tokenizer.to_str()), indent=1, ensure_ascii=False) + "\n")


def _shadowed(vocab: dict[str, int]) -> set[str]:
    """The <unusedN> fillers whose id a real token took."""
    taken = {i for token, i in vocab.items() if not token.startswith("<unused")}
    return {token for token, i in vocab.items() if token.startswith("<unused") and i in taken}
