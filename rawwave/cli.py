"""The `rawwave` command: one entry point, a subcommand per job, each living in its own module.

A subcommand module exposes `add_arguments(parser)` and `run(args, settings) -> int`; it is imported
only when its subcommand runs, so `rawwave push` never pays for torch and `rawwave --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from rawwave.errors import RawwaveError
from rawwave.logs import configure_logging
from rawwave.settings import SettingsError, load_settings

# name -> (module, one-line summary, example)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "up": (
        "rawwave.up",
        "run the local stack (redis-server, ingest, workers), supervised",
        "rawwave up --workers 2",
    ),
    "ingest": (
        "ingest.server",
        "serve the web page, WHIP signaling and the HTTP API",
        "rawwave ingest --port 8080",
    ),
    "worker": ("worker.main", "run inference: own sessions from the queue, publish events", "rawwave worker"),
    "push": ("ingest.push", "push audio files into the queue, print session ids", "rawwave push talk.wav"),
    "transcribe": (
        "ingest.transcribe",
        "push a file and print its transcript",
        "rawwave transcribe talk.wav",
    ),
    "consume": ("ingest.consume", "follow sessions' events as JSON lines", "rawwave consume --all"),
    "export": (
        "export.exporter",
        "export a checkpoint to an ONNX model directory",
        "rawwave export ckpt --out m",
    ),
    "data": ("export.dataset", "synthesize the training speech corpus", "rawwave data --out data/corpus"),
    "train": ("export.train", "train the default model", "rawwave train"),
    "train-drafter": (
        "export.train_drafter",
        "train the MTP drafter on the target's own greedy outputs",
        "rawwave train-drafter",
    ),
    "eval": (
        "export.evaluate",
        "evaluate a model directory (WER, skills, MTP)",
        "rawwave eval models/default",
    ),
    "compare": (
        "export.compare",
        "compare two eval reports, skills utterance by utterance",
        "rawwave compare runs/eval/a.json runs/eval/b.json",
    ),
    "bench": ("bench.cli", "run a benchmark, write bench/results/NAME.json", "rawwave bench queue"),
    "settings": (
        "rawwave.settings_cmd",
        "print the configuration table or current values",
        "rawwave settings",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        return _usage(argv)
    name = argv[0]
    try:
        module = _load(name)
        parser = _parser_for(name, module)
        args = parser.parse_args(argv[1:])
        settings = load_settings()
        configure_logging(settings)
        return int(module.run(args, settings) or 0)
    except (RawwaveError, SettingsError) as e:
        return _fail(str(e), getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        return 130


def _usage(argv: list[str]) -> int:
    lines = ["usage: rawwave COMMAND [options]   (rawwave COMMAND --help for more)", "", "commands:"]
    lines += [f"  {name:<11} {summary}" for name, (_, summary, _) in COMMANDS.items()]
    unknown = bool(argv) and argv[0] not in ("-h", "--help")
    out = sys.stderr if unknown else sys.stdout
    if unknown:
        lines.insert(0, f"rawwave: unknown command {argv[0]!r}")
    out.write("\n".join(lines) + "\n")
    return 2 if unknown else 0


def _load(name: str) -> ModuleType:
    module_name = COMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name in ("torch", "onnx", "safetensors", "onnxscript", "transformers"):
            raise RawwaveError(
                f"`rawwave {name}` needs the export extra ({e.name} is missing): "
                "pip install 'rawwave[export]'"
            ) from e
        if e.name == module_name:
            raise RawwaveError(f"`rawwave {name}` is not available in this build") from e
        raise


def _parser_for(name: str, module: ModuleType) -> argparse.ArgumentParser:
    _, summary, example = COMMANDS[name]
    doc = (module.__doc__ or summary).strip()
    parser = argparse.ArgumentParser(
        prog=f"rawwave {name}",
        description=doc,
        epilog=f"example: {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return parser


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"rawwave: {message}\n")
    return code or 1


if __name__ == "__main__":
    raise SystemExit(main())
