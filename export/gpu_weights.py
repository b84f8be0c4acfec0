"""A training run's weights carried back from a lent GPU machine, whose tool returns files of at most
16 MiB: `split` a run's state.pt into weights-k.pt parts there, `join` them here into a run folder
whose best.pt export.save_default and `rawwave train --init` read (scripts/gpu_train.sh uses both).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from export.dataset import stamped

PART_BYTES = 15 * 2**20
CARRIED = ("metrics.jsonl", "settings.json", "tokenizer.json", "train.log", "data.log")


def split(state_path: Path, out: Path) -> list[Path]:
    """The model's and CTC head's tensors of a state.pt (no optimizer), in parts under PART_BYTES."""
    state = torch.load(state_path, weights_only=False, map_location="cpu")
    tensors = {f"model.{k}": v for k, v in state["model"].items()}
    tensors |= {f"ctc_head.{k}": v for k, v in state["ctc_head"].items()}
    parts: list[dict] = [{}]
    size = 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if parts[-1] and size + nbytes > PART_BYTES:
            parts.append({})
            size = 0
        parts[-1][key], size = value, size + nbytes
    out.mkdir(parents=True, exist_ok=True)
    meta = {"step": state["step"], "settings": state["settings"], "parts": len(parts)}
    paths = [out / f"weights-{k}.pt" for k in range(len(parts))]
    for path, part in zip(paths, parts, strict=True):
        torch.save({"tensors": part, **meta}, path)
    return paths


def join(parts_dir: Path, run: Path) -> Path:
    """Parts (and the logs beside them) -> run/best.pt, with the run's last evaluation as its metrics."""
    paths = sorted(parts_dir.glob("weights-*.pt"))
    if not paths:
        raise SystemExit(f"no weights-*.pt in {parts_dir}")
    parts = [torch.load(p, weights_only=False, map_location="cpu") for p in paths]
    if len(parts) != parts[0]["parts"]:
        raise SystemExit(f"{parts_dir} has {len(parts)} of {parts[0]['parts']} weight parts")
    tensors = {k: v for p in parts for k, v in p["tensors"].items()}
    state = {
        name: {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}
        for name in ("model", "ctc_head")
    }
    run.mkdir(parents=True, exist_ok=True)
    for name in CARRIED:
        if (parts_dir / name).exists():
            shutil.copyfile(parts_dir / name, run / name)
    state.update(step=parts[0]["step"], settings=parts[0]["settings"])
    state["metrics"] = last_eval(run / "metrics.jsonl")
    torch.save(state, run / "best.pt")
    return run / "best.pt"


def last_eval(metrics: Path) -> dict | None:
    if not metrics.exists():
        return None
    evals = [r["eval"] for r in map(json.loads, metrics.read_text().splitlines()) if "eval" in r]
    return evals[-1] if evals else None


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m export.gpu_weights", description=__doc__.split("\n")[0])
    sub = cli.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="state.pt -> OUT/weights-k.pt")
    s.add_argument("state", type=Path)
    s.add_argument("out", type=Path)
    j = sub.add_parser("join", help="PARTS/weights-k.pt -> RUN/best.pt")
    j.add_argument("parts", type=Path)
    j.add_argument("run", type=Path)
    args = cli.parse_args()
    if args.command == "split":
        for path in split(args.state, args.out):
            stamped(f"wrote {path}")
    else:
        stamped(f"wrote {join(args.parts, args.run)}")
    sys.exit(0)
