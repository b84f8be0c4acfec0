"""Load and abuse on loopback, bounded: signaling abuse (token, Origin, size, fuzzed SDP), a hostile
audio corpus over HTTP, and hypothesis fuzzers over audio decoding and the contract decoders.

Never a 500, never a crash, bounded memory, a clear error code every time; legitimate sessions are
unaffected. (Peer caps, 503/429 + Retry-After, are tested in tests/ingest/test_whip.py.)
"""

from __future__ import annotations

import contextlib
import io
import random
import resource
import struct
import subprocess
import time
import wave

import aiohttp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from ingest.audio_files import BadAudioError, DecodeLimits, decode_all
from rawwave import contract
from rawwave.contract import ContractError
from rawwave.settings import Settings
from tests.faults.books import CLIPS
from tests.faults.conftest import report
from tests.ingest.conftest import start_server
from tests.ingest.webrtc_client import unconnected_offer
from tests.models import wav_bytes

TOKEN = "s3cret-token"
ORIGIN = "https://app.example"
GOOD = {"Authorization": f"Bearer {TOKEN}", "Origin": ORIGIN}
LIMITS = DecodeLimits.for_session(10.0)


def mutate(offer: str, rng: random.Random) -> bytes:
    """One hostile variant of a real offer: lines dropped, duplicated, shuffled, bytes flipped, cut."""
    lines = offer.split("\r\n")
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(lines))
        choice = rng.randrange(5)
        if choice == 0:
            del lines[i]
        elif choice == 1:
            lines.insert(i, lines[i] * rng.randint(2, 50))
        elif choice == 2:
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)] + rng.choice(
                ["\x00", "=", ":", " ", "\xff", "-1"]
            )
        elif choice == 3:
            rng.shuffle(lines)
        else:
            lines[i] = "a=" + "".join(rng.choice("abc:=/ 0123456789") for _ in range(rng.randint(0, 300)))
    body = "\r\n".join(lines).encode("utf-8", "surrogateescape")
    if rng.random() < 0.2:
        body = bytes(b ^ 0xFF if rng.random() < 0.01 else b for b in body)
    return body


async def test_signaling_abuse_is_refused_clearly_and_legit_peers_still_connect(settings: Settings) -> None:
    guarded = settings.model_copy(update={
        "auth_token": SecretStr(TOKEN), "allowed_origins": [ORIGIN], "max_sdp_bytes": 8192,
        "ice_host_addresses": ["127.0.0.1"],
    })  # fmt: skip
    runner, url = await start_server(guarded)
    offer, rng = await unconnected_offer(), random.Random(2024)
    statuses: dict[str, list[int]] = {}

    async def post(name: str, body: bytes | str, headers: dict[str, str]) -> int:
        headers = {"Content-Type": "application/sdp", **headers}
        async with aiohttp.ClientSession() as http, http.post(f"{url}/whip", data=body, headers=headers) as r:
            assert r.content_type == "application/json" or r.status == 201
            statuses.setdefault(name, []).append(r.status)
            if r.status == 201:
                await http.delete(f"{url}{r.headers['Location']}", headers=GOOD)
            return r.status

    try:
        await post("no_token", offer, {"Origin": ORIGIN})
        await post("wrong_token", offer, {"Authorization": "Bearer nope", "Origin": ORIGIN})
        await post("bad_origin", offer, {**GOOD, "Origin": "https://evil.example"})
        await post("oversized", offer + "a=x:" + "y" * 20000 + "\r\n", GOOD)
        await post("wrong_type", offer, {**GOOD, "Content-Type": "text/plain"})
        started = time.monotonic()
        for _ in range(150):
            await post("fuzzed", mutate(offer, rng), GOOD)
        fuzz_s = time.monotonic() - started
        await post("legit_after_abuse", offer, GOOD)
    finally:
        await runner.cleanup()
    counts = {name: {str(s): codes.count(s) for s in sorted(set(codes))} for name, codes in statuses.items()}
    report("abuse_signaling", {"statuses": counts, "fuzzed_offers_per_s": round(150 / fuzz_s, 1)})
    assert statuses["no_token"] == statuses["wrong_token"] == [401]
    assert (
        statuses["bad_origin"] == [403] and statuses["oversized"] == [413] and statuses["wrong_type"] == [415]
    )
    assert 500 not in statuses["fuzzed"] and set(statuses["fuzzed"]) <= {201, 400, 413}
    assert statuses["legit_after_abuse"] == [201]


# -- hostile audio -----------------------------------------------------------------------------


def _wav(samples: np.ndarray, rate: int = 16000, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt) :]


def _float_wav(values: np.ndarray) -> bytes:
    """IEEE float WAV (format 3), which can carry NaN and inf."""
    pcm = values.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 16000 * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _flac_of_silence(seconds: int) -> bytes:
    """A decompression bomb: minutes of silence in a few kilobytes."""
    command = ["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono",
               "-t", str(seconds), "-c:a", "flac", "-f", "flac", "-"]  # fmt: skip
    return subprocess.run(command, capture_output=True, check=True).stdout


