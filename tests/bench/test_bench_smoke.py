"""Every benchmark runs end to end at --quick sizes and writes a strict-JSON result with its keys.

Results go to a scratch folder, never over the committed bench/results/. Timings are never asserted.
"""

from __future__ import annotations

import importlib
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import bench.report
from bench.cli import BENCHMARKS

pytestmark = pytest.mark.e2e

COMMON = ("benchmark", "machine", "quick", "headline", "settings", "versions", "load_before", "load_after")
KEYS = {
    "latency": ("model", "paths", "samples"),
    "throughput": ("model", "workers", "best_sessions", "streams_per_core", "cores", "batching"),
    "mtp": ("model", "speedup", "acceptance", "identical", "mean_accepted_length", "summary", "samples"),
    "export": ("model", "ort_vs_torch", "quantized", "slice_12b"),
    "peer": ("model", "peer", "splits"),
    "batching": ("model", "threads", "pays_from", "max_abs_logit_diff"),
}


def _strict(constant: str) -> Any:
    raise ValueError(f"not strict JSON: {constant}")


@pytest.fixture
def results(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private results folder in the git-ignored scratch area (inside the repo, as write_result wants)."""
    folder = bench.report.REPO / "bench" / "scratch" / f"test-results-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(bench.report, "RESULTS", folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("name", list(KEYS))
def test_quick_run_writes_result(name: str, results: Path) -> None:
    module = importlib.import_module(BENCHMARKS[name])
    assert module.main(quick=True) == 0
    result = json.loads((results / f"{name}.json").read_text(), parse_constant=_strict)
    assert result["benchmark"] == name
    assert result["quick"] is True
    for key in (*COMMON, *KEYS[name]):
        assert key in result, f"{name}.json lacks {key!r}"
    assert isinstance(result["headline"], str) and result["headline"]
    assert result["model"]["tiny_random"] is True
    _check(name, result)


def _check(name: str, result: dict[str, Any]) -> None:
    if name == "latency":
        assert set(result["paths"]) == {"webrtc", "file"}
        assert all(p["utterances"] == 2 and p["timed_out"] == 0 for p in result["paths"].values())
    elif name == "throughput":
        assert set(result["workers"]) == {"1", "2"}
        assert result["workers"]["1"]["1"]["all_done"]
        assert set(result["batching"]) == {"1", "2"}
        for level in result["batching"].values():
            assert level["off"]["all_done"] and level["on"]["all_done"] and level["events_identical"]
    elif name == "mtp":
        assert result["identical"] is True  # speculation never changes the output
        assert 0.0 <= result["acceptance"] <= 1.0
    elif name == "export":
        assert set(result["quantized"]) == {"fp32", "int8", "int4"}
        assert result["slice_12b"]["hidden_size"] == 3840
    elif name == "peer":
        held = result["splits"]["held_out_voice"]
        assert set(held) == {"rawwave_streaming", "rawwave_batch", "pocketsphinx"}
        assert all(s["voice"].startswith("flite:slt") for s in held["pocketsphinx"]["samples"])
    elif name == "batching":
        assert set(result["threads"]) == {"1", "2"} and set(result["threads"]["1"]) == {"1", "2"}
        assert result["max_abs_logit_diff"] <= 1e-4
