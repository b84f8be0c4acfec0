"""`rawwave export`: an HF-layout checkpoint in, a self-describing model directory out.

Writes the graphs, tokenizer.json, runtime.json and manifest.json of rawwave/model_dir.py into a temporary
directory next to the output, verifies them against PyTorch (export/verify.py), and renames it into place:
a failed export leaves nothing behind. Re-running with the same checkpoint and options is a no-op.
`--plan 12b` prints the memory plan of a configuration instead (export/plan.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from export import fuse, plan, quantize, verify
from export.assistant import Assistant
from export.checkpoint import CheckpointError, load_assistant, load_model
from export.model import SLIDING, Gemma4Unified
from export.wrappers import AudioEmbed, Decoder, Drafter, DrafterSteps, EmbedTokens, VisionEmbed, past_names
from rawwave.errors import RawwaveError
from rawwave.logs import get_logger
from rawwave.model_dir import (
    MANIFEST_FILE,
    RUNTIME_CONFIG_FILE,
    TOKENIZER_FILE,
    DrafterSpec,
    DraftStepsSpec,
    GraphFiles,
    LayerSpec,
    Manifest,
    ManifestFile,
    ModelDirError,
    PromptFormat,
    RuntimeConfig,
    StreamingSpec,
    TokenIds,
    VisionSpec,
    file_sha256,
    load_manifest,
    load_runtime_config,
    verify_manifest,
)

log = get_logger(__name__)

OPSET = 17
# Bumped when the exporter writes different graphs from the same checkpoint, so that an existing model
# directory is re-exported (2: fused norms / GELU, drafter_steps.onnx).
EXPORT_REVISION = "2"
TRAINER_FILE = "rawwave_runtime.json"  # optional, in the checkpoint: prompt / streaming / token overrides
NUM_DRAFT_TOKENS = 4
# drafter_steps.onnx carries a copy of the target's embedding table; above this size (a real Gemma 4: 2 GB)
# the copy costs more memory than the saved calls are worth, and only the step graph is written.
STEPS_MAX_TABLE_BYTES = 256 << 20
MAX_SOFT_TOKENS = 280  # the Gemma 4 image processor's default soft tokens per image
# Gemma 4's chat turn around the audio; a trainer that used other pieces writes them to TRAINER_FILE.
DEFAULT_PROMPT = PromptFormat(
    transcribe_prefix="<bos><|turn>user\nTranscribe the audio.<|audio>",
    respond_prefix="<bos><|turn>user\nTranscribe the audio, then respond.<|audio>",
    audio_suffix="<audio|><turn|>\n<|turn>model\n",
    transcript_end="\n",
    turn_end="<turn|>",
)
GEMMA4_TOKENS = {"bos": "<bos>", "pad": "<pad>", "eos": ["<eos>", "<turn|>"]}
GEMMA4_IDS = {"bos": 2, "pad": 0, "eos": [1, 106]}  # when the checkpoint has no tokenizer


class ExportError(RawwaveError):
    """The checkpoint cannot be exported (bad tensors, failed verification, unsafe output path)."""


# ------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", type=Path, help="HF-layout checkpoint (default: settings)")
    parser.add_argument("--assistant", type=Path, help="MTP assistant checkpoint: also write drafter.onnx")
    parser.add_argument("--out", type=Path, help="model directory to write (default: settings' model_dir)")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument(
        "--quant", choices=["int8", "int4"], help="quantize the decoder (and drafter) weights"
    )
    parser.add_argument(
        "--force", action="store_true", help="re-export when up to date; accept low agreement"
    )
    parser.add_argument(
        "--plan", metavar="CONFIG_OR_PRESET", help="print a memory plan (12b, tiny, config.json)"
    )
    parser.add_argument("--context", type=int, default=8192, help="--plan: tokens of context per session")
    parser.add_argument("--sessions", type=int, default=1, help="--plan: concurrent sessions (KV caches)")


def default_assistant(checkpoint: Path) -> Path | None:
    """The drafter that travels with a checkpoint: `<checkpoint>/assistant` or `<checkpoint>-assistant`."""
    for candidate in (checkpoint / "assistant", checkpoint.with_name(checkpoint.name + "-assistant")):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def run(args: argparse.Namespace, settings: Any) -> int:
    if args.plan:
        cfg = plan.load_config(args.plan)
        print(plan.render(plan.memory_plan(cfg, args.dtype, args.quant, args.context, args.sessions)))  # noqa: T201
        return 0
    checkpoint, out = args.checkpoint or settings.checkpoint, args.out or settings.model_dir
    assistant = args.assistant or default_assistant(checkpoint)
    manifest = export_model(checkpoint, out, assistant, args.dtype, args.quant, args.force)
    size = sum(f.bytes for f in manifest.files.values())
    print(f"{out}: {len(manifest.files)} files, {size / 1e6:.1f} MB, verified")  # noqa: T201
    return 0


# ---------------------------------------------------------------------------------------------- export


def export_model(
    checkpoint: Path,
    out: Path,
    assistant: Path | None = None,
    dtype: str = "fp32",
    quant: str | None = None,
    force: bool = False,
) -> Manifest:
    """Export checkpoint (and assistant) to the model directory out; returns its manifest."""
    checkpoint, out = Path(checkpoint), Path(out)
    assistant = Path(assistant) if assistant else None
    source = source_sha256(checkpoint, assistant)
    current = None if force else up_to_date(out, source, dtype, quant)
    if current is not None:
        print(f"{out} is up to date (checkpoint {source[:12]}, {dtype}, quant={quant})")  # noqa: T201
        return current
    _check_output(out)
    model, drafter = _load(checkpoint, assistant, dtype)
    scratch = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        manifest = _write(scratch, checkpoint, model, drafter, dtype, quant, force, source)
        _move_into_place(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def up_to_date(out: Path, source: str, dtype: str, quant: str | None) -> Manifest | None:
    """The existing manifest when out was exported from this source with these options and is intact."""
    if not (out / MANIFEST_FILE).is_file():
        return None
    try:
        manifest, rc = load_manifest(out), load_runtime_config(out)
        verify_manifest(out, manifest)
    except ModelDirError:
        return None
    same = manifest.source_checkpoint_sha256 == source and (rc.dtype, rc.quant) == (dtype, quant)
    return manifest if same and manifest.versions.get("export") == EXPORT_REVISION else None


def source_sha256(checkpoint: Path, assistant: Path | None) -> str:
    """One hash over every file of the checkpoint (and assistant): names and contents."""
    if not (checkpoint / "config.json").is_file():
        raise ExportError(f"{checkpoint}: not a checkpoint (no config.json)")
    digest = hashlib.sha256()
    for prefix, folder in (("", checkpoint), ("assistant/", assistant)):
        for file in sorted(folder.iterdir()) if folder else []:
            if file.is_file() and not file.name.startswith("."):
                digest.update(f"{prefix}{file.name}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / RUNTIME_CONFIG_FILE).exists():
        raise ExportError(f"{out} is a non-empty directory that is not a model directory; not overwriting it")


def _load(checkpoint: Path, assistant: Path | None, dtype: str) -> tuple[Gemma4Unified, Assistant | None]:
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    try:
        model = load_model(checkpoint, dtype=torch_dtype)
        drafter = load_assistant(assistant, dtype=torch_dtype) if assistant else None
    except (CheckpointError, ValueError, KeyError) as e:
        raise ExportError(f"cannot load checkpoint: {e}") from e
    if model.cfg.audio is None:
        raise ExportError(f"{checkpoint}: the model has no audio_config; rawwave needs audio input")
    if drafter is not None and drafter.cfg.backbone_hidden_size != model.cfg.text.hidden_size:
        raise ExportError(
            f"{assistant}: backbone_hidden_size {drafter.cfg.backbone_hidden_size}, "
            f"expected the target's hidden_size {model.cfg.text.hidden_size}"
        )
    return model, drafter


def _move_into_place(scratch: Path, out: Path) -> None:
    """Swap the finished directory in; the old one (if any) goes only after the new one is there."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    scratch.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _write(scratch, checkpoint, model, drafter, dtype, quant, force, source) -> Manifest:
    scratch.mkdir(parents=True)
    started, timings = time.perf_counter(), {}
    rc = runtime_config(checkpoint, model, drafter, dtype, quant)
    tokenizer = checkpoint / TOKENIZER_FILE
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, scratch / TOKENIZER_FILE)
    else:
        log.warning("export.no_tokenizer", checkpoint=str(checkpoint), note="copy a tokenizer.json in later")
    with torch.no_grad():
        for name, export in _graph_exports(model, drafter, rc).items():
            t0 = time.perf_counter()
            export(scratch / name)
            timings[name] = round(time.perf_counter() - t0, 2)
    (scratch / RUNTIME_CONFIG_FILE).write_text(rc.model_dump_json(indent=2) + "\n")
    results = run_checks(scratch, model, drafter, rc.model_copy(update={"quant": None}), checkpoint)
    if quant:
        results["quantized"] = _quantize(scratch, rc, quant, force, checkpoint)
    results["export_seconds"] = {**timings, "total": round(time.perf_counter() - started, 1)}
    return _write_manifest(scratch, source, results)


