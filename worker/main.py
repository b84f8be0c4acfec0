"""`rawwave worker`: load the model directory, then own sessions from the queue and publish their events.

SIGTERM or SIGINT: stop claiming, let live sessions finish within drain_timeout_s, hand back the rest,
exit 0. Redis going away never ends the process: it waits (jittered backoff, one log line when Redis
goes and one when it is back) and carries on; see `worker.ownership`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from rawwave.logs import get_logger
from rawwave.settings import Settings
from rawwave.streams import Streams
from worker.metrics import WorkerMetrics, serve_health
from worker.ownership import Worker
from worker.runtime import Runtime

log = get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, help="model directory (default: RAWWAVE_MODEL_DIR)")
    parser.add_argument("--no-mtp", action="store_true", help="decode without the MTP drafter")
    parser.add_argument(
        "--batching", action="store_true", help="batch concurrent sessions' decoder calls (RAWWAVE_BATCHING)"
    )
    parser.add_argument(
        "--max-sessions", type=int, help="sessions at once (default: RAWWAVE_MAX_SESSIONS_PER_WORKER)"
    )
    parser.add_argument(
        "--metrics-port", type=int, help="health + metrics port (default: RAWWAVE_METRICS_PORT)"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    settings = settings.model_copy(update=_overrides(args))
    runtime = Runtime(settings.model_dir, settings)  # a bad model directory fails here, before Redis
    asyncio.run(serve(settings, runtime))
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    updates: dict[str, object] = {}
    if args.model_dir:
        updates["model_dir"] = args.model_dir
    if args.no_mtp:
        updates["mtp"] = False
    if args.batching:
        updates["batching"] = True
    if args.max_sessions:
        updates["max_sessions_per_worker"] = args.max_sessions
    if args.metrics_port is not None:
        updates["metrics_port"] = args.metrics_port
    return updates


async def serve(settings: Settings, runtime: Runtime) -> None:
    streams = Streams.connect(settings)
    metrics = WorkerMetrics()
    worker = Worker(settings, runtime, streams, metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    health = None
    if settings.metrics_port:
        health = await serve_health(settings.metrics_port, metrics, lambda: not worker.stopping.is_set())
    try:
        await worker.run()
    finally:
        if health is not None:
            health.close()
        await streams.close()
