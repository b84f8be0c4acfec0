"""Drop a run's bottom decoder layers: the inverse of `train.grown`, for layers that growth added and
training left as near-identities (their post-norm scales near zero, so the residual stream passes them
almost unchanged). What the layers above compute is kept exactly; `rawwave eval` says what dropping cost.

The result is a run directory like any other (best.pt + tokenizer.json), so export/save_default.py and
`rawwave train --init` take it unchanged.
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch

from export.dataset import stamped
from export.train import LAYER_PREFIX, POST_NORMS, layer_depth, renumbered, save_atomically


def without_bottom_layers(weights: dict[str, torch.Tensor], drop: int) -> dict[str, torch.Tensor]:
    """`weights` less its bottom `drop` decoder layers, the rest renumbered from 0."""
    depth = layer_depth(weights)
    if not 0 < drop < depth:
        raise ValueError(f"can drop 1 to {depth - 1} of {depth} layers, not {drop}")
    return renumbered(weights, -drop)


def bottom_layer_scales(weights: dict[str, torch.Tensor], count: int) -> list[float]:
    """For each of the bottom `count` layers, the larger mean |scale| of its two post-norms: how much it
    adds to the residual stream."""
    return [
        max(weights[f"{LAYER_PREFIX}{i}.{n}"].abs().mean().item() for n in POST_NORMS) for i in range(count)
    ]


def prune_checkpoint(path: Path, drop: int, out: Path) -> dict:
    """Write out/best.pt: `path` (best.pt / state.pt) less its bottom `drop` layers, its settings' depth to
    match, and the run's tokenizer.json beside it; returns the new checkpoint."""
    state = torch.load(path, weights_only=False, map_location="cpu")
    model = without_bottom_layers(state["model"], drop)
    settings = {**state["settings"], "layers": state["settings"]["layers"] - drop, "run": str(out)}
    pruned = {
        "model": model,
        "ctc_head": state["ctc_head"],
        "step": state["step"],
        "settings": settings,
        "metrics": None,  # measured again by rawwave eval, not inherited
        "pruned": {"source": str(path), "dropped": drop, "scales": bottom_layer_scales(state["model"], drop)},
    }
    out.mkdir(parents=True, exist_ok=True)
    save_atomically(pruned, out / "best.pt")
    shutil.copyfile(path.parent / "tokenizer.json", out / "tokenizer.json")
    return pruned


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a best.pt / state.pt of a run")
    parser.add_argument("--drop-bottom", type=int, required=True, help="how many bottom layers to drop")
    parser.add_argument("--out", type=Path, required=True, help="run directory to write best.pt into")


def run(args: argparse.Namespace) -> int:
    pruned = prune_checkpoint(args.checkpoint, args.drop_bottom, args.out)
    scales = ", ".join(f"{s:.3f}" for s in pruned["pruned"]["scales"])
    stamped(f"dropped {args.drop_bottom} bottom layers (post-norm scales {scales}) of {args.checkpoint}: "
            f"{pruned['settings']['layers']} layers in {args.out / 'best.pt'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m export.prune", description=__doc__.split("\n")[0])
    add_arguments(cli)
    sys.exit(run(cli.parse_args()))