# ---------------------------------------------------------------------------------------------- graphs


def _graph_exports(model: Gemma4Unified, drafter: Assistant | None, rc: RuntimeConfig) -> dict:
    exports = {
        rc.graphs.embed_tokens: lambda path: export_embed_tokens(model, path),
        rc.graphs.audio_embed: lambda path: export_audio_embed(model, path),
        rc.graphs.decoder: lambda path: export_decoder(model, path),
    }
    if rc.graphs.vision_embed:
        exports[rc.graphs.vision_embed] = lambda path: export_vision_embed(model, path)
    if rc.graphs.drafter:
        exports[rc.graphs.drafter] = lambda path: export_drafter(drafter, model, path)
    if rc.graphs.drafter_steps:
        steps = rc.drafter.num_draft_tokens
        exports[rc.graphs.drafter_steps] = lambda path: export_drafter_steps(drafter, model, path, steps)
    return exports


def _float(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def export_embed_tokens(model: Gemma4Unified, path: Path) -> None:
    ids = torch.tensor([[2, 3, 4]])
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "inputs_embeds": {0: "batch", 1: "sequence"}}
    _export(EmbedTokens(model), (ids,), path, ["input_ids"], ["inputs_embeds"], axes)


def export_audio_embed(model: Gemma4Unified, path: Path) -> None:
    frames = torch.zeros(1, 3, model.cfg.audio.audio_embed_dim)
    axes = {"audio_frames": {0: "batch", 1: "frames"}, "audio_embeds": {0: "batch", 1: "frames"}}
    _export(AudioEmbed(model), (frames,), path, ["audio_frames"], ["audio_embeds"], axes)


