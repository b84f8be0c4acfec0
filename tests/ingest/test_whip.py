"""WHIP signaling status codes: auth, Origin, size, malformed offers, caps, PATCH and DELETE."""

from __future__ import annotations

import re

import aiohttp
import pytest
from pydantic import SecretStr

from rawwave.settings import Settings
from rawwave.streams import Streams

from .conftest import Server, start_server
from .test_http_api import announced, read_all_audio
from .webrtc_client import connect, unconnected_offer

SDP = {"Content-Type": "application/sdp"}


@pytest.fixture
async def offer() -> str:
    return await unconnected_offer()


async def post(url: str, body: str | bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    headers = {**SDP, **(headers or {})}
    async with aiohttp.ClientSession() as http, http.post(f"{url}/whip", data=body, headers=headers) as r:
        body_json = await r.json() if r.content_type == "application/json" else {}
        return r.status, body_json, dict(r.headers)


async def test_malformed_offers_are_400_never_500(server: Server, streams: Streams, offer: str) -> None:
    no_fingerprint = "\r\n".join(line for line in offer.split("\r\n") if not line.startswith("a=fingerprint"))
    no_ice = "\r\n".join(line for line in offer.split("\r\n") if not line.startswith("a=ice-"))
    cases = [
        "hello",
        "v=0\r\nm=audio garbage\r\n",
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF\r\n",
        re.sub(r"m=audio \d+", "m=audio x", offer),
        no_fingerprint,
        no_ice,
        offer.replace("a=rtpmap:", "a=rtpmap:x"),
        offer.replace("m=audio", "m=video"),
    ]
    for body in cases:
        status, body_json, _ = await post(server.url, body)
        assert status == 400, body[:60]
        assert body_json["code"] == "bad_sdp"
    status, _, _ = await post(server.url, b"\xff\xfe\x00binary")
    assert status == 400
    text = {"Content-Type": "text/plain"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{server.url}/whip", data=offer, headers=text) as r,
    ):
        assert r.status == 415
    assert await announced(streams) == []  # no session for a refused offer
    assert server.ingest.peers.count() == 0


async def test_oversize_offer_is_413(server: Server, offer: str) -> None:
    status, body, _ = await post(server.url, offer + "a=x-padding:" + "x" * 40_000 + "\r\n")
    assert status == 413 and body["code"] == "too_large"

    async def chunked():
        yield offer.encode()
        for _ in range(50):
            yield b"a=x-padding:" + b"x" * 1000 + b"\r\n"

    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{server.url}/whip", data=chunked(), headers=SDP) as r,
    ):
        assert r.status == 413


async def test_bearer_auth(ingest_settings: Settings, offer: str) -> None:
    runner, url = await start_server(ingest_settings.model_copy(update={"auth_token": SecretStr("s3cret")}))
    try:
        status, _, headers = await post(url, offer)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        status, _, _ = await post(url, offer, {"Authorization": "Bearer wrong"})
        assert status == 401
        client = await connect(url, headers={"Authorization": "Bearer s3cret"})
        await client.close()
        async with aiohttp.ClientSession() as http, http.get(f"{url}/livez") as r:
            assert r.status == 200  # health and the page stay open
    finally:
        await runner.cleanup()


async def test_origin_allowlist(ingest_settings: Settings, offer: str) -> None:
    settings = ingest_settings.model_copy(update={"allowed_origins": ["https://good.example"]})
    runner, url = await start_server(settings)
    try:
        status, body, _ = await post(url, offer, {"Origin": "https://evil.example"})
        assert status == 403 and body["code"] == "forbidden_origin"
        client = await connect(url, headers={"Origin": "https://good.example"})
        await client.close()
        client = await connect(url)  # no Origin: not a browser, the allowlist does not apply
        await client.close()
    finally:
        await runner.cleanup()


async def test_peer_caps_global_and_per_token(ingest_settings: Settings, streams: Streams) -> None:
    settings = ingest_settings.model_copy(update={"max_peers": 3, "max_peers_per_token": 2})
    runner, url = await start_server(settings)
    clients = []
    try:
        clients.append(await connect(url, headers={"Authorization": "Bearer alice"}))
        clients.append(await connect(url, headers={"Authorization": "Bearer alice"}))
        with pytest.raises(AssertionError, match="answered 429"):
            await connect(url, headers={"Authorization": "Bearer alice"})
        clients.append(await connect(url, headers={"Authorization": "Bearer bob"}))
        with pytest.raises(AssertionError, match="answered 503"):
            await connect(url, headers={"Authorization": "Bearer carol"})
        status, _, headers = await post(url, "v=0", {"Authorization": "Bearer carol"})
        assert status == 503 and int(headers["Retry-After"]) > 0
    finally:
        for client in clients:
            await client.close()
        await runner.cleanup()


async def test_patch_405_and_delete(server: Server, streams: Streams) -> None:
    client = await connect(server.url)
    async with aiohttp.ClientSession() as http:
        async with http.patch(
            server.url + client.location, data="", headers={"Content-Type": "application/trickle-ice-sdpfrag"}
        ) as r:
            assert r.status == 405
        async with http.delete(server.url + "/whip/unknown") as r:
            assert r.status == 404
        async with http.delete(server.url + client.location) as r:
            assert r.status == 200
    entries = await read_all_audio(streams, client.session)
    assert entries[-1].reason == "client_stop"
    assert server.ingest.peers.count() == 0
    await client.close()
