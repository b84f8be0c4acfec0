"""`throughput`: how many concurrent real-time sessions one worker (then two) keeps up with.

For 1, 2, 4, 8, 16, 32 sessions: each session's audio (two evaluation sentences, then silence) is
appended to Redis at a live mic's pace (each 200 ms chunk once it would have been spoken, as
`rawwave push --realtime` does, through the same `Streams` calls), starts staggered over one chunk.
Lag of an event = its arrival at the consumer minus the wall time of its audio time (`t_ms`); a level
keeps up (lag bounded) when every session finishes and no event lags more than LAG_BOUND_S; the
headline counts levels that keep up with p95 word delay (or event lag, when the model writes too few
words) under 1 s. Also: real-time factor (worker
CPU seconds per audio second, and wall time to `done` per audio second), CPU % and peak RSS of the
workers (/proc), word delays as in `latency`. Once a level falls behind, larger ones are skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import numpy as np

from bench.models import bench_model
from bench.report import write_result
from bench.stack import Stack
from bench.workload import (
    SAMPLE_RATE,
    Utterance,
    cpu_seconds,
    finite,
    load,
    reference_tokens,
    rss_bytes,
    stats,
    utterances,
    versions,
    word_appearances,
)
from rawwave.contract import AudioChunk, AudioEnd, SessionAnnounce, new_session_id
from rawwave.settings import load_settings
from rawwave.streams import Streams

SESSION_COUNTS = (1, 2, 4, 8, 16, 32)
CHUNK_S = 0.2
CHUNK_SAMPLES = int(CHUNK_S * SAMPLE_RATE)
DRAIN_TIMEOUT_S = 30.0  # after the audio: a session not done by then fell behind
LAG_LIMIT_S = 1.0  # the headline's bar: p95 word delay (or event lag) under this
LAG_BOUND_S = 3.0  # a level keeps up when every session finishes and no event lags more than this
SEED = 1


class Session:
    def __init__(self, pcm: np.ndarray, words: list[tuple[str, float, float]], offset_s: float) -> None:
        self.id, self.pcm, self.words, self.offset_s = new_session_id(), pcm, words, offset_s
        self.t0 = 0.0
        self.events: list[tuple[float, dict[str, Any]]] = []

    @property
    def seconds(self) -> float:
        return len(self.pcm) / SAMPLE_RATE

    async def push(self, streams: Streams, start: float) -> None:
        await asyncio.sleep(max(0.0, start + self.offset_s - time.monotonic()))
        await streams.announce(
            SessionAnnounce(session=self.id, source="file", created_ms=int(time.time() * 1000))
        )
        self.t0 = time.monotonic()
        chunks = [self.pcm[i : i + CHUNK_SAMPLES] for i in range(0, len(self.pcm), CHUNK_SAMPLES)]
        for seq, chunk in enumerate(chunks, start=1):
            await asyncio.sleep(max(0.0, self.t0 + seq * CHUNK_S - time.monotonic()))
            await streams.append_audio(self.id, AudioChunk(seq=seq, pcm=chunk.tobytes()))
        await streams.append_audio(self.id, AudioEnd(seq=len(chunks) + 1))

    async def follow(self, streams: Streams, deadline: float) -> None:
        after = 0
        while (not self.events or self.events[-1][1]["type"] != "done") and time.monotonic() < deadline:
            for event in await streams.read_events(self.id, after, block_ms=500):
                self.events.append((time.monotonic(), json.loads(event.model_dump_json())))
                after = event.seq

    def result(self) -> dict[str, Any]:
        lags = [
            at - (self.t0 + e["t_ms"] / 1000) for at, e in self.events if e["type"] in ("partial", "final")
        ]
        reference = reference_tokens(self.words)
        partials = [(at, e["t_ms"] / 1000, e["text"]) for at, e in self.events if e["type"] == "partial"]
        seen = word_appearances(reference, partials)
        done = next((at for at, e in self.events if e["type"] == "done"), None)
        return {
            "done": done is not None,
            "audio_s": round(self.seconds, 3),
            "wall_rtf": round((done - self.t0) / self.seconds, 4) if done else None,
            "lags_s": [round(x, 4) for x in lags],
            "words": len(reference),
            "word_delays_s": [round(at - self.t0 - reference[i][2], 4) for i, at in sorted(seen.items())],
        }


def session_audio(spoken: list[Utterance], i: int) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """Two sentences back to back (0.4 s apart) and 1 s of silence; word times shifted to match."""
    a, b = spoken[(2 * i) % len(spoken)], spoken[(2 * i + 1) % len(spoken)]
    gap = np.zeros(int(0.4 * SAMPLE_RATE), np.int16)
    shift = (len(a.pcm) + len(gap)) / SAMPLE_RATE
    pcm = np.concatenate([a.pcm, gap, b.pcm, np.zeros(SAMPLE_RATE, np.int16)])
    return pcm, [*a.words, *[(w, s + shift, e + shift) for w, s, e in b.words]]


async def measure_level(stack: Stack, spoken: list[Utterance], count: int) -> dict[str, Any]:
    streams = Streams.connect(load_settings(redis_url=stack.redis_url))
    rng = np.random.default_rng(count)
    sessions = [Session(*session_audio(spoken, i), float(rng.uniform(0, CHUNK_S))) for i in range(count)]
    pids = stack.worker_pids
    cpu0, peak = sum(cpu_seconds(p) for p in pids), [0]
    start = time.monotonic()
    deadline = start + max(s.seconds for s in sessions) + CHUNK_S + DRAIN_TIMEOUT_S
    sampler = asyncio.create_task(_sample_rss(pids, peak))
    await asyncio.gather(
        *(s.push(streams, start) for s in sessions), *(s.follow(streams, deadline) for s in sessions)
    )
    sampler.cancel()
    wall, cpu = time.monotonic() - start, sum(cpu_seconds(p) for p in pids) - cpu0
    await streams.close()
    return summarize([s.result() for s in sessions], wall, cpu, peak[0])


async def _sample_rss(pids: list[int], peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], sum(rss_bytes(p) for p in pids))
        await asyncio.sleep(0.5)


def summarize(samples: list[dict[str, Any]], wall: float, cpu: float, rss: int) -> dict[str, Any]:
    lags = [x for s in samples for x in s["lags_s"]]
    delays = [x for s in samples for x in s["word_delays_s"]]
    words = sum(s["words"] for s in samples)
    audio = sum(s["audio_s"] for s in samples)
    lag = stats(lags)
    all_done = all(s["done"] for s in samples)
    return {
        "sessions": len(samples),
        "kept_up": bool(all_done and lag["max"] is not None and lag["max"] < LAG_BOUND_S),
        "all_done": all_done,
        "lag_s": lag,
        "word_delay_s": stats(delays),
        "fraction_words_appeared": len(delays) / words if words else 0.0,
        "cpu_rtf": cpu / audio,  # worker CPU seconds per second of audio
        "wall_rtf": stats([s["wall_rtf"] for s in samples if s["wall_rtf"] is not None]),
        "worker_cpu_percent": 100 * cpu / wall,
        "worker_peak_rss_mb": rss / 1e6,
        "wall_s": wall,
        "samples": samples,
    }


def run_workers(model_dir: Any, workers: int, spoken: list[Utterance], counts: tuple[int, ...]) -> dict:
    env = {"RAWWAVE_ORT_INTRA_THREADS": "1", "RAWWAVE_MAX_SESSIONS_PER_WORKER": "32"}
    levels: dict[str, Any] = {}
    with Stack(model_dir, workers=workers, **env) as stack:
        for count in counts:
            levels[str(count)] = {"load_before": load(), **asyncio.run(measure_level(stack, spoken, count))}
            levels[str(count)]["load_after"] = load()
            print(
                f"throughput: {workers} worker(s), {count} sessions: kept_up={levels[str(count)]['kept_up']}"
            )
            if not levels[str(count)]["kept_up"]:
                skipped = [c for c in counts if c > count]
                levels.update({str(c): {"skipped": f"{count} sessions already fell behind"} for c in skipped})
                break
    return levels


def best_streams(levels: dict[str, Any], use_words: bool) -> int:
    """The most sessions that kept up with p95 word delay (or lag) under 1 s."""

    def ok(level: dict[str, Any]) -> bool:
        if not level.get("kept_up"):
            return False
        metric = level["word_delay_s"]["p95"] if use_words else level["lag_s"]["p95"]
        return metric is not None and metric < LAG_LIMIT_S

    return max([int(n) for n, level in levels.items() if ok(level)], default=0)


def main(quick: bool = False) -> int:
    counts = (1, 2) if quick else SESSION_COUNTS
    model = bench_model(quick)
    spoken = utterances(4 if quick else 24, seed=SEED)
    load_before = load()
    runs = {str(w): run_workers(model.directory, w, spoken, counts) for w in (1, 2)}
    levels = [level for run in runs.values() for level in run.values() if "fraction_words_appeared" in level]
    appeared = max((level["fraction_words_appeared"] for level in levels), default=0.0)
    use_words = appeared >= 0.2
    best = {w: best_streams(run, use_words) for w, run in runs.items()}
    cores = os.cpu_count() or 1
    top = max(best.values())
    bounded = {
        w: max([int(n) for n, lv in run.items() if lv.get("kept_up")], default=0) for w, run in runs.items()
    }
    metric = (
        "p95 word delay" if use_words else f"p95 event lag (words too rare: at most {appeared:.0%} appeared)"
    )
    write_result(
        "throughput",
        finite(
            {
                "quick": quick,
                "versions": versions(),
                "model": model.describe(),
                "settings": {
                    "session_counts": list(counts),
                    "chunk_s": CHUNK_S,
                    "drain_timeout_s": DRAIN_TIMEOUT_S,
                    "lag_limit_s": LAG_LIMIT_S,
                    "lag_bound_s": LAG_BOUND_S,
                    "seed": SEED,
                    "ort_intra_threads": 1,
                    "inference_threads": 2,
                    "max_sessions_per_worker": 32,
                    "headline_metric": metric,
                },
                "load_before": load_before,
                "load_after": load(),
                "cores": cores,
                "workers": runs,
                "best_sessions": best,
                "most_sessions_lag_bounded": bounded,
                "streams_per_core": top / cores,
                "headline": f"{top / cores:g} concurrent real-time streams per CPU core "
                f"({top} on {cores} cores; "
                f"1 worker: {best['1']}, 2 workers: {best['2']}) with {metric} under 1 s; "
                f"lag stays bounded (< {LAG_BOUND_S:g} s) up to {bounded['1']} / {bounded['2']} sessions",
            }
        ),
    )
    return 0
