"""`mtp`: speculative decoding with the MTP drafter against plain greedy, through the worker's own code
(worker/runtime.py's ONNX Runtime target and drafter, worker/decoding.py's `generate`).

Per evaluation utterance: the transcript (forced audio suffix, then greedy; for a model trained in the
interleaved format, every chunk's words as the worker's session writes them) and the response after it,
each decoded with no drafter, with the drafter at its full k ("fixed"), with the worker's
`AdaptiveDrafter` verifying every draft it asks for ("ungated") and as served, its drafts stopping at
the first below Settings.mtp_confidence ("adaptive"); best of REPEATS timings. Reports tokens/s,
acceptance (accepted / drafted), mean accepted length (tokens per decoder call) and whether every
output matched token for token. With no trained assistant checkpoint yet, a seeded random assistant
stands in: it measures what drafting costs when almost nothing is accepted, not what a trained drafter
gains.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.models import bench_model, random_assistant_for_default, trained_assistant
from bench.report import median, write_result
from bench.workload import finite, load, utterances, versions
from export.evaluate import decode
from rawwave.settings import Settings
from worker.decoding import AdaptiveDrafter, Context, DecodeStats, generate, prefill
from worker.runtime import Runtime
from worker.session import Prompt, StreamingOptions

REPEATS = 3
MAX_TOKENS = 128
MODES = ("off", "fixed", "ungated", "adaptive")


def audio_context(runtime: Runtime, prompt: Prompt, pcm: np.ndarray) -> Context:
    frame = runtime.config.frame_samples
    pcm = np.concatenate([pcm, np.zeros(-len(pcm) % frame, np.int16)])
    start = runtime.start(prompt.prefix)
    embeds = runtime.embed_audio(pcm)  # (N, H)
    _, _, cache = runtime.extend_embeds(start.cache, start.length, embeds, keep=1)
    return Context(cache, start.length + len(embeds), start.logits, start.hidden)


def drafter_for(runtime: Runtime, mode: str, part: str | None = None) -> Any:
    """off: none; fixed: all k drafts every round; ungated: the worker's policy verifying every draft it
    asks for; adaptive: the worker's policy as served (drafts stop below Settings.mtp_confidence)."""
    if mode == "off" or runtime.drafter is None:
        return None
    if mode == "fixed":
        return runtime.drafter
    confidence = Settings().mtp_confidence if mode == "adaptive" else 0.0
    return AdaptiveDrafter(runtime.drafter, part=part, confidence=confidence)


def decode_both(runtime: Runtime, prompt: Prompt, ctx: Context, mode: str) -> dict[str, Any]:
    """Transcript then response, as the session decodes a final with respond=True."""
    budget = len(prompt.suffix) + MAX_TOKENS
    transcript = generate(
        runtime, ctx, prompt.transcript_stop, budget, drafter_for(runtime, mode, "transcript"), prompt.suffix
    )
    text = transcript.tokens[len(prompt.suffix) :]
    end = prompt.transcript_end
    after = transcript.ctx if text[-len(end) :] == end else prefill(runtime, transcript.ctx, end)
    response = generate(
        runtime, after, prompt.response_stop, MAX_TOKENS, drafter_for(runtime, mode, "response")
    )
    return {"transcript": transcript, "response": response}


@dataclass
class Part:
    """What a streamed session wrote for one part (transcript or response) and what it cost."""

    tokens: list[str]
    stats: DecodeStats


def decode_streamed(runtime: Runtime, pcm: np.ndarray, mode: str) -> dict[str, Any]:
    """A respond session of the worker's (interleaved: each chunk's words, then the response), whole
    audio in, with this mode's drafter; the decoding rounds of each part and their cost."""
    options = StreamingOptions.of(runtime.config, Settings(mtp=False))
    drafters = drafter_for(runtime, mode, "transcript"), drafter_for(runtime, mode, "response")
    out = decode(runtime, options, pcm.tobytes(), True, drafters=drafters)
    return {
        "transcript": Part(out.finals, out.transcript_stats),
        "response": Part(out.responses, out.response_stats),
    }


