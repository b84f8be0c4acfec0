"""Run one benchmark by name and write bench/results/NAME.json; `table` regenerates the README table."""

from __future__ import annotations

import argparse
import importlib

from rawwave.errors import RawwaveError
from rawwave.settings import Settings

BENCHMARKS = {
    "queue": "bench.stream_queue",
    "latency": "bench.latency",
    "throughput": "bench.throughput",
    "mtp": "bench.mtp",
    "export": "bench.export_bench",
    "peer": "bench.peer",
    "batching": "bench.batching",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=[*BENCHMARKS, "table"], help="benchmark to run, or `table`")
    parser.add_argument("--quick", action="store_true", help="a small run (smoke test; not for the README)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.name == "table":
        from bench.report import update_readme

        update_readme()
        return 0
    try:
        module = importlib.import_module(BENCHMARKS[args.name])
    except ModuleNotFoundError as e:
        raise RawwaveError(f"benchmark {args.name!r} is not available in this build ({e.name})") from e
    return int(module.main(quick=args.quick) or 0)
