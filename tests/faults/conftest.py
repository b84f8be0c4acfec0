"""Fault-test fixtures: a private redis-server per test (killable, restartable from its AOF), real
`rawwave worker` / `rawwave ingest` processes, the tiny model, and the figures each test reports.

Every test prints its figures and writes them to tests/artifacts/faults/NAME.json (git-ignored) for
the README. Set RAWWAVE_SOAK=1 for the longer variants.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from rawwave.local_stack import free_port, wait_for_port
from rawwave.model_dir import file_sha256
from rawwave.settings import Settings, load_settings
from tests.conftest import REPO, RedisServer, start_redis, stop_redis
from tests.models import export_tiny_model

ARTIFACTS = REPO / "tests" / "artifacts"
FIGURES = ARTIFACTS / "faults"
SOAK = os.environ.get("RAWWAVE_SOAK") == "1"
RECLAIM_IDLE_MS = 1500
MAX_TRANSCRIPT_TOKENS = 8


def report(name: str, figures: dict) -> dict:
    """Print a test's figures and keep them as JSON for the README."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / f"{name}.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(f"\n[{name}] " + json.dumps(figures, sort_keys=True))
    return figures


# -- the model ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny random model with short transcripts (a random model never stops on its own, so its
    max_transcript_tokens is the cost of every decode): fault tests compare a faulty run with a
    fault-free run of the same model, so what it writes does not matter, only that it is the same."""
    source = export_tiny_model()
    out = ARTIFACTS / "faults-model"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out)
    runtime = json.loads((out / "runtime.json").read_text())
    runtime["streaming"]["max_transcript_tokens"] = MAX_TRANSCRIPT_TOKENS
    (out / "runtime.json").write_text(json.dumps(runtime, indent=2))
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["files"]["runtime.json"]
    entry["sha256"], entry["bytes"] = file_sha256(out / "runtime.json"), (out / "runtime.json").stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


# -- Redis -------------------------------------------------------------------------------------


@dataclass
class FaultRedis:
    """A redis-server this test may kill -9 and restart on the same port from the same directory."""

    data_dir: Path
    extra: tuple[str, ...]
    port: int = field(default_factory=free_port)
    server: RedisServer | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> float:
        """Start (or restart) it; returns seconds until it answers PING with its data loaded."""
        started = time.monotonic()
        self.server = start_redis(self.data_dir, self.port, *self.extra)
        client = redis.Redis(port=self.port)
        while True:  # PING answers during loading on some versions; wait for the data
            try:
                if client.info("persistence").get("loading") == 0:
                    break
            except redis.exceptions.BusyLoadingError:
                pass
            time.sleep(0.01)
        client.close()
        return time.monotonic() - started

    def kill9(self) -> None:
        assert self.server is not None
        self.server.process.send_signal(signal.SIGKILL)
        self.server.process.wait()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def stop(self) -> None:
        if self.server is not None and self.server.process.poll() is None:
            stop_redis(self.server)


@pytest.fixture
def fault_redis(tmp_path: Path) -> Iterator[callable]:
    """make(appendonly=True, appendfsync="everysec") -> a started FaultRedis, stopped after the test."""
    made: list[FaultRedis] = []

    def make(appendonly: bool = True, appendfsync: str = "everysec") -> FaultRedis:
        extra = ("--appendonly", "yes" if appendonly else "no", "--appendfsync", appendfsync)
        server = FaultRedis(tmp_path / f"redis{len(made)}", extra)
        server.start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith("RAWWAVE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RAWWAVE_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def client_settings(url: str, **overrides: object) -> Settings:
    return load_settings(redis_url=url, reclaim_idle_ms=RECLAIM_IDLE_MS, **overrides)


# -- processes ---------------------------------------------------------------------------------


class Processes:
    """`python -m rawwave.cli worker|ingest` children with JSON logs in files; killed after the test."""

    def __init__(self, logs: Path, model_dir: Path) -> None:
        self.logs, self.model_dir = logs, model_dir
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def worker(self, name: str, url: str, **env: str) -> subprocess.Popen[bytes]:
        variables = {
            "RAWWAVE_MODEL_DIR": str(self.model_dir),
            "RAWWAVE_WORKER_NAME": name,
            "RAWWAVE_RECLAIM_IDLE_MS": str(RECLAIM_IDLE_MS),
            "RAWWAVE_ORT_INTRA_THREADS": "1",
            "RAWWAVE_INFERENCE_THREADS": "1",
        }
        return self._spawn(name, ["worker"], url, {**variables, **env})

    def ingest(self, name: str, url: str, **env: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        process = self._spawn(name, ["ingest", "--port", str(port)], url, env)
        assert wait_for_port(port, 20), self.log(name)
        return process, f"http://127.0.0.1:{port}"

    def _spawn(self, name: str, args: list[str], url: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        variables = {"RAWWAVE_REDIS_URL": url, "RAWWAVE_LOG_FORMAT": "json", **env}
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "rawwave.cli", *args],
            cwd=REPO, env={**os.environ, **variables}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.children[name] = process
        return process

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_lines(self, name: str, text: str) -> int:
        return sum(text in line for line in self.log(name).splitlines())

    def signal(self, name: str, sig: int) -> None:
        self.children[name].send_signal(sig)

    def kill9(self, name: str) -> None:
        self.children[name].kill()
        self.children[name].wait()

    def stop_all(self) -> None:
        for process in self.children.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait()


@pytest.fixture
def procs(clean_env: Path, tiny_model: Path) -> Iterator[Processes]:
    logs = clean_env / "logs"
    logs.mkdir()
    group = Processes(logs, tiny_model)
    yield group
    group.stop_all()