def hostile_corpus() -> dict[str, bytes]:
    speech = wav_bytes(np.frombuffer(CLIPS[0], np.int16))
    tone = (np.sin(np.arange(16000) / 5) * 8000).astype(np.int16)
    return {
        "empty": b"",
        "truncated": speech[: len(speech) // 2],
        "header_only": speech[:44],
        "forged_rate": _patched(speech, 24, "<I", 655350),
        "forged_channels": _patched(speech, 22, "<H", 200),
        "unknown_codec": _patched(speech, 20, "<H", 0),  # found by the fuzzer below: was a 500
        "rate_too_low": _wav(tone[:500], rate=500),
        "wrong_rate_8k": _wav(tone[:8000], rate=8000),  # fine: resampled
        "many_channels_33": _wav(np.repeat(tone[:1600], 33), channels=33),
        "nan": _float_wav(np.array([0.1, np.nan] * 8000, np.float32)),
        "inf": _float_wav(np.array([0.1, np.inf] * 8000, np.float32)),
        "text": b"hello, not audio\n" * 100,
        "random_bytes": np.random.default_rng(0).bytes(50_000),
        "decompression_bomb": _flac_of_silence(1200),
        "oversized": b"RIFF" + b"\x00" * (2 * 1024 * 1024),
    }


async def test_hostile_audio_uploads_get_clear_errors_and_bounded_memory(settings: Settings) -> None:
    limited = settings.model_copy(update={"max_session_s": 10.0, "max_upload_bytes": 1024 * 1024})
    runner, url = await start_server(limited)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results: dict[str, str] = {}
    try:
        async with aiohttp.ClientSession() as http:
            for name, body in hostile_corpus().items():
                async with http.post(f"{url}/v1/sessions", data=body) as r:
                    answer = await r.json()
                    results[name] = f"{r.status} {answer.get('code', '')}".strip()
                    if r.status == 201:  # accepted: how did its audio end?
                        results[name] += " end:" + await _end_reason(limited, answer["session"])
    finally:
        await runner.cleanup()
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    report("abuse_audio", {"results": results, "peak_rss_growth_mb": round(rss_growth_mb, 1)})
    assert not any(result.startswith("500") for result in results.values()), results
    assert results["wrong_rate_8k"].startswith("201") and results["wrong_rate_8k"].endswith("end:end")
    # found only at the end of the decode, after the 201: the session's audio ends with reason "error"
    assert results["truncated"] in ("400 bad_audio", "201 end:error")
    for name in ("empty", "header_only", "unknown_codec", "forged_rate", "forged_channels", "rate_too_low",
                 "many_channels_33", "nan", "inf", "text", "random_bytes"):  # fmt: skip
        assert results[name].startswith("400"), (name, results[name])
    assert results["oversized"] == "413 too_large"
    bomb = results["decompression_bomb"]
    assert bomb == "413 too_long" or bomb == "201 end:error", bomb  # refused, or cut off at max_session_s
    assert rss_growth_mb < 300


async def _end_reason(settings: Settings, session: str) -> str:
    from rawwave.streams import Streams

    streams = Streams.connect(settings)
    try:
        for _ in range(100):
            rows = await streams.redis.xrevrange(contract.audio_key(session), count=1)
            entry = contract.decode_audio(rows[0][1]) if rows else None
            if isinstance(entry, contract.AudioEnd):
                return entry.reason
            time.sleep(0.05)
        return "none"
    finally:
        await streams.close()


# -- fuzzers -----------------------------------------------------------------------------------

SEED_WAV = wav_bytes(np.frombuffer(CLIPS[1][:16000], np.int16))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=4096),
    st.tuples(st.integers(0, len(SEED_WAV) - 1), st.binary(min_size=1, max_size=16)).map(
        lambda cut: SEED_WAV[: cut[0]] + cut[1] + SEED_WAV[cut[0] + len(cut[1]) :]),
    st.integers(0, len(SEED_WAV)).map(lambda n: SEED_WAV[:n]),
))  # fmt: skip
def test_fuzzed_audio_decodes_or_fails_with_a_clear_error(data: bytes) -> None:
    try:
        pcm = decode_all(data, LIMITS, "fuzz")
    except BadAudioError as e:
        assert str(e).startswith("fuzz: ")
        return
    assert len(pcm) % 2 == 0 and len(pcm) <= LIMITS.max_output_bytes


FIELDS = st.dictionaries(
    st.sampled_from([b"v", b"kind", b"seq", b"pcm", b"reason", b"message", b"event", b"json", b"x"]),
    st.one_of(st.binary(max_size=64), st.sampled_from([b"1", b"chunk", b"end", b"0", b"-1", b"{}", b"[]"]),
              st.builds(lambda s: s.encode(), st.text(max_size=64))),
    max_size=6,
)  # fmt: skip
DECODERS = [
    contract.decode_audio,
    contract.decode_event,
    contract.decode_announce,
    contract.decode_dead_letter,
]


@settings(max_examples=200, deadline=None)
@given(FIELDS, st.sampled_from(DECODERS))
def test_fuzzed_stream_entries_decode_or_raise_contract_error(fields: dict, decoder) -> None:
    with contextlib.suppress(ContractError):
        decoder(fields)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=512), st.builds(lambda s: s.encode(), st.text(max_size=256))))
def test_fuzzed_event_json_parses_or_raises_contract_error(text: bytes) -> None:
    with contextlib.suppress(ContractError):
        contract.event_from_json(text)


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
