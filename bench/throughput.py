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

Batching (issue 5): 1, 4, 16 sessions whose whole audio is pushed at once (saturating one worker), on
two workers started side by side, one with RAWWAVE_BATCHING=0 and one with =1, the levels alternating
between them (ROUNDS times, order flipped each round, so load on the machine hits both alike). Per
level: audio seconds processed per wall second (all sessions' audio / time until the last `done`), the
real-time factor per stream (time from push to its `done` / its audio length), worker CPU per audio
second, and the events of both runs compared session by session (batching must not change them).
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
from rawwave.settings import Settings, load_settings
from rawwave.streams import Streams

SESSION_COUNTS = (1, 2, 4, 8, 16, 32)
CHUNK_S = 0.2
CHUNK_SAMPLES = int(CHUNK_S * SAMPLE_RATE)
DRAIN_TIMEOUT_S = 30.0  # after the audio: a session not done by then fell behind
LAG_LIMIT_S = 1.0  # the headline's bar: p95 word delay (or event lag) under this
LAG_BOUND_S = 3.0  # a level keeps up when every session finishes and no event lags more than this
SEED = 1
BATCHING_COUNTS, QUICK_BATCHING_COUNTS = (1, 4, 16), (1, 2)
ROUNDS, QUICK_ROUNDS = 5, 1
SATURATED_PAIRS = 3  # sentence pairs per saturating session (about 20 s of audio)
SATURATED_TIMEOUT_S = 300.0


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

    async def push_all(self, streams: Streams) -> None:
        """The whole audio at once (an upload), not at a mic's pace."""
        self.t0 = time.monotonic()
        await streams.announce(
            SessionAnnounce(session=self.id, source="file", created_ms=int(time.time() * 1000))
        )
        chunks = [self.pcm[i : i + CHUNK_SAMPLES] for i in range(0, len(self.pcm), CHUNK_SAMPLES)]
        for seq, chunk in enumerate(chunks, start=1):
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


def saturating_audio(spoken: list[Utterance], i: int) -> np.ndarray:
    return np.concatenate([session_audio(spoken, SATURATED_PAIRS * i + j)[0] for j in range(SATURATED_PAIRS)])


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


async def measure_saturated(stack: Stack, pcms: list[np.ndarray]) -> dict[str, Any]:
    """Every session's whole audio pushed at once; until the last `done`."""
    streams = Streams.connect(load_settings(redis_url=stack.redis_url))
    sessions = [Session(pcm, [], 0.0) for pcm in pcms]
    pids = stack.worker_pids
    cpu0, start = sum(cpu_seconds(p) for p in pids), time.monotonic()
    await asyncio.gather(*(s.push_all(streams) for s in sessions))
    await asyncio.gather(*(s.follow(streams, start + SATURATED_TIMEOUT_S) for s in sessions))
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    await streams.close()
    done = [next((at for at, e in s.events if e["type"] == "done"), None) for s in sessions]
    finished = [at for at in done if at is not None]
    wall = max(finished) - start if finished else float("nan")
    audio = sum(s.seconds for s in sessions)
    return {
        "sessions": len(sessions),
        "all_done": len(finished) == len(sessions),
        "audio_s": audio,
        "wall_s": wall,
        "audio_s_per_wall_s": audio / wall,
        "rtf_per_stream": stats(
            [(at - s.t0) / s.seconds for s, at in zip(sessions, done, strict=True) if at is not None]
        ),
        "cpu_rtf": cpu / audio,
        "events": [[{k: v for k, v in e.items() if k != "session"} for _, e in s.events] for s in sessions],
    }


def run_batching(model_dir: Any, spoken: list[Utterance], counts: tuple[int, ...], rounds: int) -> dict:
    """Batching off and on, on two single-worker stacks kept up side by side, levels alternating."""
    env = {"RAWWAVE_ORT_INTRA_THREADS": "1", "RAWWAVE_MAX_SESSIONS_PER_WORKER": "32"}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        m: {str(c): [] for c in counts} for m in ("off", "on")
    }
    with (
        Stack(model_dir, **env, RAWWAVE_BATCHING="0") as off,
        Stack(model_dir, **env, RAWWAVE_BATCHING="1") as on,
    ):
        stacks = {"off": off, "on": on}
        for stack in stacks.values():  # warm-up: first calls allocate
            asyncio.run(measure_saturated(stack, [saturating_audio(spoken, 0)]))
        for r in range(rounds):
            for count in counts:
                pcms = [saturating_audio(spoken, i) for i in range(count)]
                for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                    runs[mode][str(count)].append(asyncio.run(measure_saturated(stacks[mode], pcms)))
                print(f"throughput: batching round {r + 1}, {count} sessions done")
    return {str(c): _compare(runs["off"][str(c)], runs["on"][str(c)]) for c in counts}


def _compare(off: list[dict[str, Any]], on: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over rounds per mode; the on / off ratio of audio seconds per wall second."""
    from bench.report import median

    def summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "all_done": all(x["all_done"] for x in samples),
            "audio_s": samples[0]["audio_s"],
            "audio_s_per_wall_s": median([x["audio_s_per_wall_s"] for x in samples]),
            "rtf_per_stream_p50": median([x["rtf_per_stream"]["p50"] for x in samples]),
            "rtf_per_stream_max": max(x["rtf_per_stream"]["max"] or 0.0 for x in samples),
            "cpu_rtf": median([x["cpu_rtf"] for x in samples]),
            "rounds": [{k: v for k, v in x.items() if k != "events"} for x in samples],
        }

    same = all(a["events"] == b["events"] for a, b in zip(off, on, strict=True))
    same = same and all(x["events"] == off[0]["events"] for x in [*off, *on])
    result = {"off": summary(off), "on": summary(on), "events_identical": same}
    result["speedup"] = result["on"]["audio_s_per_wall_s"] / result["off"]["audio_s_per_wall_s"]
    return result


def batching_headline(batching: dict[str, Any]) -> str:
    levels = ", ".join(
        f"{n}: {r['off']['audio_s_per_wall_s']:.1f} -> {r['on']['audio_s_per_wall_s']:.1f} "
        f"({r['speedup']:.2f}x; RTF per stream {r['off']['rtf_per_stream_p50']:.2f} -> "
        f"{r['on']['rtf_per_stream_p50']:.2f})"
        for n, r in batching.items()
    )
    same = all(r["events_identical"] for r in batching.values())
    return (
        f"batching, audio-s per wall-s by concurrent sessions (off -> on): {levels}; events identical: {same}"
    )


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
    batching_counts = QUICK_BATCHING_COUNTS if quick else BATCHING_COUNTS
    batching = run_batching(model.directory, spoken, batching_counts, QUICK_ROUNDS if quick else ROUNDS)
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
                    "batching_counts": list(batching_counts),
                    "batching_rounds": QUICK_ROUNDS if quick else ROUNDS,
                    "batching_default": Settings.model_fields["batching"].default,
                },
                "load_before": load_before,
                "load_after": load(),
                "cores": cores,
                "workers": runs,
                "best_sessions": best,
                "most_sessions_lag_bounded": bounded,
                "streams_per_core": top / cores,
                "batching": batching,
                "headline": f"{top / cores:g} concurrent real-time streams per CPU core "
                f"({top} on {cores} cores; "
                f"1 worker: {best['1']}, 2 workers: {best['2']}) with {metric} under 1 s; "
                f"lag stays bounded (< {LAG_BOUND_S:g} s) up to {bounded['1']} / {bounded['2']} sessions; "
                + batching_headline(batching),
            }
        ),
    )
    return 0
