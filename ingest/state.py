"""The ingest process's shared state and its HTTP error type; what every handler module imports.

`Ingest` holds the settings, the one `Streams`, the live WebRTC peers and the upload pumps, and
knows whether the process is still accepting sessions (it stops on SIGTERM) and whether the queue
has room for one more (`max_queued_sessions`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from ingest.admission import Admission, QueueFullError
from ingest.webrtc import Peers
from rawwave.contract import SESSION_ID_PATTERN
from rawwave.logs import get_logger
from rawwave.settings import Settings
from rawwave.streams import Streams

log = get_logger(__name__)

RETRY_AFTER_S = 5  # what a refused client is told to wait before trying again


class HttpError(Exception):
    """An expected refusal: answered as a JSON body {"error", "code"} with this status."""

    def __init__(
        self, status: int, message: str, code: str = "", headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _default_code(status)
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {"error": self.message, "code": self.code}
        return web.json_response(body, status=self.status, headers=self.headers)


def _default_code(status: int) -> str:
    return {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        413: "too_large",
    }.get(status, "refused")


class Ingest:
    """Settings, the one Streams, live peers and upload pumps, and whether new sessions are welcome."""

    def __init__(self, settings: Settings, streams: Streams) -> None:
        self.settings = settings
        self.streams = streams
        self.peers = Peers()
        self.admission = Admission(streams, settings.max_queued_sessions)
        self.uploads: set[asyncio.Task[Any]] = set()
        self.draining = False

    def check_accepting(self) -> None:
        if self.draining:
            raise HttpError(
                503, "ingest is shutting down", "shutting_down", {"Retry-After": str(RETRY_AFTER_S)}
            )

    @asynccontextmanager
    async def new_session(self, new: bool = True) -> AsyncIterator[None]:
        """Hold a place for a new session while the request creates it; refuse (503, code "busy")
        while max_queued_sessions wait or run. A failed request gives its place back."""
        if not new:
            yield
            return
        try:
            ticket = await self.admission.admit()
        except QueueFullError as e:
            log.warning("session refused: queue full", limit=self.settings.max_queued_sessions)
            raise HttpError(503, str(e), "busy", {"Retry-After": str(RETRY_AFTER_S)}) from e
        try:
            yield
        except BaseException:
            self.admission.release(ticket)
            raise

    def check_peer_caps(self, owner: str) -> None:
        """Refuse a new peer past the process cap (503) or the caller's own cap (429)."""
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if self.peers.count() >= self.settings.max_peers:
            log.warning("peer refused: process at its cap", cap=self.settings.max_peers)
            raise HttpError(503, f"at capacity ({self.settings.max_peers} live peers)", "at_capacity", retry)
        if self.peers.count(owner) >= self.settings.max_peers_per_token:
            log.warning("peer refused: caller at its cap", cap=self.settings.max_peers_per_token)
            cap = self.settings.max_peers_per_token
            raise HttpError(429, f"too many live peers for this caller ({cap})", "too_many_peers", retry)

    def spawn_upload(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.uploads.add(task)
        task.add_done_callback(self.uploads.discard)

    async def drain(self) -> None:
        """SIGTERM: refuse new sessions, end every live peer with reason "shutdown", let accepted
        uploads finish pushing (their audio is already here) within drain_timeout_s; idempotent."""
        if self.draining:
            return
        self.draining = True
        peers, uploads = self.peers.count(), len(self.uploads)
        await self.peers.close_all("shutdown", "ingest shut down")
        await self.finish_uploads()
        log.info("ingest drained", peers=peers, uploads=uploads)

    async def finish_uploads(self) -> None:
        """Wait for the upload pumps (also ones a request accepted while we drained); past
        drain_timeout_s the rest are cancelled and their audio ends with reason "shutdown"."""
        deadline = asyncio.get_running_loop().time() + self.settings.drain_timeout_s
        while self.uploads and (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.wait(list(self.uploads), timeout=left)
        for task in list(self.uploads):
            task.cancel()
        await asyncio.gather(*self.uploads, return_exceptions=True)

    async def ready(self) -> bool:
        if self.draining:
            return False
        try:
            return await asyncio.wait_for(self.streams.ping(), timeout=1.0)
        except Exception:  # any Redis or network failure means "not ready", never a 500
            return False


INGEST_KEY = web.AppKey("ingest", Ingest)


async def read_capped(next_chunk: Callable[[], Awaitable[bytes]], max_bytes: int, what: str) -> bytes:
    """Read a body (or a multipart part) but stop, with a 413, as soon as it passes `max_bytes`."""
    out = bytearray()
    while chunk := await next_chunk():
        out += chunk
        if len(out) > max_bytes:
            raise HttpError(413, f"{what} larger than {max_bytes} bytes", "too_large")
    return bytes(out)


def check_length(request: web.Request, max_bytes: int, what: str) -> None:
    """Refuse a declared over-size body before reading any of it."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise HttpError(413, f"{what} larger than {max_bytes} bytes", "too_large")


def caller_of(request: web.Request) -> str:
    """Whom the per-token cap counts: the bearer token (hashed) if one is sent, else the address."""
    token = bearer_token(request)
    if token:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    return f"addr:{request.remote}"


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query.get("access_token")  # RFC 6750 2.3, for EventSource, which cannot set headers


def check_auth(request: web.Request, settings: Settings) -> None:
    if settings.auth_token is None:
        return
    token = bearer_token(request) or ""
    if not hmac.compare_digest(token.encode(), settings.auth_token.get_secret_value().encode()):
        raise HttpError(401, "missing or wrong bearer token", "unauthorized", {"WWW-Authenticate": "Bearer"})


def check_origin(request: web.Request, settings: Settings) -> None:
    """Browsers say where a request comes from; only listed origins (and our own) may signal."""
    origin = request.headers.get("Origin")
    if origin is None or not settings.allowed_origins or origin_allowed(request, settings):
        return
    raise HttpError(403, f"origin {origin} is not allowed", "forbidden_origin")


def origin_allowed(request: web.Request, settings: Settings) -> bool:
    origin = request.headers.get("Origin")
    own = f"{request.scheme}://{request.host}"
    return origin is not None and (
        not settings.allowed_origins or origin in settings.allowed_origins or origin == own
    )


def session_param(value: str) -> str:
    if not SESSION_ID_PATTERN.match(value):
        raise HttpError(400, "malformed session id", "bad_session")
    return value


def seq_param(value: str | None, name: str) -> int:
    if value is None or value == "":
        return 0
    if not value.isdigit() or len(value) > 18:
        raise HttpError(400, f"{name} must be a non-negative integer", "bad_seq")
    return int(value)
