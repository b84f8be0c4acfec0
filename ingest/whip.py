"""WHIP signaling (RFC 9725): POST an SDP offer, get 201 + the answer + a Location; DELETE it to end.

No trickle ICE: the answer carries every candidate, gathered on the configured host addresses.
Reconnect: POST with `?session=ID&last_seq=N` joins the same session. If this process still holds
a peer for it, the new peer takes its audio over and the old one closes without an end marker;
if the audio has already ended, the new peer only follows events. Either way events resume after N.
"""

from __future__ import annotations

from aiohttp import web

from ingest.sink import SessionAudio
from ingest.state import (
    INGEST_KEY,
    HttpError,
    Ingest,
    caller_of,
    check_length,
    read_capped,
    seq_param,
    session_param,
)
from ingest.webrtc import Peer
from rawwave.contract import new_session_id
from rawwave.logs import bind_session, get_logger

log = get_logger(__name__)

SDP_TYPES = ("application/sdp",)
REQUIRED_ATTRIBUTES = ("fingerprint", "ice-ufrag", "ice-pwd")  # DTLS identity and ICE credentials


async def post_offer(request: web.Request) -> web.Response:
    ingest: Ingest = request.app[INGEST_KEY]
    ingest.check_accepting()
    owner = caller_of(request)
    ingest.check_peer_caps(owner)
    resume = request.query.get("session")
    async with ingest.new_session(new=not resume):  # a reconnect joins a session already counted
        offer = await _read_offer(request, ingest.settings.max_sdp_bytes)
        after_seq = seq_param(request.query.get("last_seq"), "last_seq")
        if resume:
            peer, answer = await _rejoin(ingest, session_param(resume), offer, owner, after_seq)
        else:
            respond = request.query.get("respond", "") in ("1", "true", "yes")
            peer, answer = await _start(ingest, offer, owner, respond)
    headers = {"Location": f"/whip/{peer.id}", "X-Rawwave-Session": peer.session}
    return web.Response(status=201, text=answer, content_type="application/sdp", headers=headers)


async def delete_resource(request: web.Request) -> web.Response:
    ingest: Ingest = request.app[INGEST_KEY]
    peer = ingest.peers.get(request.match_info["peer"])
    if peer is None:
        raise HttpError(404, "no such WHIP session", "not_found")
    await peer.close("client_stop", "client sent DELETE")
    return web.Response(status=200)


async def patch_resource(request: web.Request) -> web.Response:
    """Trickle ICE and ICE restarts are not supported: RFC 9725 section 4.3 says answer 405."""
    raise HttpError(
        405, "trickle ICE and ICE restart are not supported", "not_supported", {"Allow": "DELETE"}
    )


async def _start(ingest: Ingest, offer: str, owner: str, respond: bool) -> tuple[Peer, str]:
    audio = SessionAudio(ingest.streams, ingest.settings, new_session_id())
    peer, answer = await _negotiate(
        ingest, Peer(ingest.streams, ingest.settings, audio.session, audio, owner), offer, 0
    )
    await audio.announce(
        "webrtc", respond=respond
    )  # only once the offer was good: a bad one leaves no session behind
    with bind_session(peer.session):
        log.info("webrtc session started", peer=peer.id)
    return peer, answer


async def _rejoin(ingest: Ingest, session: str, offer: str, owner: str, after_seq: int) -> tuple[Peer, str]:
    old = ingest.peers.of_session(session)
    if old is None and not await _session_exists(ingest, session):
        raise HttpError(404, "no such session", "not_found")
    audio = old.audio if old is not None and old.audio is not None and not old.audio.ended else None
    peer, answer = await _negotiate(
        ingest, Peer(ingest.streams, ingest.settings, session, audio, owner), offer, after_seq
    )
    if old is not None:
        await old.close("client_stop", "replaced by a reconnecting peer", end_audio=audio is None)
    with bind_session(session):
        log.info("webrtc session rejoined", peer=peer.id, after_seq=after_seq, takes_audio=audio is not None)
    return peer, answer


async def _negotiate(ingest: Ingest, peer: Peer, offer: str, after_seq: int) -> tuple[Peer, str]:
    try:
        answer = await peer.negotiate(offer, after_seq)
    except Exception as e:  # aiortc raises many types on a bad offer; none of them is our 500
        try:
            await peer.close("error", "negotiation failed", end_audio=False)
        except Exception as close_error:  # a half-built aiortc peer can fail to close, too
            log.info(
                "refused peer did not close cleanly", error=f"{type(close_error).__name__}: {close_error}"
            )
        log.info("offer refused", error=f"{type(e).__name__}: {e}")
        raise HttpError(400, f"cannot negotiate this offer: {e or type(e).__name__}", "bad_sdp") from e
    ingest.peers.add(peer)
    return peer, answer


async def _session_exists(ingest: Ingest, session: str) -> bool:
    return await ingest.streams.audio_exists(session) or await ingest.streams.last_event_seq(session) > 0


async def _read_offer(request: web.Request, max_bytes: int) -> str:
    if request.content_type not in SDP_TYPES:
        raise HttpError(415, "the offer must be application/sdp", "bad_content_type")
    check_length(request, max_bytes, "offer")
    return _check_offer(await read_capped(request.content.readany, max_bytes, "offer"))


def _check_offer(body: bytes) -> str:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HttpError(400, "offer is not UTF-8 text", "bad_sdp") from e
    if not text.startswith("v=0") or "\nm=audio " not in text:
        raise HttpError(400, "offer is not an SDP offer with an audio section", "bad_sdp")
    missing = [attribute for attribute in REQUIRED_ATTRIBUTES if f"\na={attribute}:" not in text]
    if missing:  # aiortc would accept an offer without a fingerprint, and then skip DTLS verification
        raise HttpError(400, f"offer lacks a={missing[0]}", "bad_sdp")
    return text
