"""Teacher-forced loss per utterance kind, on training utterances and on the held-out ones.

Where a run's held-out loss comes from: kinds whose held-out loss is far above their training loss lean on
text the model has memorized; random words (no language model to lean on) measure the hearing alone.

    .venv/bin/python scripts/loss_by_kind.py checkpoints/train-state --data data/corpus
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import torch

from export import dataset, save_default, tokenizer, train
from export.model import Gemma4Unified


def load(run: Path) -> tuple[Gemma4Unified, torch.nn.Linear, train.TrainSettings]:
    """The run's best weights and settings, prompted as the evaluation prompts (transcript and response),
    with a fresh CTC head: `train.forward` computes its loss too, which this measurement leaves unread."""
    model, _, s = save_default.load_run(run)
    s = replace(s, respond_prob=1.0)
    return model, torch.nn.Linear(s.hidden, train.ctc_classes(s, model.cfg.text.vocab_size)), s


def loss_by_kind(model, head, tok, s, data: dataset.Corpus, indices) -> dict[str, tuple[int, float]]:
    by_kind, rng = collections.defaultdict(list), random.Random(0)
    with torch.no_grad():
        for i in indices:
            audio, rec = data[i]
            example = train.make_example(audio, rec, tok, s, rng, train=False)  # clean audio
            by_kind[rec["kind"]].append(train.forward(model, head, train.collate([example]))[0].item())
    return {kind: (len(v), round(sum(v) / len(v), 3)) for kind, v in sorted(by_kind.items())}


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_argument("run", type=Path, help="a run directory: best.pt (or state.pt) and tokenizer.json")
    cli.add_argument("--data", default="data/corpus")
    cli.add_argument("--count", type=int, default=400, help="utterances per split")
    cli.add_argument("--threads", type=int, default=1)
    args = cli.parse_args()
    torch.set_num_threads(args.threads)
    tok = tokenizer.load(args.run / "tokenizer.json")
    model, head, s = load(args.run)
    train_split, held = dataset.Corpus(args.data, "train"), dataset.Corpus(args.data, "eval-seen")
    every = max(1, len(train_split) // args.count)  # spread over the corpus's shards
    result = {
        "train": loss_by_kind(model, head, tok, s, train_split, range(0, every * args.count, every)),
        "eval-seen": loss_by_kind(model, head, tok, s, held, range(min(args.count, len(held)))),
    }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
