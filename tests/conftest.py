"""Shared fixtures: a real redis-server the suite starts itself on a free port, and a real exported
model directory (tests/models.py) for every folder that runs the worker."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from rawwave.local_stack import free_port, redis_server_command
from rawwave.settings import Settings, load_settings
from rawwave.streams import Streams
from tests.models import REPO, export_test_model

__all__ = ["REPO", "RedisServer", "free_port", "start_redis", "stop_redis"]


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    data_dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis(data_dir: Path, port: int | None = None, *extra: str) -> RedisServer:
    """Start a private redis-server and wait until it answers PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found: apt-get install redis-server")
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [*redis_server_command(binary, port, data_dir, appendonly=False), *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    for _ in range(200):
        try:
            client.ping()
            return RedisServer(port, process, data_dir)
        except redis.ConnectionError:
            time.sleep(0.025)
    process.kill()
    pytest.fail(f"redis-server did not start on port {port}")


def stop_redis(server: RedisServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    stop_redis(server)


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings pointing at the suite's Redis, a fresh db state, and a private state dir."""
    redis.Redis(port=redis_server.port).flushall()
    for name in list(os.environ):
        if name.startswith("RAWWAVE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RAWWAVE_REDIS_URL", redis_server.url)
    monkeypatch.setenv("RAWWAVE_STATE_DIR", str(tmp_path / "state"))
    return load_settings()


@pytest.fixture
async def streams(settings: Settings) -> AsyncIterator[Streams]:
    client = Streams.connect(settings)
    await client.ensure_groups()
    yield client
    await client.close()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """checkpoints/default exported (or the tiny random model); cached under tests/artifacts/."""
    return export_test_model()
