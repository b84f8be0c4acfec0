"""The state file `rawwave up` writes so that clients on the same machine find the running stack."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from pydantic import BaseModel, ValidationError

STATE_FILE = "stack.json"


class StackState(BaseModel):
    redis_url: str
    ingest_url: str
    pid: int


def write_stack_state(state_dir: Path, state: StackState) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.model_dump_json())
    tmp.replace(path)
    return path


def read_stack_state(state_dir: Path) -> StackState | None:
    """The running stack, or None when there is none (no file, stale pid, unreadable file)."""
    path = state_dir / STATE_FILE
    try:
        state = StackState.model_validate_json(path.read_text())
    except (OSError, ValidationError):
        return None
    return state if _alive(state.pid) else None


def clear_stack_state(state_dir: Path) -> None:
    (state_dir / STATE_FILE).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- a private redis-server (for `rawwave up`, the test suite and the benchmarks) -------------------


def redis_server_command(
    binary: str, port: int, data_dir: Path, appendonly: bool = True, appendfsync: str = "everysec"
) -> list[str]:
    """A loopback-only redis-server with the durability rawwave documents: AOF, noeviction."""
    return [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", "",
        "--appendonly", "yes" if appendonly else "no", "--appendfsync", appendfsync,
        "--maxmemory-policy", "noeviction", "--logfile", str(data_dir / "redis.log"),
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.025)
    return False