def export_vision_embed(model: Gemma4Unified, path: Path) -> None:
    patches = torch.zeros(1, 3, model.cfg.vision.patch_dim)
    xy = torch.tensor([[[0, 0], [1, 0], [-1, -1]]])
    axes = {name: {0: "batch", 1: "patches"} for name in VisionEmbed.INPUTS + VisionEmbed.OUTPUTS}
    _export(VisionEmbed(model), (patches, xy), path, VisionEmbed.INPUTS, VisionEmbed.OUTPUTS, axes)


def export_decoder(model: Gemma4Unified, path: Path) -> None:
    """Traced with batch 2, 3 new tokens, 5 past: no dimension is 0 or 1, so none is specialised."""
    text, dtype = model.cfg.text, _float(model)
    with_groups = model.cfg.vision is not None and text.use_bidirectional_attention == "vision"
    wrapper = Decoder(model, with_groups)
    batch, new, past = 2, 3, 5
    kv = [
        torch.zeros(batch, text.layer_kv_heads(i), past, text.layer_head_dim(i), dtype=dtype)
        for i in range(wrapper.num_kv_layers)
        for _ in ("key", "value")
    ]
    args = [
        torch.zeros(batch, new, text.hidden_size, dtype=dtype),
        torch.arange(past, past + new).expand(batch, -1),
    ]
    args += [torch.ones(batch, past + new, dtype=torch.long)]
    args += [torch.full((batch, past + new), -1)] if with_groups else []
    args += [torch.tensor(1), *kv]
    axes = {
        "inputs_embeds": {0: "batch", 1: "sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "image_groups": {0: "batch", 1: "groups_sequence"},
        "logits": {0: "batch", 1: "kept_sequence"},
        "last_hidden_state": {0: "batch", 1: "sequence"},
    }
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in past_names(wrapper.num_kv_layers)})
    axes.update(
        {name: {0: "batch", 2: "total_sequence"} for name in past_names(wrapper.num_kv_layers, "present")}
    )
    inputs, optional = wrapper.input_names(), ["attention_mask", "image_groups"][: 1 + with_groups]
    _export(wrapper, tuple(args), path, inputs, wrapper.output_names(), axes, optional)


