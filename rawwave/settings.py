"""The one settings object: every knob of every rawwave process, read from `RAWWAVE_*` env vars.

Nothing else in rawwave reads the environment or a config file; a process builds `Settings()` once
at its entry point and passes it down.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]


class SettingsError(ValueError):
    """A setting has a bad value; the message names the variable and what is allowed."""


def _default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAWWAVE_", extra="ignore", validate_default=True)

    # -- Redis ---------------------------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        description="Redis (or Redis Cluster) URL. Unset: the stack `rawwave up` started, else "
        "redis://127.0.0.1:6379/0.",
    )
    redis_cluster: bool = Field(False, description="Connect with the Redis Cluster client.")
    redis_socket_timeout_s: float = Field(
        30.0, gt=0, description="Socket timeout; always longer than the longest blocking read."
    )
    redis_retry_s: float = Field(
        60.0,
        ge=0,
        description="How long an idempotent Redis call retries (jittered backoff, 50 ms to 2 s) before "
        "it fails; a worker's claim loop retries for ever.",
    )
    redis_max_connections: int = Field(
        512, ge=4, description="Connections in this process's Redis pool; past it, callers wait for one."
    )
    announce_partitions: int = Field(
        1, ge=1, le=1024, description="Session announce streams (spread over Cluster slots)."
    )
    session_ttl_s: int = Field(3600, ge=10, description="Keys of a finished session expire after this.")

    # -- audio ---------------------------------------------------------------------------------
    chunk_ms: int = Field(200, ge=20, le=2000, description="Audio per stream chunk, in milliseconds.")
    max_session_s: float = Field(600.0, gt=0, description="Longest audio a session may carry.")

    # -- model & inference ---------------------------------------------------------------------
    model_dir: Path = Field(Path("models/default"), description="Exported model directory the worker runs.")
    checkpoint: Path = Field(
        Path("checkpoints/default"), description="HF-layout checkpoint the exporter reads by default."
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="ONNX Runtime execution provider.")
    ort_intra_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0: automatic).")
    ort_inter_threads: int = Field(1, ge=0, description="ONNX Runtime inter-op threads.")
    ort_graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimization level."
    )
    mtp: bool = Field(True, description="Speculative decoding with the MTP drafter.")
    mtp_confidence: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="A draft round stops at the first draft the drafter gives less probability than this "
        "(0: verify every draft).",
    )
    partial_interval_ms: int | None = Field(
        None,
        ge=40,
        description="Audio between partial transcripts of a branch-format model (unset: the model "
        "directory's); an interleaved model's come with each chunk it was trained on.",
    )
    endpoint_silence_ms: int | None = Field(
        None, ge=0, description="Trailing silence that ends a turn, 0 = off (unset: the model's)."
    )
    max_response_tokens: int = Field(128, ge=1, description="Longest response a session may get.")
    endpoint_silence_dbfs: float = Field(
        -45.0, le=0, description="A 40 ms audio frame quieter than this counts as silence (end-pointing)."
    )

    # -- worker --------------------------------------------------------------------------------
    worker_name: str = Field(
        default_factory=_default_worker_name, description="Consumer name in the workers' group."
    )
    max_sessions_per_worker: int = Field(16, ge=1, description="Sessions one worker serves at once.")
    reclaim_idle_ms: int = Field(
        15000, ge=1000, description="A session idle this long is reclaimed from its (dead) owner."
    )
    max_deliveries: int = Field(3, ge=1, description="Deliveries before a session is dead-lettered.")
    drain_timeout_s: float = Field(
        20.0,
        ge=0,
        description="SIGTERM: time a worker has to finish live sessions, and ingest to finish pushing "
        "accepted uploads.",
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="Worker health + Prometheus port (0 = off).")
    inference_threads: int = Field(
        2,
        ge=1,
        description="Sessions computing at once in a worker (threads running ONNX Runtime); with "
        "batching, every live session computes in its own thread.",
    )
    batching: bool = Field(
        False,
        description="Continuous batching: decoder calls of sessions computing at once run as one ONNX "
        "Runtime call (same output; CPU device only; here it paid only with many busy sessions of a "
        "branch-format model).",
    )
    batch_window_ms: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Batching: how long a decoder call that found a free lane waits for the other "
        "computing sessions' calls (0: it takes only the calls already waiting).",
    )
    max_batch: int = Field(16, ge=1, description="Batching: most session calls in one decoder call.")
    batch_lanes: int = Field(
        1, ge=1, description="Batching: decoder calls running at once (each carries up to max_batch)."
    )
    audio_idle_timeout_s: float = Field(
        60.0, gt=0, description="A session whose audio stops arriving (no end marker) ends after this."
    )

    # -- ingest --------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Ingest HTTP bind address.")
    port: int = Field(8080, ge=0, le=65535, description="Ingest HTTP port.")
    auth_token: SecretStr | None = Field(None, description="Bearer token required by the endpoints.")
    allowed_origins: CommaList = Field(
        default_factory=list, description="Origins allowed to signal (comma-separated; empty: any)."
    )
    ice_host_addresses: CommaList = Field(
        default_factory=list,
        description="Host addresses advertised in ICE (comma-separated; empty: as aioice does).",
    )
    ice_servers: CommaList = Field(
        default_factory=list, description="STUN/TURN URLs (comma-separated; turn:user:pass@host:port)."
    )
    max_peers: int = Field(64, ge=1, description="Concurrent WebRTC peers per ingest process.")
    max_peers_per_token: int = Field(8, ge=1, description="Concurrent WebRTC peers per bearer token.")
    max_sdp_bytes: int = Field(32768, ge=1024, description="Largest SDP offer accepted.")
    max_upload_bytes: int = Field(100 * 1024 * 1024, ge=1024, description="Largest audio upload accepted.")
    max_queued_sessions: int = Field(
        64,
        ge=0,
        description="New sessions are refused (503 + Retry-After; `push`/`transcribe` exit 1) while "
        "this many are announced and not finished, waiting or running (0 = unlimited).",
    )

    # -- local stack & logs --------------------------------------------------------------------
    state_dir: Path = Field(
        Path.home() / ".local/state/rawwave",
        description="Where `rawwave up` keeps Redis data and its state file.",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a TTY, JSON lines otherwise."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    @field_validator("allowed_origins", "ice_host_addresses", "ice_servers", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @property
    def chunk_samples(self) -> int:
        return SAMPLE_RATE * self.chunk_ms // 1000


SAMPLE_RATE = 16000  # every stream carries 16 kHz mono s16le PCM


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning pydantic's error into one line per bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise SettingsError(_describe(e)) from e


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        name = "RAWWAVE_" + str(item["loc"][0]).upper() if item["loc"] else "settings"
        lines.append(f"{name}: {item['msg']} (got {item.get('input')!r})")
    return "bad setting: " + "; ".join(lines)


def settings_table() -> str:
    """The README's configuration table, generated from the object itself."""
    rows = ["| variable | default | description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = (
            "(host-pid)"
            if name == "worker_name"
            else _shown_default(field.get_default(call_default_factory=True))
        )
        rows.append(f"| `RAWWAVE_{name.upper()}` | {default} | {field.description or ''} |")
    return "\n".join(rows)


def _shown_default(value: Any) -> str:
    if value is None or value == []:
        return "(unset)"
    if isinstance(value, Path) and str(value).startswith(str(Path.home())):
        value = "~/" + str(value.relative_to(Path.home()))
    return f"`{value}`"
