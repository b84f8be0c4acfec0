"""Held-out evaluation of a model directory (HF layout) on the synthesized evaluation splits: greedy
character error rate of the transcript, and exact-match accuracy of the response per utterance kind,
for the training voices ("eval-seen") and the held-out voice family ("eval-heldout")."""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from export import checkpoint, tokenizer
from export.dataset import Corpus, stamped
from export.train import edit_distance, frames_of, greedy


def evaluate_split(model, tok, data: Corpus, limit: int) -> dict:
    frame = model.cfg.audio.audio_embed_dim
    errors, chars, right, seen = 0, 0, defaultdict(int), defaultdict(int)
    for i in range(min(limit, len(data))):
        audio, rec = data[i]
        frames = frames_of(audio, frame)
        transcript, response = tokenizer.split_turn(greedy(model, tok, frames, tokenizer.INSTRUCT_RESPOND))
        errors, chars = errors + edit_distance(transcript, rec["text"]), chars + len(rec["text"])
        seen[rec["kind"]] += 1
        right[rec["kind"]] += response == rec["response"]
    accuracy = {kind: round(right[kind] / n, 3) for kind, n in sorted(seen.items())}
    cer = round(errors / max(1, chars), 4)
    return {"utterances": sum(seen.values()), "cer": cer, "response_exact": accuracy}


def evaluate_model(model_dir: str | Path, data: str | Path, limit: int) -> dict:
    model = checkpoint.load_model(model_dir).eval()
    tok = tokenizer.load(Path(model_dir) / "tokenizer.json")
    splits = ("eval-seen", "eval-heldout")
    return {split: evaluate_split(model, tok, Corpus(data, split), limit) for split in splits}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="checkpoints/default", help="model directory (HF layout)")
    parser.add_argument("--data", default="data/corpus")
    parser.add_argument("--limit", type=int, default=240, help="utterances per split")
    parser.add_argument("--out", default=None, help="also write the report here (JSON)")


def run(args: argparse.Namespace, settings=None) -> int:
    report = evaluate_model(args.model, args.data, args.limit)
    stamped("evaluate " + json.dumps(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m export.evaluate", description=__doc__.split("\n")[0])
    add_arguments(cli)
    sys.exit(run(cli.parse_args()))
