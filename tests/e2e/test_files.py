"""Files through the whole stack: `rawwave transcribe`, `rawwave push` + `rawwave consume`, and the
HTTP API with SSE all carry the audio to the real worker and bring back what the same model decodes
offline from the same audio, event for event."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from tests.models import read_wav

from .compare import (
    MIN_ENVELOPE_CORRELATION,
    arrived_audio,
    assert_contiguous_and_done,
    comparable,
    envelope_correlation,
    finals,
    text_closeness,
)
from .conftest import FORMATS, SENTENCE, Decode, Stack

pytestmark = pytest.mark.e2e


def test_transcribe_prints_the_offline_final(stack: Stack, speech_wav: Path, reference: dict) -> None:
    result = stack.cli("transcribe", str(speech_wav))
    assert result.returncode == 0, result.stderr
    expected = finals(reference[False])
    assert result.stdout.splitlines() == expected
    # the speech got through: the (weak, still training) default model wrote words for it
    assert any(c.isalpha() for c in "".join(expected)), expected


def test_transcribe_json_is_the_offline_event_stream(stack: Stack, speech_wav: Path, reference: dict) -> None:
    result = stack.cli("transcribe", "--json", str(speech_wav))
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert_contiguous_and_done(events)
    assert any(e["type"] == "partial" for e in events)
    assert comparable(events) == comparable(reference[False])


def test_transcribe_respond_prints_transcript_then_response(
    stack: Stack, speech_wav: Path, reference: dict
) -> None:
    result = stack.cli("transcribe", "--respond", str(speech_wav))
    assert result.returncode == 0, result.stderr
    events = reference[True]
    response = "".join(e.text for e in events if e.type == "response.delta")
    assert any(e.type == "response.done" for e in events)
    assert result.stdout == "".join(f"{text}\n" for text in finals(events)) + response + "\n"


def test_push_then_consume_sees_every_event_once(stack: Stack, speech_wav: Path, reference: dict) -> None:
    pushed = stack.cli("push", str(speech_wav))
    assert pushed.returncode == 0, pushed.stderr
    [session] = pushed.stdout.split()
    consumed = stack.cli("consume", session)
    assert consumed.returncode == 0, consumed.stderr
    events = [json.loads(line) for line in consumed.stdout.splitlines()]
    assert_contiguous_and_done(events)
    assert events[0]["session"] == session
    assert comparable(events) == comparable(reference[False])
    # resumable: after SEQ prints exactly the rest
    again = stack.cli("consume", "--after", "2", session)
    assert [json.loads(line) for line in again.stdout.splitlines()] == events[2:]


async def test_http_upload_and_sse_give_the_same_events(
    stack: Stack, speech_wav: Path, reference: dict
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.url}/v1/sessions", data=speech_wav.read_bytes()) as r:
            assert r.status == 201, await r.text()
            created = await r.json()
        async with http.get(f"{stack.url}{created['events']}") as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            body = await r.text()
    frames = [f for f in body.split("\n\n") if f.strip()]
    events = [json.loads(_field(f, "data")) for f in frames]
    assert [int(_field(f, "id")) for f in frames] == [e["seq"] for e in events]
    assert [_field(f, "event") for f in frames] == [e["type"] for e in events]
    assert_contiguous_and_done(events)
    assert events[0]["session"] == created["session"]
    assert comparable(events) == comparable(reference[False])


def _field(frame: str, name: str) -> str:
    return next(line.split(": ", 1)[1] for line in frame.splitlines() if line.startswith(f"{name}: "))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
async def test_other_formats_transcribe_like_the_wav(
    stack: Stack, speech_dir: Path, fmt: str, offline: Decode, reference: dict
) -> None:
    """flac (48 kHz), ogg-opus, mp3 (22.05 kHz): resampling and lossy codecs change the samples a
    little, so the worker must reproduce exactly the offline decode of the audio that reached Redis,
    that audio must be the sentence, and its final is near the wav's (see compare.py)."""
    result = await asyncio.to_thread(stack.cli, "transcribe", "--json", str(speech_dir / f"s.{fmt}"))
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert_contiguous_and_done(events)
    pcm = await arrived_audio(stack, events[0]["session"])
    assert comparable(events) == comparable(offline(pcm, False))
    wav = read_wav((speech_dir / "speech.wav").read_bytes())
    assert abs(len(pcm) - len(wav)) / 2 / 16000 <= 0.1
    assert envelope_correlation(pcm, wav) >= MIN_ENVELOPE_CORRELATION
    [live] = [e["text"] for e in events if e["type"] == "final"]
    [lossless] = finals(reference[False])
    text_closeness(live, lossless, SENTENCE, fmt)
