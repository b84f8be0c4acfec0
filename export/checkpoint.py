"""Checkpoints in the Hugging Face layout: config.json plus safetensors (one file, or shards with an index),
with transformers' tensor names, so a downloaded Gemma 4 12B (and its assistant) loads unchanged and what we
save loads in transformers.

    model = load_model(path, dtype=torch.bfloat16)        # Gemma4Unified
    assistant = load_assistant(path)                      # Assistant
    save_model(model, path); save_assistant(assistant, path)

Loading builds the module on the meta device and assigns each tensor as it is read, so a big checkpoint
never sits in memory twice. Any mismatch raises CheckpointError naming the tensor and what was expected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from export.assistant import Assistant, AssistantConfig
from export.model import Config, Gemma4Unified

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024**3

# Tensors a checkpoint may leave out, with the value transformers initialises them to.
OPTIONAL = {"layer_scalar": torch.ones}


class CheckpointError(Exception):
    """The checkpoint does not match the model it claims to be."""


# ------------------------------------------------------------------------------------------------ load


def read_config(path: str | Path, model_type: str) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: no config.json")
    d = json.loads(file.read_text())
    if d.get("model_type") != model_type:
        raise CheckpointError(f"{file}: model_type {d.get('model_type')!r}, expected {model_type!r}")
    return d


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> Gemma4Unified:
    cfg = Config.from_hf(read_config(path, "gemma4_unified"))
    return _load(lambda: Gemma4Unified(cfg), path, _model_prefix, dtype, device)


def load_assistant(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> Assistant:
    cfg = AssistantConfig.from_hf(read_config(path, "gemma4_unified_assistant"))
    return _load(lambda: Assistant(cfg), path, _same_name, dtype, device)


# On disk the vision patch embedding is "vision_embedder" and its projection sits directly under
# "embed_vision" (transformers renames them on load and back on save: its conversion_mapping.py).
VISION_ON_DISK = [
    (re.compile(r"^embed_vision\.multimodal_embedder\."), "embed_vision."),
    (
        re.compile(r"^embed_vision\.(patch_ln1|patch_dense|patch_ln2|pos_embedding|pos_norm)\b"),
        r"vision_embedder.\1",
    ),
]


def _model_prefix(name: str) -> str:
    if name == "lm_head.weight":
        return name
    for pattern, replacement in VISION_ON_DISK:
        name = pattern.sub(replacement, name)
    return "model." + name


def _same_name(name: str) -> str:
    return name


def _load(build: Callable[[], nn.Module], path, hf_name, dtype, device) -> nn.Module:
    with torch.device("meta"):
        module = build()
    expected = {hf_name(k): (k, t) for k, t in module.state_dict().items()}
    files = _weight_files(Path(path))
    found = {name: file for file, names in files.items() for name in names}
    _check_names(expected, found, module)
    state = {}
    for file, names in files.items():
        with safe_open(file, framework="pt", device=str(device)) as f:
            for hf in names:
                if hf in expected:
                    ours, like = expected[hf]
                    state[ours] = _read(f, file, hf, like, dtype)
    for hf, (ours, like) in expected.items():
        if ours not in state:  # an OPTIONAL tensor the checkpoint left out
            default = OPTIONAL[hf.rsplit(".", 1)[-1]]
            state[ours] = default(like.shape, dtype=dtype or like.dtype, device=device)
    module.load_state_dict(state, assign=True)
    return module.eval()


def _weight_files(path: Path) -> dict[Path, list[str]]:
    if (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        by_file = {}
        for name, file in weight_map.items():
            by_file.setdefault(path / file, []).append(name)
        return by_file
    if (path / WEIGHTS).is_file():
        with safe_open(path / WEIGHTS, framework="pt") as f:
            return {path / WEIGHTS: list(f.keys())}
    raise CheckpointError(f"{path}: neither {WEIGHTS} nor {INDEX}")


def _check_names(expected: dict, found: dict, module: nn.Module) -> None:
    tied = getattr(module, "lm_head", None) is None  # transformers may still write the tied head
    missing = [n for n in expected if n not in found and n.rsplit(".", 1)[-1] not in OPTIONAL]
    unexpected = [n for n in found if n not in expected and not (tied and n == "lm_head.weight")]
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]} (and {len(missing) - 1} more)")
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]} (and {len(unexpected) - 1} more)")


def _read(f, file: Path, name: str, like: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    shape = tuple(f.get_slice(name).get_shape())
    if shape != tuple(like.shape):
        raise CheckpointError(f"tensor {name}: shape {shape} in {file.name}, expected {tuple(like.shape)}")
    target = dtype if dtype is not None and like.is_floating_point() else like.dtype
    return f.get_tensor(name).to(target)


# ------------------------------------------------------------------------------------------------ save


def save_model(model: Gemma4Unified, path: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    _save(model, model.cfg.to_hf(), path, _model_prefix, max_shard_bytes)


def save_assistant(assistant: Assistant, path: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    _save(assistant, assistant.cfg.to_hf(), path, _same_name, max_shard_bytes)


def _save(module: nn.Module, config: dict, path, hf_name, max_shard_bytes: int) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {hf_name(k): t.detach().contiguous().cpu() for k, t in module.state_dict().items()}
    config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shards = list(_shards(state, max_shard_bytes))
    if len(shards) == 1:
        save_file(shards[0], path / WEIGHTS, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard, size = {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name], size = t, size + nbytes
    yield shard
