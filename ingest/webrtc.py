"""WebRTC peers: one aiortc peer connection per session; mic audio in, the session's events out.

Shaped like aiortc's examples/server: `@pc.on("track")` starts a pump, a registry holds the live
peers, and `Peers.close_all` closes them on shutdown. Incoming Opus (48 kHz) is resampled to
16 kHz mono and appended chunk by chunk as it arrives; the session's events are read from Redis
and sent, as JSON, over the client's data channel. Every way a peer ends (track end, "stop",
DELETE, ICE failure or consent expiry, duration cap, shutdown) writes the end marker once and
cancels every task the peer started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import aioice.ice
import av
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ingest.sink import SessionAudio
from rawwave.contract import SAMPLE_RATE, TERMINAL_EVENT_TYPES, EndReason, Event, event_to_json
from rawwave.logs import bind_session, get_logger
from rawwave.settings import Settings
from rawwave.streams import Streams

log = get_logger(__name__)

EVENTS_BLOCK_MS = 1000  # longest wait on the session's event stream before re-checking the peer
REDIS_RETRY_S = 1.0  # pause before reading events again after a Redis error
CONNECT_TIMEOUT_S = 15.0  # from the answer to a connected peer
LINGER_AFTER_END_S = 30.0  # after the audio ends, keep the peer this long for the final events
MAX_BUFFERED_EVENT_BYTES = 1 << 20  # a client this far behind on the data channel is dropped
# ICE failure and consent expiry both surface as "failed"; "closed" means the client closed (DTLS)
CONNECTION_END_REASONS: dict[str, EndReason] = {"failed": "ice_failed", "closed": "client_stop"}

# -- ICE host addresses ----------------------------------------------------------------------------
# aioice gathers host candidates from `aioice.ice.get_host_addresses()`: every interface but
# 127.0.0.1. We replace that module function once with one that answers the addresses pinned in the
# current context (set around each negotiation), and aioice's own answer when none are pinned.

_pinned_hosts: ContextVar[tuple[str, ...] | None] = ContextVar("rawwave_ice_hosts", default=None)
_aioice_host_addresses = aioice.ice.get_host_addresses


def _host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    pinned = _pinned_hosts.get()
    if pinned is None:
        return list(_aioice_host_addresses(use_ipv4, use_ipv6))
    return [a for a in pinned if (use_ipv6 if ":" in a else use_ipv4)]


aioice.ice.get_host_addresses = _host_addresses


@contextlib.contextmanager
def pinned_ice_hosts(addresses: list[str] | tuple[str, ...]) -> Iterator[None]:
    """Gather host candidates only on `addresses` inside this block (empty: aioice's default)."""
    token = _pinned_hosts.set(tuple(addresses) if addresses else None)
    try:
        yield
    finally:
        _pinned_hosts.reset(token)


_CREDENTIALS = re.compile(r"^(?P<scheme>turns?):(?P<user>[^:@]+):(?P<password>[^@]+)@(?P<rest>.+)$")


def ice_server(url: str) -> RTCIceServer:
    """`stun:host:port`, or `turn:user:pass@host:port` (credentials split out of the URL)."""
    match = _CREDENTIALS.match(url)
    if not match:
        return RTCIceServer(urls=url)
    return RTCIceServer(
        urls=f"{match['scheme']}:{match['rest']}", username=match["user"], credential=match["password"]
    )


def ice_configuration(settings: Settings) -> RTCConfiguration:
    # an explicit (possibly empty) list: aiortc's default would query Google's STUN server
    return RTCConfiguration(iceServers=[ice_server(url) for url in settings.ice_servers])


# -- one peer ----------------------------------------------------------------------------------------


class Peer:
    """One WebRTC connection of one session; it writes the session's audio, or (audio None, a client
    back after its audio ended) only follows the events."""

    def __init__(
        self, streams: Streams, settings: Settings, session: str, audio: SessionAudio | None, owner: str
    ) -> None:
        self.id = secrets.token_urlsafe(16)  # the WHIP resource id: unguessable
        self.session = session
        self.owner = owner  # bearer token or client address: the per-token cap counts by this
        self.streams = streams
        self.settings = settings
        self.audio = audio
        self.sent_seq = 0  # last event seq sent over the data channel
        self.pc = RTCPeerConnection(ice_configuration(settings))
        self.channel: Any = None
        self.closed = asyncio.Event()
        self.end_reason: EndReason | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._forwarder: asyncio.Task[Any] | None = None
        self.on_closed: Callable[[Peer], None] | None = None
        self._wire()

    async def negotiate(self, offer_sdp: str, after_seq: int) -> str:
        """Apply the offer, gather on the pinned host addresses, return the complete answer SDP."""
        self.sent_seq = after_seq
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        with pinned_ice_hosts(self.settings.ice_host_addresses):
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        self._spawn(self._watchdog())
        self._spawn(self._connect_deadline())
        return str(self.pc.localDescription.sdp)

    async def close(self, reason: EndReason, message: str = "", end_audio: bool = True) -> None:
        """End the audio (unless a reconnecting peer takes it over), stop every task, close; idempotent."""
        if self.closed.is_set():
            return
        self.closed.set()
        self.end_reason = reason
        if end_audio and self.audio is not None:
            await self.audio.end(reason, message)
        await self._cancel_tasks()
        await self.pc.close()
        if self.on_closed is not None:
            self.on_closed(self)
        with bind_session(self.session):
            seconds = round(self.audio.seconds, 2) if self.audio else None
            log.info("peer closed", peer=self.id, reason=reason, audio_s=seconds, events_sent=self.sent_seq)

    def resume(self, after_seq: int) -> None:
        """Re-send events after `after_seq` (the client's {"resume": seq})."""
        self.sent_seq = after_seq
        if self._forwarder is not None:
            self._forwarder.cancel()
        self._forwarder = self._spawn(self._forward_events())

    # -- wiring and tasks ------------------------------------------------------------------------

    def _wire(self) -> None:
        @self.pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind == "audio":
                self._spawn(self._pump_audio(track))

        @self.pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            self.channel = channel
            channel.on("message", self._on_message)
            self.resume(self.sent_seq)

        @self.pc.on("connectionstatechange")
        async def on_state() -> None:
            state = self.pc.connectionState
            if state in CONNECTION_END_REASONS and not self.closed.is_set():
                await self.close(CONNECTION_END_REASONS[state], f"connection {state}")

    def _on_message(self, message: Any) -> None:
        command = _parse_command(message)
        if command == "stop":
            self._spawn(self._end_audio("client_stop"))
        elif isinstance(command, int):
            self.resume(command)

    def _spawn(self, coro: Any) -> asyncio.Task[Any] | None:
        """Run `coro` as one of this peer's tasks; none start once the peer is closed (no leaks)."""
        if self.closed.is_set():
            coro.close()
            return None
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            with bind_session(self.session):
                log.error("peer task failed, closing the peer", exc_info=task.exception())
            self._spawn(self.close("error", "internal error"))

    async def _cancel_tasks(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _end_audio(self, reason: EndReason, message: str = "") -> None:
        """The audio is over but the peer lingers to deliver the final events (or until the timeout)."""
        if self.audio is not None and await self.audio.end(reason, message):
            self._spawn(self._close_later(reason))

    async def _close_later(self, reason: EndReason) -> None:
        await asyncio.sleep(LINGER_AFTER_END_S)
        await self.close(reason)

    async def _connect_deadline(self) -> None:
        """A client that never completes ICE + DTLS (gone, or blocked) must not hold a peer slot."""
        await asyncio.sleep(CONNECT_TIMEOUT_S)
        if self.pc.connectionState != "connected":
            await self.close("ice_failed", f"not connected within {CONNECT_TIMEOUT_S:g} s")

    async def _watchdog(self) -> None:
        await asyncio.sleep(self.settings.max_session_s)
        await self.close("timeout", f"session longer than {self.settings.max_session_s:g} s")

    # -- audio in --------------------------------------------------------------------------------

    async def _pump_audio(self, track: Any) -> None:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        with bind_session(self.session):
            try:
                while True:
                    frame = await track.recv()
                    await self._write(resampler, frame)
            except MediaStreamError:  # the track ended, or the connection under it did
                await self._end_audio(CONNECTION_END_REASONS.get(self.pc.connectionState, "track_ended"))

    async def _write(self, resampler: Any, frame: Any) -> None:
        if self.audio is None or self.audio.ended:  # follow-only, or audio over: drain and drop
            return
        frame.pts = None  # aiortc's timestamps may jump after loss; we keep the audio contiguous
        pcm = b"".join(f.to_ndarray().tobytes() for f in resampler.resample(frame))
        if not await self.audio.write(pcm):
            await self._end_audio("timeout", f"audio longer than {self.settings.max_session_s:g} s")

    # -- events out ------------------------------------------------------------------------------

    async def _forward_events(self) -> None:
        with bind_session(self.session):
            while self.channel is not None and self.channel.readyState == "open":
                for event in await self._read_events():
                    if not self._send(event_to_json(event)):
                        return
                    self.sent_seq = event.seq
                    if event.type in TERMINAL_EVENT_TYPES:
                        await self._on_done()
                        return

    async def _read_events(self) -> list[Event]:
        """The next events; a Redis hiccup is retried (the client just sees them a little later)."""
        try:
            return await self.streams.read_events(self.session, self.sent_seq, block_ms=EVENTS_BLOCK_MS)
        except (RedisConnectionError, RedisTimeoutError) as e:
            log.warning("reading events failed, retrying", error=str(e))
            await asyncio.sleep(REDIS_RETRY_S)
            return []

    def _send(self, text: str) -> bool:
        if self.channel.readyState != "open":
            return False
        if self.channel.bufferedAmount > MAX_BUFFERED_EVENT_BYTES:
            log.warning(
                "client too slow on the data channel, dropping it", buffered=self.channel.bufferedAmount
            )
            self._spawn(self.close("error", "client did not read its events"))
            return False
        self.channel.send(text)
        return True

    async def _on_done(self) -> None:
        # the session is over and its last event is out: nothing is left to do
        if self.audio is None or self.audio.ended:
            self._spawn(self.close(self.audio.end_reason or "end" if self.audio else "end"))


def _parse_command(message: Any) -> str | int | None:
    """ "stop" or {"type": "stop"} -> "stop"; {"resume": seq} -> seq; anything else -> None."""
    if message == "stop":
        return "stop"
    try:
        body = json.loads(message)
    except (TypeError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    if body.get("type") == "stop":
        return "stop"
    seq = body.get("resume")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else None


# -- the registry ------------------------------------------------------------------------------------


class Peers:
    """The live peers of this process (aiortc's `pcs` set), by WHIP resource id and by session."""

    def __init__(self) -> None:
        self.live: dict[str, Peer] = {}

    def add(self, peer: Peer) -> None:
        self.live[peer.id] = peer
        peer.on_closed = lambda closed: self.live.pop(closed.id, None)

    def get(self, peer_id: str) -> Peer | None:
        return self.live.get(peer_id)

    def of_session(self, session: str) -> Peer | None:
        return next((p for p in self.live.values() if p.session == session and not p.closed.is_set()), None)

    def count(self, owner: str | None = None) -> int:
        return sum(1 for p in self.live.values() if owner is None or p.owner == owner)

    async def close_all(self, reason: EndReason, message: str = "") -> None:
        await asyncio.gather(*(p.close(reason, message) for p in list(self.live.values())))
