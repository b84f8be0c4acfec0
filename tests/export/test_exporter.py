"""The exporter on a tiny random checkpoint: verified graphs, ORT against PyTorch, quantized variants,
clear errors with nothing left behind, and the no-op re-export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from export import plan
from export.checkpoint import load_model
from export.exporter import ExportError, export_model
from export.tiny import make_tiny_checkpoint
from export.wrappers import past_names
from rawwave.cli import main
from rawwave.model_dir import load_manifest, load_runtime_config, verify_manifest


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    vision, _ = make_tiny_checkpoint(root / "vision", with_assistant=False)
    text, assistant = make_tiny_checkpoint(root / "text", with_assistant=True, vision=False)
    return {"vision": vision, "text": text, "assistant": assistant}


@pytest.fixture(scope="module")
def vision_dir(checkpoints, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "vision"
    export_model(checkpoints["vision"], out)
    return out


@pytest.fixture(scope="module")
def drafter_dir(checkpoints, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "drafter"
    export_model(checkpoints["text"], out, assistant=checkpoints["assistant"])
    return out


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 1, 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def decode(sess, rc, embeds, start, past, keep=0, mask=None):
    positions = np.arange(start, start + embeds.shape[1])[None].repeat(embeds.shape[0], 0)
    feed = {"inputs_embeds": embeds, "position_ids": positions, "num_logits_to_keep": np.array(keep)}
    feed.update(zip(past_names(len(rc.layers)), past, strict=True))
    if mask is not None:
        feed["attention_mask"] = mask
    logits, hidden, *present = sess.run(None, feed)
    return logits, hidden, present


def empty_past(rc, batch=1):
    return [
        np.zeros((batch, layer.kv_heads, 0, layer.head_dim), np.float32) for layer in rc.layers for _ in "kv"
    ]


# ------------------------------------------------------------------------------------------- directories


def test_vision_export_is_a_verified_model_directory(vision_dir):
    rc, manifest = load_runtime_config(vision_dir), load_manifest(vision_dir)
    verify_manifest(vision_dir, manifest)
    assert set(manifest.verification) >= {"logits", "incremental", "audio_chunked", "greedy", "vision"}
    assert manifest.verification["logits"]["max_abs_diff"] <= 1e-3
    assert manifest.verification["audio_chunked"]["chunked_equal"]
    assert len(manifest.verification["greedy"]["tokens"]) == 32
    assert rc.graphs.vision_embed == "vision_embed.onnx" and rc.vision.max_soft_tokens == 280
    assert rc.drafter is None and rc.frame_samples == 640 and rc.tokens.eos == [1, 106]
    assert [layer.type for layer in rc.layers] == ["sliding_attention", "sliding_attention", "full_attention"]
    assert (rc.layers[0].sliding_window, rc.layers[2].sliding_window) == (8, None)
    assert (rc.layers[0].head_dim, rc.layers[2].head_dim, rc.layers[2].kv_heads) == (16, 32, 1)
    optional = {i.name for i in session(vision_dir / "decoder.onnx").get_overridable_initializers()}
    assert optional == {"attention_mask", "image_groups"}


def test_drafter_export_documents_its_io(drafter_dir):
    rc, manifest = load_runtime_config(drafter_dir), load_manifest(drafter_dir)
    assert rc.vision is None and rc.graphs.vision_embed is None
    assert rc.drafter.shared_layers == [1, 2] and rc.drafter.hidden_size == rc.hidden_size
    sess = session(drafter_dir / "drafter.onnx")
    names = [i.name for i in sess.get_inputs()] + [i.name for i in sess.get_overridable_initializers()]
    assert names == rc.drafter.inputs and [o.name for o in sess.get_outputs()] == rc.drafter.outputs
    assert manifest.verification["drafter"]["max_abs_diff"] <= 1e-3


def test_drafter_steps_drafts_a_round_in_one_call(drafter_dir):
    rc, manifest = load_runtime_config(drafter_dir), load_manifest(drafter_dir)
    assert rc.graphs.drafter_steps == "drafter_steps.onnx" and rc.drafter.steps is not None
    sess = session(drafter_dir / "drafter_steps.onnx")
    names = [i.name for i in sess.get_inputs()] + [i.name for i in sess.get_overridable_initializers()]
    assert names == rc.drafter.steps.inputs
    assert [o.name for o in sess.get_outputs()] == rc.drafter.steps.outputs
    checked = manifest.verification["drafter_steps"]
    assert checked["max_abs_diff"] <= 1e-3 and len(checked["drafts"]) == rc.drafter.num_draft_tokens


def test_fp32_graphs_use_fused_norm_and_gelu(drafter_dir):
    for name in ("decoder.onnx", "drafter.onnx", "drafter_steps.onnx"):
        ops = [n.op_type for n in onnx.load(drafter_dir / name).graph.node]
        assert "SimplifiedLayerNormalization" in ops and "FastGelu" in ops, name
        assert "Pow" not in ops or name == "decoder.onnx", name  # the decoder's weightless v_norm stays


def test_no_drafter_steps_when_the_embedding_table_is_too_big(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr("export.exporter.STEPS_MAX_TABLE_BYTES", 1)
    out = tmp_path / "m"
    export_model(checkpoints["text"], out, assistant=checkpoints["assistant"])
    rc = load_runtime_config(out)
    assert rc.graphs.drafter_steps is None and rc.drafter.steps is None
    assert not (out / "drafter_steps.onnx").exists() and (out / "drafter.onnx").is_file()


# --------------------------------------------------------------------------------------- ORT vs PyTorch


def test_ort_logits_match_torch_with_padding_and_kept_rows(vision_dir, checkpoints):
    model, rc = load_model(checkpoints["vision"]), load_runtime_config(vision_dir)
    sess, rng = session(vision_dir / "decoder.onnx"), np.random.default_rng(1)
    embeds = rng.standard_normal((2, 7, rc.hidden_size)).astype(np.float32)
    mask = np.ones((2, 7), np.int64)
    mask[0, :3] = 0  # left padding in row 0
    logits = decode(sess, rc, embeds, 0, empty_past(rc, 2), keep=2, mask=mask)[0]
    with torch.no_grad():
        expected = model.decode(torch.from_numpy(embeds), torch.arange(7).expand(2, 7), [],
                                attention_mask=torch.from_numpy(mask), num_logits_to_keep=2)[0]  # fmt: skip
    assert logits.shape == (2, 2, rc.vocab_size)
    assert np.abs(logits - expected.numpy()).max() <= 1e-3


def test_incremental_decode_equals_full_prefill_past_the_window(vision_dir):
    rc, sess = load_runtime_config(vision_dir), session(vision_dir / "decoder.onnx")
    embed = session(vision_dir / "embed_tokens.onnx")
    ids = np.random.default_rng(2).integers(0, 400, (1, 3 * rc.layers[0].sliding_window))  # 24 tokens
    embeds = embed.run(None, {"input_ids": ids})[0]
    full = decode(sess, rc, embeds, 0, empty_past(rc))[0]
    logits, _, past = decode(sess, rc, embeds[:, :5], 0, empty_past(rc), keep=1)
    for t in range(5, ids.shape[1]):
        assert np.abs(logits[0, -1] - full[0, t - 1]).max() <= 1e-4
        logits, _, past = decode(sess, rc, embeds[:, t : t + 1], t, past, keep=1)
    assert past[0].shape[2] == ids.shape[1]  # present keeps every position; the mask does the windowing


def test_chunked_audio_embedding_is_exact(vision_dir):
    sess = session(vision_dir / "audio_embed.onnx")
    frames = np.random.default_rng(3).uniform(-1, 1, (1, 9, 640)).astype(np.float32)
    whole = sess.run(None, {"audio_frames": frames})[0]
    parts = [sess.run(None, {"audio_frames": frames[:, a:b]})[0] for a, b in [(0, 2), (2, 3), (3, 9)]]
    assert np.array_equal(whole, np.concatenate(parts, 1))


# ------------------------------------------------------------------------------------------- quantized


@pytest.mark.parametrize("quant, op", [("int8", "MatMulInteger"), ("int4", "MatMulNBits")])
def test_quantized_variants_record_agreement(checkpoints, tmp_path, quant, op):
    out = tmp_path / quant
    manifest = export_model(checkpoints["text"], out, checkpoints["assistant"], quant=quant, force=True)
    rc = load_runtime_config(out)
    verify_manifest(out, manifest)
    result = manifest.verification["quantized"]
    assert rc.quant == quant and result["method"] == quant and 0 <= result["top1_agreement"] <= 1
    assert result["tokens"] == 256 and "logit_max_abs_diff" in result
    for name in ("decoder.onnx", "drafter.onnx", "drafter_steps.onnx"):
        assert op in {node.op_type for node in onnx.load(out / name).graph.node}, name
    assert "MatMulInteger" not in {n.op_type for n in onnx.load(out / "audio_embed.onnx").graph.node}
    logits = decode(
        session(out / "decoder.onnx"), rc, np.zeros((1, 3, rc.hidden_size), np.float32), 0, empty_past(rc)
    )[0]
    assert logits.shape == (1, 3, rc.vocab_size)


def test_low_agreement_refuses_without_force(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr("export.verify.MIN_AGREEMENT", 1.01)
    with pytest.raises(ExportError, match="--force"):
        export_model(checkpoints["text"], tmp_path / "m", quant="int4")
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------- failures


def broken_copy(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    state = load_file(target / "model.safetensors")
    edit(state)
    save_file(state, target / "model.safetensors")
    return target


def test_missing_tensor_is_named_and_nothing_is_left(checkpoints, tmp_path):
    bad = broken_copy(
        checkpoints["text"],
        tmp_path / "bad",
        lambda s: s.pop("model.embed_audio.embedding_projection.weight"),
    )
    out_parent = tmp_path / "models"
    out_parent.mkdir()
    with pytest.raises(ExportError, match=r"model\.embed_audio\.embedding_projection\.weight"):
        export_model(bad, out_parent / "m")
    assert list(out_parent.iterdir()) == []


def test_wrong_shape_names_tensor_and_expected_shape(checkpoints, tmp_path):
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    bad = broken_copy(checkpoints["text"], tmp_path / "bad", lambda s: s.update({name: s[name][:-1]}))
    with pytest.raises(ExportError, match=rf"{name}.*expected \(64, 64\)"):
        export_model(bad, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_not_a_checkpoint_and_foreign_output_dir(checkpoints, tmp_path):
    with pytest.raises(ExportError, match=r"config\.json"):
        export_model(tmp_path, tmp_path / "m")
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a model directory"):
        export_model(checkpoints["text"], foreign)
    assert (foreign / "todo.txt").read_text() == "keep me"


def test_checkpoint_without_tokenizer_exports_with_a_warning(checkpoints, tmp_path, capsys):
    source = tmp_path / "ckpt"
    shutil.copytree(checkpoints["text"], source)
    (source / "tokenizer.json").unlink()
    manifest = export_model(source, tmp_path / "m")
    assert "tokenizer.json" not in manifest.files and "decoder.onnx" in manifest.files
    captured = capsys.readouterr()
    assert "no_tokenizer" in captured.out + captured.err


# --------------------------------------------------------------------------------------------- re-export


def test_re_export_is_a_no_op_until_the_source_or_options_change(vision_dir, checkpoints, capsys):
    before = {f.name: f.stat().st_mtime_ns for f in vision_dir.iterdir()}
    export_model(checkpoints["vision"], vision_dir)
    assert "up to date" in capsys.readouterr().out
    assert {f.name: f.stat().st_mtime_ns for f in vision_dir.iterdir()} == before
    trainer = checkpoints["vision"] / "rawwave_runtime.json"
    trainer.write_text(
        json.dumps({"streaming": {"partial_interval_ms": 320}, "prompt": {"turn_end": "<eos>"}})
    )
    try:
        export_model(checkpoints["vision"], vision_dir)
        rc = load_runtime_config(vision_dir)
        assert rc.streaming.partial_interval_ms == 320 and rc.prompt.turn_end == "<eos>"
    finally:
        trainer.unlink()


# ------------------------------------------------------------------------------------------------ plan


def test_plan_splits_kv_by_layer_type_and_cli_prints_it(capsys):
    p = plan.memory_plan(plan.load_config("12b"), "fp16", "int4", 8192)
    assert 11.5e9 < p["config"]["parameters"] < 12.5e9
    assert p["kv_cache"]["sliding_attention"] == 40 * 2 * 8 * 256 * 2 * 8192
    assert p["kv_cache"]["full_attention"] == 8 * 2 * 4 * 512 * 2 * 8192
    assert main(["export", "--plan", "12b", "--quant", "int4", "--dtype", "fp16", "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert "sliding_attention" in out and "total" in out
