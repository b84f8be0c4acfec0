"""`rawwave up`: the embedded local stack — redis-server, ingest and N workers as supervised children.

Each service runs as its own process with its own command line (`rawwave ingest`, `rawwave worker`),
exactly as compose runs them. A child that crashes is restarted with backoff; Ctrl-C or SIGTERM
stops everything (children also die with us: PR_SET_PDEATHSIG), so nothing is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from rawwave.errors import RawwaveError
from rawwave.local_stack import (
    StackState,
    clear_stack_state,
    free_port,
    redis_server_command,
    wait_for_port,
    write_stack_state,
)
from rawwave.logs import get_logger
from rawwave.settings import Settings

log = get_logger(__name__)

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 30.0  # a child that ran this long gets its backoff reset
POLL_S = 0.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=1, help="worker processes to run (default 1)")
    parser.add_argument("--host", default=None, help="ingest bind address (default RAWWAVE_HOST)")
    parser.add_argument("--port", type=int, default=None, help="ingest port (default RAWWAVE_PORT)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.workers < 0:
        raise RawwaveError("--workers must be >= 0")
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    stack = Stack(settings, host, port, args.workers)
    return stack.run()


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    restarts: int = field(default=0)

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, env=self.env, preexec_fn=_die_with_parent)
        self.started_at = time.monotonic()
        self.restart_at = None
        log.info("child started", child=self.name, pid=self.process.pid)

    def check(self, now: float) -> None:
        """Restart a child that exited, after a backoff that grows while it keeps crashing."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.restarts += 1
                self.start()
            return
        if self.process is None or self.process.poll() is None:
            return
        if now - self.started_at > HEALTHY_AFTER_S:
            self.backoff_s = BACKOFF_START_S
        log.warning(
            "child exited, restarting", child=self.name, code=self.process.returncode, in_s=self.backoff_s
        )
        self.restart_at = now + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, BACKOFF_MAX_S)

    def stop(self, timeout_s: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("child did not stop in time, killing it", child=self.name)
            self.process.kill()
            self.process.wait()


class Stack:
    def __init__(self, settings: Settings, host: str, port: int, workers: int) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self.workers = workers
        self.children: list[Child] = []
        self._stopping = False

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            redis_url = self._start_redis()
            self._start_services(redis_url)
            self._announce(redis_url)
            while not self._stopping:
                now = time.monotonic()
                for child in self.children:
                    child.check(now)
                time.sleep(POLL_S)
        finally:
            self._stop_all()
        return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("stopping the stack", signal=signal.Signals(signum).name)
        self._stopping = True

    def _start_redis(self) -> str:
        if self.settings.redis_url:
            return self.settings.redis_url
        binary = shutil.which("redis-server")
        if binary is None:
            raise RawwaveError(
                "redis-server is not installed: `sudo apt-get install redis-server` (Debian/Ubuntu), "
                "`brew install redis` (macOS), or set RAWWAVE_REDIS_URL to a running Redis"
            )
        data_dir = self.settings.state_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        child = Child("redis", redis_server_command(binary, port, data_dir), dict(os.environ))
        self.children.append(child)
        child.start()
        if not wait_for_port(port):
            raise RawwaveError(f"redis-server did not start on port {port}: see {data_dir / 'redis.log'}")
        return f"redis://127.0.0.1:{port}/0"

    def _start_services(self, redis_url: str) -> None:
        env = dict(os.environ) | {"RAWWAVE_REDIS_URL": redis_url}
        if _has_module("ingest.server"):
            ingest_env = env | {"RAWWAVE_HOST": self.host, "RAWWAVE_PORT": str(self.port)}
            self.children.append(Child("ingest", _rawwave("ingest"), ingest_env))
        else:
            log.warning("ingest is not part of this build yet; running without it")
        if _has_module("worker.main"):
            for index in range(1, self.workers + 1):
                worker_env = env | {"RAWWAVE_WORKER_NAME": f"{socket.gethostname()}-worker-{index}"}
                self.children.append(Child(f"worker-{index}", _rawwave("worker"), worker_env))
        elif self.workers:
            log.warning("the worker is not part of this build yet; running without it")
        for child in self.children:
            if child.process is None:
                child.start()

    def _announce(self, redis_url: str) -> None:
        url = f"http://{'localhost' if self.host in ('0.0.0.0', '127.0.0.1') else self.host}:{self.port}/"
        write_stack_state(
            self.settings.state_dir, StackState(redis_url=redis_url, ingest_url=url, pid=os.getpid())
        )
        sys.stdout.write(
            f"rawwave is up: open {url}  (redis {redis_url}, {self.workers} worker(s); Ctrl-C stops)\n"
        )
        sys.stdout.flush()

    def _stop_all(self) -> None:
        # services first (they drain into Redis), Redis last
        for child in sorted(self.children, key=lambda c: c.name == "redis"):
            child.stop(self.settings.drain_timeout_s + 5)
        clear_stack_state(self.settings.state_dir)
        log.info("stack stopped", restarts={c.name: c.restarts for c in self.children})


def _rawwave(command: str) -> list[str]:
    return [sys.executable, "-m", "rawwave.cli", command]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if `rawwave up` dies, even by kill -9 (no orphans)."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