def export_drafter(assistant: Assistant, model: Gemma4Unified, path: Path) -> None:
    hidden = torch.zeros(2, 3, model.cfg.text.hidden_size, dtype=_float(model))  # batch 2, 3 tokens
    args = (hidden, hidden, torch.zeros(2, 3, dtype=torch.long), *_shared_kv(model, batch=2, kv_len=5))
    axes = {name: {0: "batch", 1: "sequence"} for name in ["token_embeds", "prev_hidden", "position_ids"]}
    axes.update({name: {0: "batch", 2: "kv_sequence"} for name in Drafter.INPUTS[3:7]})
    axes.update({"attention_mask": {0: "batch", 1: "kv_sequence"}})
    axes.update({name: {0: "batch", 1: "sequence"} for name in Drafter.OUTPUTS})
    _export(Drafter(assistant), args, path, Drafter.INPUTS, Drafter.OUTPUTS, axes, ["attention_mask"])


def export_drafter_steps(assistant: Assistant, model: Gemma4Unified, path: Path, steps: int) -> None:
    hidden = torch.zeros(2, 1, model.cfg.text.hidden_size, dtype=_float(model))  # batch 2, one position
    token, position = torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)
    args = (token, hidden, position, *_shared_kv(model, batch=2, kv_len=5))
    names = DrafterSteps.INPUTS
    axes = {name: {0: "batch"} for name in [*names[:3], *DrafterSteps.OUTPUTS]}
    axes.update({name: {0: "batch", 2: "kv_sequence"} for name in names[3:7]})
    axes.update({"attention_mask": {0: "batch", 1: "kv_sequence"}})
    wrapper = DrafterSteps(assistant, model, steps)
    _export(wrapper, args, path, names, DrafterSteps.OUTPUTS, axes, ["attention_mask"])


def _shared_kv(model: Gemma4Unified, batch: int, kv_len: int) -> tuple[torch.Tensor, ...]:
    """Example shared KV for the drafter graphs: sliding key, value, full key, value; then a mask."""
    text, dtype = model.cfg.text, _float(model)

    def kv(i: int) -> torch.Tensor:
        return torch.zeros(batch, text.layer_kv_heads(i), kv_len, text.layer_head_dim(i), dtype=dtype)

    slide, full = text.last_kv_layer(SLIDING), text.last_kv_layer("full_attention")
    return kv(slide), kv(slide), kv(full), kv(full), torch.ones(batch, kv_len, dtype=torch.long)


def _export(module, args, path: Path, inputs, outputs, axes, optional=()) -> None:
    """TorchScript-trace to ONNX, then give each optional input a (1, 0) default (the graph treats an empty
    tensor as 'not given'; ORT lets an input that is also an initializer go unfed). The trace goes to a
    folder of its own: for a graph over 2 GB the exporter writes one file per tensor there."""
    axes = {k: v for k, v in axes.items() if k in inputs or k in outputs}
    trace_dir = path.parent / f".trace-{path.stem}"
    trace_dir.mkdir()
    try:
        torch.onnx.export(
            module.eval(), args, str(trace_dir / path.name), input_names=list(inputs),
            output_names=list(outputs), dynamic_axes=axes, opset_version=OPSET, dynamo=False,
        )  # fmt: skip
        graph = onnx.load(str(trace_dir / path.name))
    finally:
        shutil.rmtree(trace_dir)
    for name in optional:
        graph.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 0), np.int64), name))
    if _float(module) == torch.float32:  # ORT's CPU FastGelu is fp32 only
        log.debug("export.fused", graph=path.name, **fuse.fuse(graph))
    quantize.save(graph, path)


# ----------------------------------------------------------------------------------------- runtime.json


