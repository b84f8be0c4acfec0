"""`latency`: end to end through the real stack — redis-server, `rawwave ingest` and `rawwave worker` as
subprocesses on loopback — with audio sent at real-time pace through the WebRTC path (an aiortc client
peer whose mic is a paced 16 kHz track; events come back on its data channel) and the file path (the
code of `rawwave push --realtime`; events read from Redis as `rawwave consume` does).

Per utterance (committed evaluation sentences, espeak/flite voices from a fixed seed, word timings from
the synthesizer): the delay from the end of each word in the audio to the partial that first contains
it (in-order word alignment), time to first partial, final after the end of speech, and for respond
sessions the first response token after the end of speech. The two paths run side by side, one session
each at a time. Words the model never writes are counted, not timed.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from bench.models import bench_model
from bench.report import write_result
from bench.stack import Stack
from bench.workload import (
    Utterance,
    finite,
    load,
    reference_tokens,
    stats,
    utterances,
    versions,
    word_appearances,
)
from ingest.file_session import open_file_session
from ingest.webrtc import pinned_ice_hosts
from rawwave.settings import load_settings
from rawwave.streams import Streams

FRAME_S = 0.02  # one 20 ms mic frame
FRAME_SAMPLES = 320  # at 16 kHz
TRAILING_SILENCE_S = 1.5  # after the speech: long enough for the model's 800 ms end-pointing
RESPOND_EVERY = 5  # every 5th utterance asks for a response
SESSION_TIMEOUT_S = 45.0  # a session without `done` by then is recorded as timed out
SEED = 0


@dataclass
class Run:
    """One utterance through one path: t0 is the wall time of audio time 0; events with arrival times."""

    path: str
    utterance: Utterance
    respond: bool
    t0: float = 0.0
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    timed_out: bool = False

    def result(self) -> dict[str, Any]:
        reference = reference_tokens(self.utterance.words)
        partials = [(at, e["t_ms"] / 1000, e["text"]) for at, e in self.events if e["type"] == "partial"]
        seen = word_appearances(reference, partials)
        ends = [self.t0 + end for _, _, end in reference]
        eos = self.t0 + self.utterance.speech_end
        first = {e["type"]: at for at, e in reversed(self.events)}
        return {
            "path": self.path,
            "text": self.utterance.text,
            "voice": self.utterance.voice,
            "respond": self.respond,
            "words": len(reference),
            "word_delays_s": {str(i): round(at - ends[i], 4) for i, at in sorted(seen.items())},
            "first_partial_s": _since(first.get("partial"), self.t0),
            "final_after_eos_s": _since(first.get("final"), eos),
            "response_first_token_after_eos_s": _since(first.get("response.delta"), eos),
            "response_first_token_after_final_s": _since(first.get("response.delta"), first.get("final")),
            "final": next((e["text"] for _, e in self.events if e["type"] == "final"), None),
            "timed_out": self.timed_out,
        }


def _since(at: float | None, origin: float | None) -> float | None:
    return None if at is None or origin is None else round(at - origin, 4)


# -- the WebRTC path ----------------------------------------------------------------------------------


class PacedPcm(MediaStreamTrack):
    """A mic that says `pcm`: frame k (20 ms) is handed over at t0 + (k + 1) * 20 ms, t0 = first recv."""

    kind = "audio"

    def __init__(self, pcm: np.ndarray) -> None:
        super().__init__()
        self.pcm, self.k, self.t0 = pcm, 0, 0.0

    async def recv(self) -> av.AudioFrame:
        if self.k == 0:
            self.t0 = time.monotonic()
        start = self.k * FRAME_SAMPLES
        chunk = self.pcm[start : start + FRAME_SAMPLES]
        if len(chunk) < FRAME_SAMPLES:  # past the end: silence until the peer is closed
            chunk = np.zeros(FRAME_SAMPLES, np.int16)
        await asyncio.sleep(max(0.0, self.t0 + (self.k + 1) * FRAME_S - time.monotonic()))
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 16000, start, fractions.Fraction(1, 16000)
        self.k += 1
        return frame


async def run_webrtc(run: Run, base_url: str, http: aiohttp.ClientSession) -> Run:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel, got = pc.createDataChannel("events"), asyncio.Event()
    channel.on("message", lambda m: (run.events.append((time.monotonic(), json.loads(m))), got.set()))
    track = PacedPcm(run.utterance.pcm)
    pc.addTrack(track)
    try:
        with pinned_ice_hosts(["127.0.0.1"]):
            await pc.setLocalDescription(await pc.createOffer())
        query = "?respond=1" if run.respond else ""
        headers = {"Content-Type": "application/sdp"}
        async with http.post(f"{base_url}/whip{query}", data=pc.localDescription.sdp, headers=headers) as r:
            assert r.status == 201, await r.text()
            answer = await r.text()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        async with asyncio.timeout(SESSION_TIMEOUT_S):
            while track.k * FRAME_S < run.utterance.seconds:  # the whole utterance has been sent
                await asyncio.sleep(0.05)
            channel.send("stop")
            while not any(e["type"] == "done" for _, e in run.events):
                got.clear()
                await got.wait()
    except TimeoutError:
        run.timed_out = True
    finally:
        run.t0 = track.t0
        await pc.close()
    return run


# -- the file path --------------------------------------------------------------------------------------


async def run_file(run: Run, streams: Streams, settings: Any) -> Run:
    upload = await open_file_session(
        streams, settings, run.utterance.wav(), name="bench.wav", respond=run.respond
    )
    run.t0 = time.monotonic()
    pump = asyncio.create_task(upload.pump(realtime=True))
    try:
        async with asyncio.timeout(SESSION_TIMEOUT_S):
            after = 0
            while not run.events or run.events[-1][1]["type"] != "done":
                for event in await streams.read_events(upload.session, after, block_ms=1000):
                    run.events.append((time.monotonic(), json.loads(event.model_dump_json())))
                    after = event.seq
    except TimeoutError:
        run.timed_out = True
    await pump
    return run


# -- the benchmark ----------------------------------------------------------------------------------------


async def measure(stack: Stack, spoken: list[Utterance]) -> list[dict[str, Any]]:
    settings = load_settings(redis_url=stack.redis_url)
    streams = Streams.connect(settings)
    results = []
    async with aiohttp.ClientSession() as http:
        for i, utt in enumerate(spoken):
            respond = i % RESPOND_EVERY == RESPOND_EVERY - 1
            webrtc, file = await asyncio.gather(
                run_webrtc(Run("webrtc", utt, respond), stack.ingest_url, http),
                run_file(Run("file", utt, respond), streams, settings),
            )
            results += [webrtc.result(), file.result()]
    await streams.close()
    return results


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    def pick(key: str) -> list[float]:
        return [s[key] for s in samples if s[key] is not None]

    delays = [d for s in samples for d in s["word_delays_s"].values()]
    words = sum(s["words"] for s in samples)
    return {
        "utterances": len(samples),
        "timed_out": sum(s["timed_out"] for s in samples),
        "words": words,
        "words_appeared": len(delays),
        "fraction_appeared": len(delays) / words if words else 0.0,
        "word_delay_s": stats(delays),
        "first_partial_s": stats(pick("first_partial_s")),
        "final_after_eos_s": stats(pick("final_after_eos_s")),
        "response_first_token_after_eos_s": stats(pick("response_first_token_after_eos_s")),
        "response_first_token_after_final_s": stats(pick("response_first_token_after_final_s")),
    }


def main(quick: bool = False) -> int:
    count = 2 if quick else 50
    model = bench_model(quick)
    spoken = utterances(count, seed=SEED, silence_s=TRAILING_SILENCE_S)
    load_before = load()
    env = {"RAWWAVE_ORT_INTRA_THREADS": "1"}
    with Stack(model.directory, workers=1, ingest=True, **env) as stack:
        started = time.monotonic()
        samples = asyncio.run(measure(stack, spoken))
        elapsed = time.monotonic() - started
    paths = {p: summarize([s for s in samples if s["path"] == p]) for p in ("webrtc", "file")}
    write_result(
        "latency",
        finite(
            {
                "quick": quick,
                "versions": versions(),
                "model": model.describe(),
                "settings": {
                    "utterances_per_path": count,
                    "seed": SEED,
                    "trailing_silence_s": TRAILING_SILENCE_S,
                    "respond_every": RESPOND_EVERY,
                    "workers": 1,
                    "ort_intra_threads": 1,
                    "concurrency": "one WebRTC and one file session at a time, side by side",
                    "webrtc_pacing": "20 ms frames, each sent when a live mic would have it",
                    "file_pacing": (
                        "rawwave push --realtime: each 200 ms chunk is sent at its start (leads a mic)"
                    ),
                    "word_matching": "in-order alignment (difflib) of normalized words; partial events only; "
                    "a partial counts only for words begun by its audio time t_ms",
                },
                "load_before": load_before,
                "load_after": load(),
                "seconds": round(elapsed, 1),
                "paths": paths,
                "samples": samples,
                "headline": _headline(paths),
            }
        ),
    )
    return 0


def _headline(paths: dict[str, Any]) -> str:
    parts = []
    for name, p in paths.items():
        delay = p["word_delay_s"]
        words = (
            f"word delay p50 {delay['p50']:.2f} / p95 {delay['p95']:.2f} s (over the "
            f"{p['fraction_appeared']:.0%} of words that ever appeared)"
            if delay["n"]
            else "no word ever appeared in a partial"
        )
        parts.append(
            f"{name}: {words}, first partial {_fmt(p['first_partial_s']['p50'])} s, final "
            f"{_fmt(p['final_after_eos_s']['p50'])} s and response first token "
            f"{_fmt(p['response_first_token_after_eos_s']['p50'])} s after end of speech (p50)"
        )
    return "; ".join(parts)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
