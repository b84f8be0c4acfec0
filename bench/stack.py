"""The real stack as subprocesses for the end-to-end benchmarks: a private redis-server, `rawwave worker`
processes and (optionally) `rawwave ingest`, all on loopback, all stopped on exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType

import redis

from bench.report import REPO
from rawwave.contract import heartbeat_key
from rawwave.local_stack import free_port, redis_server_command, wait_for_port

READY_TIMEOUT_S = 60.0


class Stack(AbstractContextManager["Stack"]):
    def __init__(self, model_dir: Path, workers: int = 1, ingest: bool = False, **env: str) -> None:
        self.model_dir, self.worker_count, self.with_ingest, self.env = model_dir, workers, ingest, env
        self.tmp = Path(tempfile.mkdtemp(prefix="rawwave-bench-"))
        self.redis_port, self.http_port = free_port(), free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def ingest_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for name, p in self.processes.items() if name.startswith("worker")]

    def __enter__(self) -> Stack:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed: apt-get install redis-server"
        command = redis_server_command(binary, self.redis_port, self.tmp, appendonly=False)
        self._spawn("redis", command)
        assert wait_for_port(self.redis_port), "redis-server did not start"
        for i in range(self.worker_count):
            self._spawn(f"worker-{i}", [sys.executable, "-m", "rawwave.cli", "worker"], f"bench-worker-{i}")
        if self.with_ingest:
            self._spawn("ingest", [sys.executable, "-m", "rawwave.cli", "ingest"])
        self._wait_ready()
        return self

    def _spawn(self, name: str, command: list[str], worker_name: str = "") -> None:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAWWAVE_")},
            "RAWWAVE_REDIS_URL": self.redis_url,
            "RAWWAVE_STATE_DIR": str(self.tmp / "state"),
            "RAWWAVE_MODEL_DIR": str(self.model_dir),
            "RAWWAVE_PORT": str(self.http_port),
            "RAWWAVE_HOST": "127.0.0.1",
            "RAWWAVE_ICE_HOST_ADDRESSES": "127.0.0.1",
            "RAWWAVE_LOG_FORMAT": "json",
            "RAWWAVE_LOG_LEVEL": "warning",
            **({"RAWWAVE_WORKER_NAME": worker_name} if worker_name else {}),
            **self.env,
        }
        log = (self.tmp / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def _wait_ready(self) -> None:
        client = redis.Redis(port=self.redis_port)
        names = [f"bench-worker-{i}" for i in range(self.worker_count)]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(client.exists(heartbeat_key(n)) for n in names):
            self._check_alive()
            assert time.monotonic() < deadline, f"workers not ready: {self.log_tail()}"
            time.sleep(0.1)
        if self.with_ingest:
            assert wait_for_port(self.http_port, READY_TIMEOUT_S), f"ingest not ready: {self.log_tail()}"
        client.close()

    def _check_alive(self) -> None:
        dead = [name for name, p in self.processes.items() if p.poll() is not None]
        assert not dead, f"{dead} exited: {self.log_tail()}"

    def log_tail(self, chars: int = 2000) -> str:
        return "\n".join(f"{f.name}: {f.read_text()[-chars:]}" for f in sorted(self.tmp.glob("*.log")))

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)
