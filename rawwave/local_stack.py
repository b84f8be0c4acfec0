"""The state file `rawwave up` writes so that clients on the same machine find the running stack."""

from __future__ import annotations

import os
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
