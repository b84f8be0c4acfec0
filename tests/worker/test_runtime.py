"""The runtime against a real exported model directory: load-time contract checks, device errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rawwave.model_dir import ModelDirError
from tests.worker.conftest import runtime_settings
from worker.runtime import DeviceError, Runtime, providers_for


def edited_copy(model_dir: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "model"
    shutil.copytree(model_dir, out)
    config = json.loads((out / "runtime.json").read_text())
    edit(config)
    (out / "runtime.json").write_text(json.dumps(config))
    return out


def test_loads_and_checks(drafter_runtime: Runtime) -> None:
    assert drafter_runtime.num_layers == len(drafter_runtime.config.layers)
    assert drafter_runtime.drafter is not None


def test_refuses_a_wrong_hidden_size(model_dir: Path, tmp_path: Path) -> None:
    bad = edited_copy(model_dir, tmp_path, lambda c: c.update(hidden_size=c["hidden_size"] + 1))
    with pytest.raises(ModelDirError, match="hidden_size"):
        Runtime(bad, runtime_settings())


def test_refuses_a_wrong_layer_list(model_dir: Path, tmp_path: Path) -> None:
    bad = edited_copy(model_dir, tmp_path, lambda c: c["layers"].pop())
    with pytest.raises(ModelDirError, match="KV layers"):
        Runtime(bad, runtime_settings())


def test_refuses_wrong_kv_heads(model_dir: Path, tmp_path: Path) -> None:
    bad = edited_copy(model_dir, tmp_path, lambda c: c["layers"][0].update(kv_heads=7))
    with pytest.raises(ModelDirError, match=r"layers\[0\].kv_heads"):
        Runtime(bad, runtime_settings())


def test_refuses_a_drafter_spec_that_does_not_match(drafter_model_dir: Path, tmp_path: Path) -> None:
    bad = edited_copy(drafter_model_dir, tmp_path, lambda c: c["drafter"].update(inputs=["nope"]))
    with pytest.raises(ModelDirError, match="drafter"):
        Runtime(bad, runtime_settings())


def test_refuses_drafter_steps_without_their_spec(drafter_model_dir: Path, tmp_path: Path) -> None:
    bad = edited_copy(drafter_model_dir, tmp_path, lambda c: c["drafter"].update(steps=None))
    with pytest.raises(ModelDirError, match="drafter_steps"):
        Runtime(bad, runtime_settings())


def test_cuda_without_the_provider_is_a_clear_error() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(DeviceError, match="rawwave\\[gpu\\]"):
        providers_for("cuda")


def test_incremental_equals_one_prefill(runtime: Runtime) -> None:
    ids = runtime.encode(runtime.config.prompt.transcribe_prefix)
    whole = runtime.start(ids)
    part = runtime.start(ids[:5])
    logits, _, _ = runtime.extend(part.cache, part.length, ids[5:], keep=1)
    np.testing.assert_allclose(logits[-1], whole.logits, atol=1e-4)


def test_truncate_is_exact(runtime: Runtime) -> None:
    ids = runtime.encode("hello there, a longer prompt than the window")
    ctx = runtime.start(ids)
    short = runtime.truncate(ctx.cache, 6)
    logits, _, _ = runtime.extend(short, 6, ids[6:], keep=1)
    np.testing.assert_allclose(logits[-1], ctx.logits, atol=1e-4)
