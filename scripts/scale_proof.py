"""Scale proof (issue 3): export + verify a gemma4_unified model whose decoder is past protobuf's 2 GB.

Not a CI test: a documented, run-by-hand script that records what one run cost.

    nice -n 5 .venv/bin/python scripts/scale_proof.py [--layers 3] [--vocab 8192]

What it does:
1. builds a random-weight `gemma4_unified` with the `12b` preset's widths (hidden 3840, MLP 15360, 16 heads,
   head_dim 256 / 512, k_eq_v full layers) but only --layers decoder layers (default 3: sliding, sliding,
   full) and a --vocab token vocabulary (default 8192), text + audio only (no vision tower): ~730M
   parameters, ~2.9 GB fp32, so decoder.onnx must keep its weights in external data;
2. saves it as an HF-layout checkpoint (export/checkpoint.py `save_model`) into a temporary directory under
   bench/scratch/ (git-ignored);
3. runs `export_model` on it, which exports every graph and verifies it end to end (ORT vs PyTorch logits,
   incremental decoding == one prefill past the sliding window, chunked audio, 32 greedy tokens);
4. writes wall time per phase, peak RSS (per phase, sampled from /proc/self/status; and getrusage's
   ru_maxrss for the process and its children) and the exported file sizes to bench/results/scale_proof.json,
   then deletes the checkpoint and the model directory.

Memory: the export holds the PyTorch model, the ONNX proto and ONNX Runtime's session (weights plus
pre-packed copies) at once, about 3-4 copies of the weights. The script refuses to start with less than
MIN_AVAILABLE_GB available, and kills itself if MemAvailable falls under ABORT_AVAILABLE_GB while running
(the machine may be shared with other jobs).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.report import write_result  # noqa: E402
from export.checkpoint import save_model  # noqa: E402
from export.exporter import export_model  # noqa: E402
from export.model import FULL, SLIDING, Config, Gemma4Unified, count_parameters, with_text  # noqa: E402

SCRATCH = REPO / "bench" / "scratch"
GB = 1e9
MIN_AVAILABLE_GB = 14.0  # refuse to start below this much MemAvailable
ABORT_AVAILABLE_GB = 1.5  # give up (exit) if the machine gets this close to running out
SAMPLE_SECONDS = 0.1


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GB
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GB
    return 0.0


class RssSampler:
    """A background thread: peak RSS per named phase, and a guard against starving the machine."""

    def __init__(self) -> None:
        self.phase, self.peaks = "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            rss = rss_gb()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)
            available = mem_available_gb()
            if available < ABORT_AVAILABLE_GB:
                sys.stderr.write(
                    f"scale_proof: MemAvailable {available:.1f} GB < {ABORT_AVAILABLE_GB} GB during "
                    f"{self.phase!r} (own RSS {rss:.1f} GB); aborting\n"
                )
                os._exit(3)  # a daemon thread cannot raise into the main one; the finally blocks are lost


def scale_config(layers: int, vocab: int) -> Config:
    """The 12b preset's widths, `layers` deep (the last one full attention), a small vocabulary, no vision;
    the special token ids moved inside the vocabulary."""
    types = (SLIDING,) * (layers - 1) + (FULL,)
    cfg = with_text(Config.preset("12b"), num_hidden_layers=layers, layer_types=types, vocab_size=vocab)
    top = vocab - 16
    return dataclasses.replace(
        cfg,
        vision=None,
        boi_token_id=top,
        boa_token_id=top + 1,
        image_token_id=top + 2,
        audio_token_id=top + 3,
        eoi_token_id=top + 4,
        eoa_token_index=top + 5,
        video_token_id=top + 6,
    )


def build_model(cfg: Config) -> Gemma4Unified:
    """Random weights; the (tied) embedding drawn as HF's _init_weights does, N(0, 0.02), not nn.Embedding's
    N(0, 1): with N(0, 1) rows the pre-softcap logits are ~sqrt(hidden) = 62 and plain fp32 rounding alone
    (PyTorch fp32 vs fp64) moves them by ~3e-3, past the verifier's 1e-3 tolerance."""
    model = Gemma4Unified(cfg).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.language_model.embed_tokens.weight, std=0.02)
    return model


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def dir_bytes(path: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=3, help="decoder layers (default 3)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default 8192)")
    parser.add_argument("--threads", type=int, default=2, help="torch / ORT threads (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and model directory")
    args = parser.parse_args()

    available = mem_available_gb()
    if available < MIN_AVAILABLE_GB:
        sys.stderr.write(
            f"scale_proof: only {available:.1f} GB available (MemAvailable); it needs {MIN_AVAILABLE_GB} GB "
            "free to run safely. Stop other jobs or run it later.\n"
        )
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = scale_config(args.layers, args.vocab)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="scale-proof-", dir=SCRATCH))
    checkpoint, out = work / "checkpoint", work / "model"
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    try:
        with RssSampler() as sampler:

            def phase(name: str, fn, *fn_args):
                sampler.phase = name
                t0 = time.perf_counter()
                result = fn(*fn_args)
                seconds[name] = round(time.perf_counter() - t0, 1)
                say(f"{name}: {seconds[name]:.1f} s, peak RSS {sampler.peaks.get(name, 0):.2f} GB")
                return result

            model = phase("build", build_model, cfg)
            params = count_parameters(model)
            say(f"{params / 1e6:.0f}M parameters, {params * 4 / GB:.2f} GB fp32")
            phase("save_checkpoint", save_model, model, checkpoint)
            del model
            gc.collect()
            manifest = phase("export_and_verify", export_model, checkpoint, out)
            files = dir_bytes(out)
        rusage = {
            "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GB,
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = round(time.perf_counter() - started, 1)

    verification = manifest.verification
    export_seconds = verification.pop("export_seconds")
    graph_seconds = sum(v for k, v in export_seconds.items() if k != "total")
    decoder_data = files.get("decoder.onnx.data", 0)
    peak = max(sampler.peaks.values())
    result = {
        "quick": False,
        "headline": (
            f"{params / 1e6:.0f}M-param gemma4_unified exported + verified in "
            f"{seconds['export_and_verify'] / 60:.1f} min, peak RSS {peak:.1f} GB, "
            f"decoder.onnx {decoder_data / GB:.2f} GB external data"
        ),
        "config": {
            "base_preset": "12b",
            "num_hidden_layers": cfg.text.num_hidden_layers,
            "layer_types": list(cfg.text.layer_types),
            "hidden_size": cfg.text.hidden_size,
            "intermediate_size": cfg.text.intermediate_size,
            "vocab_size": cfg.text.vocab_size,
            "vision": None,
            "dtype": "fp32",
            "parameters": params,
            "weight_bytes": params * 4,
        },
        "threads": args.threads,
        "mem_available_gb_at_start": round(available, 1),
        "seconds": {**seconds, "total": total},
        "exporter_seconds": {
            **export_seconds,
            "checks_and_manifest": round(export_seconds["total"] - graph_seconds, 1),
        },
        "peak_rss_gb": {k: round(v, 2) for k, v in sampler.peaks.items() if k != "start"},
        "ru_maxrss_gb": {k: round(v, 2) for k, v in rusage.items()},
        "model_dir_bytes": files,
        "decoder_external_data": "decoder.onnx.data" in files,
        "verification": verification,
    }
    write_result("scale_proof", result)
    say(result["headline"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
