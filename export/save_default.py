"""Write a training run's best (or latest) weights as our default model directory, in the Hugging Face
layout: config.json + model.safetensors (export/checkpoint.py), tokenizer.json (+ tokenizer_config.json),
generation_config.json, prompt.json (the prompt contract the worker builds) and, for a run trained in the
interleaved format, rawwave_runtime.json (the exporter's prompt and streaming overrides). The CTC head is
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


def load_run(run: Path, which: str = "best") -> tuple[Gemma4Unified, dict, TrainSettings]:
    """The model of run/{which}.pt (falls back to state.pt), that file's bookkeeping, its settings."""
    path = run / f"{which}.pt"
    if not path.exists():
        path = run / "state.pt"
    state = torch.load(path, weights_only=False, map_location="cpu")  # a CUDA run's state.pt too
    s = TrainSettings(**state["settings"])
    vocab = tokenizer.load(run / "tokenizer.json").get_vocab_size()
    model = Gemma4Unified(model_config(s, vocab))
    model.load_state_dict(state["model"])
    info = {"source": str(path), "step": state["step"], "metrics": state.get("metrics")}
    if "averaged" in state:  # a soup of runs (export/average.py): which ones, weighted how
        info["averaged"] = state["averaged"]
    return model.eval(), info, s


def prompt_contract(s: TrainSettings) -> dict:
    if s.format == "interleaved":
        return interleaved_contract(s)
    return {
        "format": "<bos><|turn>user\\n{instruction}<|audio>{<|audio|> x frames}<audio|><turn|>\\n"
        "<|turn>model\\n",
        "instructions": {"transcribe": tokenizer.INSTRUCT_TRANSCRIBE, "respond": tokenizer.INSTRUCT_RESPOND},
        "model_turn": "{transcript}<turn|> (transcribe); {transcript}\\n{response}<turn|> (respond)",
        "partial_audio": "use the transcribe instruction: it was trained to emit the words completed so far",
        "audio_samples_per_token": s.frame,
        "sample_rate": 16000,
        "stop_token_ids": [tokenizer.TURN_END, tokenizer.EOS],
    }


def interleaved_contract(s: TrainSettings) -> dict:
    return {
        "format": "<bos><|turn>user\\n{instruction}<|audio>{<|audio|> x chunk}<audio|>{words}<|audio>... "
        "<audio|>{words}<turn|>\\n<|turn>model\\n",
        "chunk_frames": s.chunk_frames,
        "words": "after each chunk, the words that end within it (a space before all but the first); the "
        "model predicts <|audio> when it has written them",
        "instructions": {"transcribe": tokenizer.INSTRUCT_TRANSCRIBE, "respond": tokenizer.INSTRUCT_RESPOND},
        "model_turn": "<turn|> (transcribe); {response}<turn|> (respond)",
        "audio_samples_per_token": s.frame,
        "sample_rate": 16000,
        "stop_token_ids": [tokenizer.TURN_END, tokenizer.EOS],
    }


def runtime_overrides(s: TrainSettings) -> dict:
    """rawwave_runtime.json for the exporter (rawwave/model_dir.py field names): the interleaved prompt
    pieces and streaming format; the branch format is the exporter's default."""
    user = "<bos><|turn>user\n"
    return {
        "prompt": {
            "transcribe_prefix": user + tokenizer.INSTRUCT_TRANSCRIBE,
            "respond_prefix": user + tokenizer.INSTRUCT_RESPOND,
            "audio_suffix": "<turn|>\n<|turn>model\n",
        },
        "streaming": {"format": "interleaved", "chunk_frames": s.chunk_frames},
    }


def save_default(run: str | Path, out: str | Path, which: str = "best") -> dict:
    run, out = Path(run), Path(out)
    model, info, s = load_run(run, which)
    checkpoint.save_model(model, out)
    shutil.copyfile(run / "tokenizer.json", out / "tokenizer.json")
    ids = tokenizer.config_token_ids()
    generation = {"bos_token_id": ids["bos_token_id"], "pad_token_id": ids["pad_token_id"],
                  "eos_token_id": [tokenizer.TURN_END, tokenizer.EOS]}  # fmt: skip
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "prompt.json").write_text(json.dumps({**prompt_contract(s), "trained": info}, indent=2) + "\n")
    overrides = out / "rawwave_runtime.json"
    if s.format == "interleaved":
        overrides.write_text(json.dumps(runtime_overrides(s), indent=2) + "\n")
    else:
        overrides.unlink(missing_ok=True)
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
