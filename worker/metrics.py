"""The worker's numbers (Prometheus) and its health endpoints: /livez, /readyz, /metrics.

One private registry per worker, so tests can run several in one process. The HTTP side is a tiny
asyncio server: three GET routes need no framework.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from rawwave.logs import get_logger
from worker.decoding import DecodeStats

log = get_logger(__name__)


class WorkerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.sessions = Gauge("rawwave_worker_sessions", "Sessions this worker serves now.", registry=r)
        self.sessions_done = Counter(
            "rawwave_worker_sessions_ended", "Sessions ended, by outcome.", ["outcome"], registry=r
        )
        self.chunks = Counter("rawwave_worker_audio_chunks_total", "Audio chunks taken in.", registry=r)
        self.audio_s = Counter("rawwave_worker_audio_seconds_total", "Audio taken in, seconds.", registry=r)
        self.compute_s = Counter(
            "rawwave_worker_compute_seconds_total", "Inference time spent on audio, seconds.", registry=r
        )
        self.rtf = Histogram(
            "rawwave_worker_session_rtf", "Real-time factor of a finished session (compute / audio).",
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=r,
        )  # fmt: skip
        self.tokens = Counter("rawwave_worker_decode_tokens_total", "Tokens decoded.", registry=r)
        self.decode_s = Counter("rawwave_worker_decode_seconds_total", "Time spent decoding.", registry=r)
        self.drafted = Counter("rawwave_worker_mtp_drafted_total", "MTP draft tokens verified.", registry=r)
        self.accepted = Counter("rawwave_worker_mtp_accepted_total", "MTP draft tokens accepted.", registry=r)
        self.queue_lag = Histogram(
            "rawwave_worker_queue_lag_seconds", "From announce to claim.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 15, 60), registry=r,
        )  # fmt: skip
        self.events = Counter(
            "rawwave_worker_events_total", "Events published, by type.", ["type"], registry=r
        )
        self.suppressed = Counter(
            "rawwave_worker_events_suppressed_total", "Replayed events already published.", registry=r
        )

    def decoded(self, stats: DecodeStats) -> None:
        self.tokens.inc(stats.tokens)
        self.decode_s.inc(stats.seconds)
        self.drafted.inc(stats.drafted)
        self.accepted.inc(stats.accepted)

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve_health(
    port: int, metrics: WorkerMetrics, ready: Callable[[], bool], host: str = "0.0.0.0"
) -> asyncio.Server:
    """GET /livez (the loop answers), /readyz (model loaded, not draining), /metrics."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            path = request.split()[1].decode() if len(request.split()) > 1 else "/"
            status, body, kind = _route(path, metrics, ready)
            head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    log.info("health endpoints up", port=port)
    return server


def _route(path: str, metrics: WorkerMetrics, ready: Callable[[], bool]) -> tuple[str, bytes, str]:
    if path == "/livez":
        return "200 OK", b"ok\n", "text/plain"
    if path == "/readyz":
        return (
            ("200 OK", b"ready\n", "text/plain")
            if ready()
            else ("503 Service Unavailable", b"draining\n", "text/plain")
        )
    if path == "/metrics":
        return "200 OK", metrics.render(), CONTENT_TYPE_LATEST
    return "404 Not Found", b"not found\n", "text/plain"
