"""A real aiortc client peer streams the sentence over WebRTC (127.0.0.1 only) to the stack's ingest;
the real worker's partials and final come back on the data channel."""

from __future__ import annotations

from pathlib import Path

import pytest

from rawwave import contract
from rawwave.contract import Event
from tests.ingest.webrtc_client import connect
from tests.models import read_wav

from .compare import (
    MIN_ENVELOPE_CORRELATION,
    arrived_audio,
    cer,
    comparable,
    envelope_correlation,
    finals,
    text_closeness,
)
from .conftest import SENTENCE, TAIL_SILENCE_S, Decode, Stack

pytestmark = pytest.mark.e2e


def test_cer() -> None:
    assert cer("abc", "abc") == 0
    assert cer("abd", "abc") == pytest.approx(1 / 3)
    assert cer("", "ab") == 1


async def test_webrtc_client_gets_the_workers_partials_and_final(
    stack: Stack, speech_wav: Path, offline: Decode, reference: dict[bool, list[Event]]
) -> None:
    """Opus is lossy and the live path resamples twice (16 -> 48 -> 16 kHz): compare.py says what is
    asserted exactly and what only for a model that has learned the sentence."""
    client = await connect(stack.url, wav=str(speech_wav))
    try:
        # the sentence, then 1.2 s of silence: the worker's end-pointing closes the turn
        final = await client.wait_for(lambda e: e["type"] == "final", timeout=60)
        client.channel.send("stop")
        await client.wait_for(lambda e: e["type"] == "done", timeout=30)
    finally:
        await client.close()
    events = client.events
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert {e["session"] for e in events} == {client.session}
    assert any(e["type"] == "partial" for e in events)
    pcm = await arrived_audio(stack, client.session)
    assert comparable(events) == comparable(offline(pcm, False))
    sent = read_wav(speech_wav.read_bytes())
    # the whole sentence came ("stop", sent at the final, may cut its trailing silence short), no more
    seconds, sent_s = (len(b) / 2 / contract.SAMPLE_RATE for b in (pcm, sent))
    assert sent_s - TAIL_SILENCE_S <= seconds <= sent_s + 0.1, (seconds, sent_s)
    assert envelope_correlation(pcm, sent) >= MIN_ENVELOPE_CORRELATION
    [file_final] = finals(reference[False])
    text_closeness(final["text"], file_final, SENTENCE, "webrtc (opus)")
