"""Average the weights of training runs that share an ancestor (a model soup: Wortsman et al., 2022;
WiSE-FT interpolation). Two stages fine-tuned from the same weights toward different skill mixes sit in
one basin, and the straight line between them keeps much of each: a CPU-cheap way to keep what one stage
taught without losing what the other kept.

The result is a run directory like any other (best.pt + tokenizer.json), so export/save_default.py and
`rawwave train --init` take it unchanged.
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch

from export.dataset import stamped
from export.train import save_atomically


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


def mixed(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = sum(w * t.to(torch.float64) for w, t in zip(weights, tensors, strict=True))
    return total.to(tensors[0].dtype)


def average_weights(states: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of each tensor; the states must hold the same names and shapes."""
    names = states[0].keys()
    for state in states[1:]:
        if state.keys() != names:
            raise ValueError(f"the checkpoints hold different tensors: {sorted(set(names) ^ set(state))[:4]}")
        for name in names:
            if state[name].shape != states[0][name].shape:
                raise ValueError(
                    f"{name}: shapes {tuple(states[0][name].shape)} and {tuple(state[name].shape)}"
                )
    return {name: mixed([s[name] for s in states], weights) for name in names}


def normalised(weights: list[float], count: int) -> list[float]:
    weights = weights or [1.0] * count
    if len(weights) != count or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"need {count} non-negative weights with a positive sum, got {weights}")
    return [w / sum(weights) for w in weights]


def average_checkpoints(paths: list[Path], weights: list[float], out: Path) -> dict:
    """Write out/best.pt, the soup of `paths` (best.pt / state.pt files), with the first one's settings and
    the first run's tokenizer.json beside it; returns the soup's bookkeeping."""
    weights = normalised(weights, len(paths))
    states = [load(p) for p in paths]
    soup = {
        "model": average_weights([s["model"] for s in states], weights),
        "ctc_head": average_weights([s["ctc_head"] for s in states], weights),
        "step": states[0]["step"],
        "settings": states[0]["settings"],
        "metrics": None,  # a soup's held-out loss is measured by rawwave eval, not inherited
        "averaged": [
            {"source": str(p), "step": s["step"], "weight": w}
            for p, s, w in zip(paths, states, weights, strict=True)
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    save_atomically(soup, out / "best.pt")
    shutil.copyfile(paths[0].parent / "tokenizer.json", out / "tokenizer.json")
    return soup


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", type=Path, help="best.pt / state.pt files of related runs")
    parser.add_argument(
        "--weights", nargs="*", type=float, default=[], help="one per checkpoint (default equal)"
    )
    parser.add_argument("--out", type=Path, required=True, help="run directory to write best.pt into")


def run(args: argparse.Namespace) -> int:
    soup = average_checkpoints(args.checkpoints, args.weights, args.out)
    parts = ", ".join(f"{a['weight']:.2f} x {a['source']} (step {a['step']})" for a in soup["averaged"])
    stamped(f"averaged {parts} into {args.out / 'best.pt'}")
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m export.average", description=__doc__.split("\n")[0])
    add_arguments(cli)
    sys.exit(run(cli.parse_args()))