def runtime_config(
    checkpoint: Path, model: Gemma4Unified, drafter: Assistant | None, dtype, quant
) -> RuntimeConfig:
    cfg, text = model.cfg, model.cfg.text
    trainer = _trainer_overrides(checkpoint)
    layers = [
        LayerSpec(
            type=text.layer_types[i],
            kv_heads=text.layer_kv_heads(i),
            head_dim=text.layer_head_dim(i),
            sliding_window=text.sliding_window if text.layer_types[i] == SLIDING else None,
        )
        for i in range(text.first_kv_shared_layer)
    ]
    vision = _vision_spec(model) if cfg.vision else None
    steps = drafter is not None and _steps_fit(model)
    return RuntimeConfig(
        model_type="gemma4_unified",
        dtype=dtype,
        quant=quant,
        hidden_size=text.hidden_size,
        vocab_size=text.vocab_size,
        frame_samples=cfg.audio.audio_embed_dim,
        layers=layers,
        tokens=_token_ids(checkpoint, model, trainer.get("tokens", {})),
        prompt=PromptFormat(**{**DEFAULT_PROMPT.model_dump(), **trainer.get("prompt", {})}),
        streaming=StreamingSpec(**trainer.get("streaming", {})),
        graphs=GraphFiles(
            vision_embed="vision_embed.onnx" if vision else None,
            drafter="drafter.onnx" if drafter else None,
            drafter_steps="drafter_steps.onnx" if steps else None,
        ),
        vision=vision,
        drafter=_drafter_spec(model, drafter, trainer, steps) if drafter else None,
    )


def _steps_fit(model: Gemma4Unified) -> bool:
    """Whether drafter_steps.onnx is written: its copy of the target's embedding table is small enough."""
    table = model.language_model.embed_tokens.weight
    fits = table.numel() * table.element_size() <= STEPS_MAX_TABLE_BYTES
    if not fits:
        log.info("export.no_drafter_steps", table_mb=round(table.numel() * table.element_size() / 2**20))
    return fits


def _trainer_overrides(checkpoint: Path) -> dict:
    """What the trainer recorded next to the checkpoint: {"prompt": {...}, "streaming": {...},
    "tokens": {...}, "num_draft_tokens": n}, each optional, field names as in rawwave/model_dir.py."""
    file = checkpoint / TRAINER_FILE
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{file}: not JSON ({e})") from e


def _token_ids(checkpoint: Path, model: Gemma4Unified, overrides: dict) -> TokenIds:
    cfg = model.cfg
    ids = dict(GEMMA4_IDS)
    vocab = _tokenizer_vocab(checkpoint / TOKENIZER_FILE)
    if vocab:
        missing = [t for t in (GEMMA4_TOKENS["bos"], GEMMA4_TOKENS["pad"], "<eos>") if t not in vocab]
        if missing:
            raise ExportError(f"{checkpoint / TOKENIZER_FILE}: no special token {missing[0]}")
        ids = {
            "bos": vocab["<bos>"],
            "pad": vocab["<pad>"],
            "eos": [vocab[t] for t in GEMMA4_TOKENS["eos"] if t in vocab],
        }
    ids.update(boa=cfg.boa_token_id, eoa=cfg.eoa_token_index, audio=cfg.audio_token_id)
    if cfg.vision:
        ids.update(boi=cfg.boi_token_id, eoi=cfg.eoi_token_id, image=cfg.image_token_id)
    return TokenIds(**{**ids, **overrides})


def _tokenizer_vocab(file: Path) -> dict[str, int]:
    if not file.is_file():
        return {}
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(file)).get_vocab(with_added_tokens=True)


def _vision_spec(model: Gemma4Unified) -> VisionSpec:
    v = model.cfg.vision
    return VisionSpec(
        patch_size=v.patch_size,
        pooling_kernel_size=v.pooling_kernel_size,
        max_soft_tokens=MAX_SOFT_TOKENS,
        inputs=list(VisionEmbed.INPUTS),
        outputs=list(VisionEmbed.OUTPUTS),
    )


