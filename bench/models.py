"""The model directories the benchmarks run: the exported default model, or a tiny random one (--quick).

Exports go to bench/scratch/ (git-ignored); the exporter skips an export that is up to date, so only a
changed checkpoint (the default model is still being trained) costs a new export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.report import REPO

SCRATCH = REPO / "bench" / "scratch"
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "default"
ASSISTANT_CANDIDATES = (DEFAULT_CHECKPOINT / "assistant", REPO / "checkpoints" / "default-assistant")


@dataclass(frozen=True)
class BenchModel:
    directory: Path  # the exported model directory
    checkpoint: Path
    assistant: Path | None  # a trained assistant checkpoint, when one exists
    tiny: bool  # the random tiny model of export/tiny.py (smoke runs only)

    def describe(self) -> dict[str, object]:
        from export.exporter import source_sha256
        from rawwave.model_dir import load_manifest

        manifest = load_manifest(self.directory)
        return {
            "checkpoint": str(self.checkpoint.relative_to(REPO)),
            "checkpoint_sha256": source_sha256(self.checkpoint, None),  # the target alone
            "export_source_sha256": manifest.source_checkpoint_sha256,  # target + assistant
            "assistant": str(self.assistant.relative_to(REPO)) if self.assistant else None,
            "trained": _trained(self.checkpoint),
            "tiny_random": self.tiny,
            "model_dir": str(self.directory.relative_to(REPO)),
        }


def trained_assistant() -> Path | None:
    return next((p for p in ASSISTANT_CANDIDATES if (p / "config.json").is_file()), None)


def bench_model(quick: bool, assistant: Path | None = None, quant: str | None = None) -> BenchModel:
    """quick: the tiny random model (+ its random assistant); else checkpoints/default (+ `assistant`,
    by default the trained one if it exists)."""
    suffix = f"-{quant}" if quant else ""
    if quick:
        checkpoint, tiny_assistant = tiny_checkpoint()
        out = SCRATCH / f"tiny-model{suffix}"
        _export(checkpoint, out, tiny_assistant, quant)
        return BenchModel(out, checkpoint, tiny_assistant, True)
    assistant = assistant if assistant is not None else trained_assistant()
    name = "default-model" + ("-mtp" if assistant else "") + suffix
    _export(DEFAULT_CHECKPOINT, SCRATCH / name, assistant, quant)
    return BenchModel(SCRATCH / name, DEFAULT_CHECKPOINT, assistant, False)


def _export(checkpoint: Path, out: Path, assistant: Path | None, quant: str | None) -> None:
    """Export (a no-op when up to date); a quantized export below the exporter's agreement bar is
    forced through: the benchmark reports its agreement instead of refusing it."""
    from export.exporter import ExportError, export_model

    try:
        export_model(checkpoint, out, assistant, quant=quant)
    except ExportError:
        if not quant:
            raise
        export_model(checkpoint, out, assistant, quant=quant, force=True)


def tiny_checkpoint() -> tuple[Path, Path]:
    """export/tiny.py's random checkpoint with an untied LM head (a tied random head only echoes)."""
    import torch

    from export.assistant import Assistant
    from export.checkpoint import save_assistant, save_model
    from export.model import Gemma4Unified, with_text
    from export.tiny import tiny_assistant_config, tiny_config, write_tiny_tokenizer

    root = SCRATCH / "tiny-checkpoint"
    checkpoint, assistant = root / "model", root / "assistant"
    if not (assistant / "config.json").is_file():
        torch.manual_seed(0)
        model = Gemma4Unified(with_text(tiny_config(vision=False), tie_word_embeddings=False))
        save_model(model, checkpoint)
        write_tiny_tokenizer(checkpoint / "tokenizer.json")
        save_assistant(Assistant(tiny_assistant_config(model.cfg)), assistant)
    return checkpoint, assistant


def random_assistant_for_default() -> Path:
    """An untrained (seeded random) assistant shaped for the default model: with no trained drafter yet,
    it measures what drafting costs when almost nothing is accepted."""
    import torch

    from export.assistant import Assistant
    from export.checkpoint import load_model, save_assistant
    from export.tiny import tiny_assistant_config

    out = SCRATCH / "default-random-assistant"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        target = load_model(DEFAULT_CHECKPOINT)
        save_assistant(Assistant(tiny_assistant_config(target.cfg)), out)
    return out


def _trained(checkpoint: Path) -> object:
    """What the trainer recorded about this checkpoint (prompt.json's `trained`), if anything."""
    import json

    try:
        return json.loads((checkpoint / "prompt.json").read_text()).get("trained")
    except (OSError, ValueError):
        return None