def measure(runtime: Runtime, prompt: Prompt, pcm: np.ndarray) -> dict[str, Any]:
    interleaved = runtime.config.streaming.format == "interleaved"
    ctx = None if interleaved else audio_context(runtime, prompt, pcm)
    out: dict[str, Any] = {}
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for _ in range(REPEATS):  # modes interleaved, so a burst of load on the machine hits them alike
        for mode in MODES:
            if ctx is None:
                runs[mode].append(decode_streamed(runtime, pcm, mode))
            else:
                runs[mode].append(decode_both(runtime, prompt, ctx, mode))
    for mode in MODES:
        for part in ("transcript", "response"):
            best = min(runs[mode], key=lambda r, p=part: r[p].stats.seconds)[part]
            s = best.stats
            out.setdefault(part, {})[mode] = {
                "tokens": best.tokens,
                "n": s.tokens,
                "seconds": s.seconds,
                "tokens_per_s": s.tokens_per_s,
                "calls": s.calls,
                "drafted": s.drafted,
                "accepted": s.accepted,
                "tokens_per_call": s.tokens_per_call,
            }
    return out


def main(quick: bool = False) -> int:
    trained = trained_assistant()
    assistant = None if quick else (trained or random_assistant_for_default())
    model = bench_model(quick, assistant=assistant)
    runtime = Runtime(model.directory, Settings(ort_intra_threads=1, ort_inter_threads=1))
    assert runtime.drafter is not None
    prompt = Prompt.of(runtime, respond=True)
    spoken = utterances(2 if quick else 30, seed=2)
    load_before, started = load(), time.monotonic()
    samples = [{"text": u.text, **measure(runtime, prompt, u.pcm)} for u in spoken]
    elapsed = time.monotonic() - started
    summary = {part: summarize(samples, part) for part in ("transcript", "response")}
    for sample in samples:  # keep the raw samples small: token lists only where they differ
        for part in ("transcript", "response"):
            off = sample[part]["off"]["tokens"]
            for mode in MODES:
                row = sample[part][mode]
                row["identical"] = row.pop("tokens") == off
            sample[part]["off"]["n_tokens"] = len(off)
    identical = all(s[p][m]["identical"] for s in samples for p in ("transcript", "response") for m in MODES)
    adaptive = [p["adaptive"] for p in summary.values()]
    speedup = median([x for p in summary.values() for x in p["adaptive"]["speedups"]])
    drafter = (
        "trained" if (trained and not quick) else ("tiny random (smoke run)" if quick else "untrained random")
    )
    acceptance = _ratio(sum(a["accepted"] for a in adaptive), sum(a["drafted"] for a in adaptive))
    write_result(
        "mtp",
        finite(
            {
                "quick": quick,
                "versions": versions(),
                "model": model.describe(),
                "drafter": drafter,
                "note": None
                if trained
                else "no trained assistant checkpoint exists yet (checkpoints/default-assistant "
                "absent): a seeded random assistant stands in, so acceptance is near 0 and the speedup "
                "shows the "
                "cost of drafting, not the gain of a trained drafter",
                "settings": {
                    "repeats": REPEATS,
                    "max_tokens": MAX_TOKENS,
                    "utterances": len(spoken),
                    "num_draft_tokens": runtime.drafter.num_draft_tokens,
                    "ort_intra_threads": 1,
                    "speedup_mode": "adaptive (as the worker drafts)",
                    "mtp_confidence": Settings().mtp_confidence,
                },
                "load_before": load_before,
                "load_after": load(),
                "seconds": round(elapsed, 1),
                "speedup": speedup,
                "acceptance": acceptance,
                "mean_accepted_length": _ratio(
                    sum(a["tokens"] for a in adaptive), sum(a["calls"] for a in adaptive)
                ),
                "identical": identical,
                "summary": summary,
                "samples": samples,
                "headline": f"{drafter} drafter: {speedup:.2f}x tokens/s with MTP (adaptive, median), "
                "acceptance "
                f"{acceptance:.0%}, output identical: {identical}",
            }
        ),
    )
    return 0


def summarize(samples: list[dict[str, Any]], part: str) -> dict[str, Any]:
    out = {}
    for mode in MODES:
        rows = [s[part][mode] for s in samples]
        tokens, seconds = sum(r["n"] for r in rows), sum(r["seconds"] for r in rows)
        calls = sum(r["calls"] for r in rows)
        out[mode] = {
            "tokens": tokens,
            "calls": calls,
            "tokens_per_s": _ratio(tokens, seconds),
            "tokens_per_call": _ratio(tokens, calls),
            "drafted": sum(r["drafted"] for r in rows),
            "accepted": sum(r["accepted"] for r in rows),
            "speedups": [
                _ratio(r["tokens_per_s"], s[part]["off"]["tokens_per_s"])
                for r, s in zip(rows, samples, strict=True)
                if r["n"] and s[part]["off"]["n"]
            ],
        }
        out[mode]["acceptance"] = _ratio(out[mode]["accepted"], out[mode]["drafted"])
        out[mode]["median_speedup"] = median(out[mode]["speedups"])
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0
