"""Write a training run's best (or latest) weights as our default model directory, in the Hugging Face
layout: config.json + model.safetensors (export/checkpoint.py), tokenizer.json (+ tokenizer_config.json),
generation_config.json and prompt.json (the prompt contract the worker builds). The CTC head is
training-only and not written.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from export import checkpoint, tokenizer
from export.dataset import stamped
from export.model import Gemma4Unified
from export.train import TrainSettings, model_config

# Lets transformers' AutoTokenizer load tokenizer.json with Gemma's special-token roles.
TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "model_max_length": 8192,
}


def load_run(run: Path, which: str = "best") -> tuple[Gemma4Unified, dict]:
    """The model of run/{which}.pt (falls back to state.pt), and that file's bookkeeping."""
    path = run / f"{which}.pt"
    if not path.exists():
        path = run / "state.pt"
    state = torch.load(path, weights_only=False)
    s = TrainSettings(**state["settings"])
    vocab = tokenizer.load(run / "tokenizer.json").get_vocab_size()
    model = Gemma4Unified(model_config(s, vocab))
    model.load_state_dict(state["model"])
    return model.eval(), {"source": str(path), "step": state["step"], "metrics": state.get("metrics")}


def prompt_contract(frame: int) -> dict:
    return {
        "format": "<bos><|turn>user\\n{instruction}<|audio>{<|audio|> x frames}<audio|><turn|>\\n"
        "<|turn>model\\n",
        "instructions": {"transcribe": tokenizer.INSTRUCT_TRANSCRIBE, "respond": tokenizer.INSTRUCT_RESPOND},
        "model_turn": "{transcript}<turn|> (transcribe); {transcript}\\n{response}<turn|> (respond)",
        "partial_audio": "use the transcribe instruction: it was trained to emit the words completed so far",
        "audio_samples_per_token": frame,
        "sample_rate": 16000,
        "stop_token_ids": [tokenizer.TURN_END, tokenizer.EOS],
    }


def save_default(run: str | Path, out: str | Path, which: str = "best") -> dict:
    run, out = Path(run), Path(out)
    model, info = load_run(run, which)
    checkpoint.save_model(model, out)
    shutil.copyfile(run / "tokenizer.json", out / "tokenizer.json")
    ids = tokenizer.config_token_ids()
    generation = {"bos_token_id": ids["bos_token_id"], "pad_token_id": ids["pad_token_id"],
                  "eos_token_id": [tokenizer.TURN_END, tokenizer.EOS]}  # fmt: skip
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    frame = model.cfg.audio.audio_embed_dim
    (out / "prompt.json").write_text(json.dumps({**prompt_contract(frame), "trained": info}, indent=2) + "\n")
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default=TrainSettings().run)
    parser.add_argument("--out", default="checkpoints/default")
    parser.add_argument("--which", choices=["best", "state"], default="best")


def run(args: argparse.Namespace, settings=None) -> int:
    info = save_default(args.run, args.out, args.which)
    stamped(f"saved {info['source']} (step {info['step']}) to {args.out}")
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m export.save_default", description=__doc__.split("\n")[0])
    add_arguments(cli)
    sys.exit(run(cli.parse_args()))
