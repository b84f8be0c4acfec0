"""A real aiortc client peer for the tests: sends a WAV as its mic, collects events from the data channel."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer

from ingest.webrtc import pinned_ice_hosts

LOOPBACK = ["127.0.0.1"]  # the client gathers on loopback only: no traffic to this machine's other addresses


async def unconnected_offer() -> str:
    """A real SDP offer from aiortc (audio + data channel, loopback candidates), never connected."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="sendonly")
    pc.createDataChannel("events")
    with pinned_ice_hosts(LOOPBACK):
        await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


@dataclass
class Client:
    pc: RTCPeerConnection
    channel: Any
    session: str = ""
    location: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    got_event: asyncio.Event = field(default_factory=asyncio.Event)
    player: Any = None

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        async def loop() -> dict[str, Any]:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                self.got_event.clear()
                await self.got_event.wait()

        return await asyncio.wait_for(loop(), timeout)

    async def close(self) -> None:
        if self.player is not None and self.player.audio is not None:
            self.player.audio.stop()
        await self.pc.close()


async def connect(
    base_url: str,
    wav: str | None = None,
    headers: dict[str, str] | None = None,
    query: str = "",
    http: aiohttp.ClientSession | None = None,
) -> Client:
    """POST an offer to /whip; the answer's candidates must be on 127.0.0.1 only."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    client = Client(pc=pc, channel=pc.createDataChannel("events"))
    client.channel.on("message", lambda m: (client.events.append(json.loads(m)), client.got_event.set()))
    if wav:
        client.player = MediaPlayer(wav)
        pc.addTrack(client.player.audio)
    else:
        pc.addTransceiver("audio", direction="sendonly")
    with pinned_ice_hosts(LOOPBACK):
        await pc.setLocalDescription(await pc.createOffer())
    own = http is None
    http = http or aiohttp.ClientSession()
    try:
        hdrs = {"Content-Type": "application/sdp", **(headers or {})}
        async with http.post(f"{base_url}/whip{query}", data=pc.localDescription.sdp, headers=hdrs) as r:
            body = await r.text()
            if r.status != 201:
                await pc.close()
                raise AssertionError(f"WHIP POST answered {r.status}: {body}")
            client.session, client.location = r.headers["X-Rawwave-Session"], r.headers["Location"]
    finally:
        if own:
            await http.close()
    assert_loopback_only(body)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
    await _connected(client)
    return client


async def _connected(client: Client, timeout: float = 10.0) -> None:
    """Until ICE, DTLS and the data channel are up."""
    async with asyncio.timeout(timeout):
        while client.pc.connectionState != "connected" or client.channel.readyState != "open":
            await asyncio.sleep(0.01)


def candidate_hosts(sdp: str) -> set[str]:
    return {line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")}


def assert_loopback_only(sdp: str) -> None:
    hosts = candidate_hosts(sdp)
    assert hosts == {"127.0.0.1"}, f"answer advertises {hosts}"