def _drafter_spec(model: Gemma4Unified, drafter: Assistant, trainer: dict, steps: bool) -> DrafterSpec:
    text = model.cfg.text
    return DrafterSpec(
        num_draft_tokens=trainer.get("num_draft_tokens", NUM_DRAFT_TOKENS),
        hidden_size=drafter.cfg.backbone_hidden_size,
        shared_layers=[text.last_kv_layer(SLIDING), text.last_kv_layer("full_attention")],
        inputs=list(Drafter.INPUTS),
        outputs=list(Drafter.OUTPUTS),
        steps=DraftStepsSpec(inputs=list(DrafterSteps.INPUTS), outputs=list(DrafterSteps.OUTPUTS))
        if steps
        else None,
    )


# ---------------------------------------------------------------------------------------- verification


def reference_inputs(checkpoint: Path, rc: RuntimeConfig) -> tuple[np.ndarray, np.ndarray]:
    """The reference prompt: the transcribe prompt around 12 frames of audio, as ids (1, T) and frames."""
    frames = verify.reference_frames(12, rc.frame_samples)
    audio = [rc.tokens.audio] * frames.shape[1]
    vocab_file = checkpoint / TOKENIZER_FILE
    if vocab_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(vocab_file))

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False).ids

        ids = encode(rc.prompt.transcribe_prefix) + audio + encode(rc.prompt.audio_suffix)
    else:
        ids = [rc.tokens.bos, rc.tokens.boa, *audio, rc.tokens.eoa]
    return np.array([ids], dtype=np.int64), frames


def run_checks(directory: Path, model, drafter, rc: RuntimeConfig, checkpoint: Path) -> dict:
    onnx_model = verify.OrtModel(directory, rc)
    ids, frames = reference_inputs(checkpoint, rc)
    results = {
        "logits": verify.check_logits(model, onnx_model, ids, frames),
        "incremental": verify.check_incremental(onnx_model, ids),
        "audio_chunked": verify.check_audio_chunked(model, onnx_model, frames),
        "greedy": verify.check_greedy(model, onnx_model, ids, frames),
    }
    if drafter is not None:
        results["drafter"] = verify.check_drafter(model, drafter, onnx_model, ids)
    if onnx_model.drafter_steps is not None:
        results["drafter_steps"] = verify.check_drafter_steps(model, drafter, onnx_model, ids)
    if rc.vision is not None:
        results["vision"] = verify.check_vision(model, onnx_model)
    log.info("export.verified", **{k: v.get("max_abs_diff", True) for k, v in results.items()})
    return results


def _quantize(directory: Path, rc: RuntimeConfig, quant: str, force: bool, checkpoint: Path) -> dict:
    """Quantize the decoder (and drafter) in place, after measuring the quantized decoder against the
    float one; below verify.MIN_AGREEMENT top-1 agreement the export stops unless forced."""
    names = [rc.graphs.decoder, *(name for name in (rc.graphs.drafter, rc.graphs.drafter_steps) if name)]
    staging = directory / ".quantized"  # same file names, so external-data references stay valid
    staging.mkdir()
    for name in names:
        quantize.quantize(directory / name, staging / name, quant, rc.dtype)
    float_model = verify.OrtModel(directory, rc.model_copy(update={"quant": None}))
    quant_model = verify.OrtModel(directory, rc, decoder_file=f"{staging.name}/{rc.graphs.decoder}")
    result = verify.quantized_agreement(float_model, quant_model, reference_inputs(checkpoint, rc)[0])
    result.update(method=quant, block_size=quantize.INT4_BLOCK if quant == "int4" else None)
    log.info("export.quantized", **result)
    if result["top1_agreement"] < verify.MIN_AGREEMENT and not force:
        raise ExportError(
            f"{quant} decoder agrees with the float one on {result['top1_agreement']:.1%} of top-1 tokens "
            f"(< {verify.MIN_AGREEMENT:.0%}); use --force to export it anyway"
        )
    for name in names:
        (directory / f"{name}.data").unlink(missing_ok=True)
    for file in staging.iterdir():
        file.replace(directory / file.name)
    staging.rmdir()
    return result


def _write_manifest(directory: Path, source: str, results: dict) -> Manifest:
    files = {
        file.name: ManifestFile(sha256=file_sha256(file), bytes=file.stat().st_size)
        for file in sorted(directory.iterdir())
        if file.is_file()
    }
    import onnxruntime

    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    versions["export"] = EXPORT_REVISION
    manifest = Manifest(
        files=files, opset=OPSET, versions=versions, source_checkpoint_sha256=source, verification=results
    )
    (directory / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest
