"""`rawwave up` as a real process tree: start, find it, survive a crash, stop with no orphans."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from rawwave.local_stack import read_stack_state
from rawwave.settings import load_settings
from rawwave.streams import resolve_redis_url
from tests.conftest import free_port


def children_of(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, timeout_s: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail("timed out waiting")


@pytest.fixture
def up_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAWWAVE_")}
    return env | {"RAWWAVE_STATE_DIR": str(tmp_path / "state"), "RAWWAVE_LOG_FORMAT": "json"}


def test_up_runs_finds_restarts_and_stops_cleanly(up_env: dict[str, str], tmp_path: Path) -> None:
    command = [sys.executable, "-m", "rawwave.cli", "up", "--workers", "0", "--port", str(free_port())]
    up = subprocess.Popen(command, env=up_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = up.stdout.readline()  # type: ignore[union-attr]
        assert "rawwave is up: open http://" in line
        state = wait_for(lambda: read_stack_state(tmp_path / "state"))
        client = redis.Redis.from_url(state.redis_url)
        assert client.ping()
        config = client.config_get("appendonly") | client.config_get("maxmemory-policy")
        assert config == {"appendonly": "yes", "maxmemory-policy": "noeviction"}

        settings = load_settings(state_dir=tmp_path / "state")
        assert resolve_redis_url(settings) == state.redis_url  # clients find the stack without flags
        assert resolve_redis_url(load_settings(state_dir=tmp_path / "state", redis_url="redis://x:1/0")) == (
            "redis://x:1/0"
        )

        redis_pid = client.info("server")["process_id"]
        client.set("kept", "1")
        time.sleep(1.2)  # let appendfsync everysec write it
        os.kill(redis_pid, signal.SIGKILL)
        wait_for(lambda: _ping(client) and client.info("server")["process_id"] != redis_pid)
        assert client.get("kept") == b"1"  # restarted from its AOF

        kids = children_of(up.pid)
        assert kids
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=40) == 0
    for pid in kids:
        wait_for(lambda pid=pid: not alive(pid), timeout_s=5)
    assert read_stack_state(tmp_path / "state") is None
    logs = [json.loads(line) for line in up.stderr.read().splitlines() if line.startswith("{")]  # type: ignore[union-attr]
    assert any(entry["event"] == "child exited, restarting" and entry["child"] == "redis" for entry in logs)


def test_up_dies_without_orphans_even_on_kill9(up_env: dict[str, str], tmp_path: Path) -> None:
    command = [sys.executable, "-m", "rawwave.cli", "up", "--workers", "0", "--port", str(free_port())]
    up = subprocess.Popen(command, env=up_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    up.stdout.readline()  # type: ignore[union-attr]
    kids = children_of(up.pid)
    assert kids
    up.kill()
    up.wait()
    for pid in kids:
        wait_for(lambda pid=pid: not alive(pid), timeout_s=10)


def test_missing_redis_server_says_how_to_install(up_env: dict[str, str], tmp_path: Path) -> None:
    env = up_env | {"PATH": str(tmp_path)}  # no redis-server on PATH
    result = subprocess.run(
        [sys.executable, "-m", "rawwave.cli", "up", "--workers", "0"], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "apt-get install redis-server" in result.stderr
    assert "Traceback" not in result.stderr


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
