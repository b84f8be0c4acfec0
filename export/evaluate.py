"""`rawwave eval MODEL_DIR`: held-out evaluation of an exported model directory, decoded exactly as served
(ONNX Runtime via worker.runtime, one worker session per utterance: worker.interleaved.open_session).

Reports, for the first --limit utterances of "eval-seen" (training voices) and "eval-heldout" (the
held-out voice family):
  asr      WER / CER per voice family, clean, with noise (NOISE_SNR_DB, seeded) and through Opus;
           asr_by_kind the same per utterance kind (sentences, templates, random words, skills)
  skills   response exact-match per skill on eval-seen, clean, with its 95% interval, the utterances asked
           (for `rawwave compare`) and each miss (what was said, heard and answered) to tell a misheard
           number from a wrong sum
  mtp      drafter acceptance and tokens per decoder call (transcripts, responses), and whether
           decoding with MTP gives the same output as decoding without it
  delay    word emission delay streaming CHUNK_MS chunks: the audio time at which a reference word first
           shows in a partial, minus the word's end time
Given a checkpoint (HF layout) instead of a model directory, exports it (and its drafter) into
EXPORT_CACHE first. Deterministic: the same model and corpus give the same report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from export.augment import add_noise, opus_round_trip
from export.dataset import Corpus, stamped
from export.metrics import char_error_rate, wilson_interval, word_error_rate, words_of
from rawwave.contract import (
    SAMPLE_RATE,
    SAMPLE_WIDTH,
    FinalEvent,
    PartialEvent,
    ResponseDeltaEvent,
    ResponseDoneEvent,
)
from rawwave.errors import RawwaveError
from rawwave.model_dir import RUNTIME_CONFIG_FILE
from rawwave.settings import Settings, load_settings
from worker.decoding import DecodeStats
from worker.interleaved import open_session
from worker.runtime import Runtime
from worker.session import StreamingOptions, StreamingSession

SPLITS = ("eval-seen", "eval-heldout")
CONDITIONS = ("clean", "noise", "opus")
NOISE_SNR_DB = 10.0
NOISE_COLOR = "pink"
OPUS_BITRATE = 16_000  # bits/s, a typical WebRTC voice rate
SEED = 0  # the noise of utterance i is drawn from default_rng([SEED, i])
CHUNK_MS = 200
CHUNK_BYTES = CHUNK_MS * SAMPLE_RATE // 1000 * SAMPLE_WIDTH  # 6400 bytes per 200 ms chunk
SKILLS = {"arithmetic": "arithmetic", "home": "home", "sentence": "fallback", "template": "fallback"}
SKILLS["words"] = "fallback"  # every utterance kind of export/corpus.py -> the skill that answers it
EXPORT_CACHE = Path("runs/eval/models")


# ---- metrics ------------------------------------------------------------------------------------------


def matched_words(ref: Sequence[str], hyp: Sequence[str]) -> set[int]:
    """Indices of the reference words that a minimum-edit alignment pairs with an equal hypothesis word."""
    cost = np.zeros((len(ref) + 1, len(hyp) + 1), np.int32)  # (R+1, H+1) edit distance of prefixes
    cost[:, 0], cost[0, :] = np.arange(len(ref) + 1), np.arange(len(hyp) + 1)
    for i in range(1, len(ref) + 1):
        for j in range(1, len(hyp) + 1):
            same = ref[i - 1] == hyp[j - 1]
            cost[i, j] = min(cost[i - 1, j] + 1, cost[i, j - 1] + 1, cost[i - 1, j - 1] + (not same))
    hits, i, j = set(), len(ref), len(hyp)
    while i and j:  # walk back, preferring the diagonal
        if cost[i, j] == cost[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]):
            if ref[i - 1] == hyp[j - 1]:
                hits.add(i - 1)
            i, j = i - 1, j - 1
        elif cost[i, j] == cost[i - 1, j] + 1:
            i -= 1
        else:
            j -= 1
    return hits


def percentile(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


# ---- audio ----------------------------------------------------------------------------------------------


def voice_family(label: str) -> str:
    """A record's voice ("espeak:en-us+m3:180:50", "flite:awb:1.1:0") -> its family: every espeak
    variant is one family (one engine, one formant synthesizer); each flite voice is its own."""
    engine, name = label.split(":")[:2]
    return engine if engine == "espeak" else f"{engine}:{name}"


def degrade(audio: np.ndarray, condition: str, index: int) -> np.ndarray:
    """Utterance `index`'s float audio under a condition; the noise is seeded by the index."""
    if condition == "noise":
        return add_noise(audio, NOISE_SNR_DB, NOISE_COLOR, np.random.default_rng([SEED, index]))
    if condition == "opus":
        return opus_round_trip(audio, OPUS_BITRATE)
    return audio


def pcm_bytes(audio: np.ndarray) -> bytes:
    """float audio in [-1, 1) -> s16le, what a session is fed."""
    return np.clip(np.round(audio * 32768), -32768, 32767).astype("<i2").tobytes()


# ---- decoding, as the worker serves it --------------------------------------------------------------


@dataclass
class Decoded:
    """What one session said about one utterance, and what its decoding cost."""

    finals: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    partials: list[tuple[float, str]] = field(default_factory=list)  # (seconds of audio fed, text)
    transcript_stats: DecodeStats = field(default_factory=DecodeStats)
    response_stats: DecodeStats = field(default_factory=DecodeStats)

    @property
    def transcript(self) -> str:
        return " ".join(self.finals)

    @property
    def response(self) -> str:
        return "\n".join(self.responses)


def stats_since(now: DecodeStats, before: DecodeStats) -> DecodeStats:
    return DecodeStats(**{f.name: getattr(now, f.name) - getattr(before, f.name) for f in fields(now)})


def decode(
    runtime: Runtime,
    options: StreamingOptions,
    pcm: bytes,
    respond: bool,
    chunk: int | None = None,
    drafters: tuple[Any, Any] | None = None,
) -> Decoded:
    """One fresh session: the audio fed in `chunk`-byte pieces (None: all at once), then end.
    drafters: the session's (transcript, response) drafters instead of the ones options ask for."""
    session, out = open_session(runtime, options, "eval", respond), Decoded()
    if drafters is not None:
        session.drafter, session.response_drafter = drafters
    step = chunk or len(pcm) or 1
    for start in range(0, len(pcm), step):
        session.feed(pcm[start : start + step])
        drain(session, out, min(len(pcm), start + step) / (SAMPLE_RATE * SAMPLE_WIDTH))
    session.end()
    drain(session, out, len(pcm) / (SAMPLE_RATE * SAMPLE_WIDTH))
    return out


def drain(session: StreamingSession, out: Decoded, heard_s: float) -> None:
    """Step until the session needs audio; each step's decoding cost goes to transcript or response."""
    while True:
        before = replace(session.stats)
        events = session.step()
        response = any(isinstance(e, (ResponseDeltaEvent, ResponseDoneEvent)) for e in events)
        (out.response_stats if response else out.transcript_stats).add(stats_since(session.stats, before))
        if not events:
            return
        for event in events:
            if isinstance(event, PartialEvent):
                out.partials.append((heard_s, event.text))
            elif isinstance(event, FinalEvent):
                out.finals.append(event.text)
            elif isinstance(event, ResponseDoneEvent):
                out.responses.append(event.text)


# ---- the four reports -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    index: int
    audio: np.ndarray  # float32, 16 kHz
    record: dict

    @property
    def family(self) -> str:
        return voice_family(self.record["voice"])


def samples(data: Path, split: str, limit: int) -> list[Sample]:
    corpus = Corpus(data, split)
    if not len(corpus):
        raise RawwaveError(f"{data}: no {split} shards (rawwave data --out {data})")
    return [Sample(i, *corpus[i]) for i in range(min(limit, len(corpus)))]


def error_rates(refs: Sequence[str], hyps: Sequence[str]) -> dict:
    n = len(refs)
    return {
        "utterances": n,
        "wer": round(word_error_rate(refs, hyps), 4),
        "cer": round(char_error_rate(refs, hyps), 4),
    }


def transcripts(runtime: Runtime, options: StreamingOptions, split: list[Sample], log=stamped) -> dict:
    """{condition: [transcript per utterance]} from transcribe-only sessions."""
    hyps = {}
    for condition in CONDITIONS:
        hyps[condition] = [
            decode(runtime, options, pcm_bytes(degrade(s.audio, condition, s.index)), False).transcript
            for s in split
        ]
        log(f"eval: {condition} done, e.g. {split[0].record['text']!r} -> {hyps[condition][0][:80]!r}")
    return hyps


def rates_by(group_of: Callable[[Sample], str], split: list[Sample], hyps: dict) -> dict:
    """{group | "all": {condition: {utterances, wer, cer}}}, utterances grouped by group_of."""
    groups = defaultdict(list)
    for k, s in enumerate(split):
        groups[group_of(s)].append(k)
    groups["all"] = list(range(len(split)))
    refs = [s.record["text"] for s in split]
    return {
        group: {c: error_rates([refs[k] for k in ks], [hyps[c][k] for k in ks]) for c in CONDITIONS}
        for group, ks in sorted(groups.items())
    }


def mtp_summary(stats: DecodeStats) -> dict:
    return {
        "drafted": stats.drafted,
        "acceptance": round(stats.acceptance, 4),
        "tokens_per_call": round(stats.tokens_per_call, 3),  # mean accepted length (1 + accepted drafts)
        "tokens": stats.tokens,
        "calls": stats.calls,
    }


def skills_and_mtp(runtime: Runtime, served: StreamingOptions, split: list[Sample]) -> tuple[dict, dict]:
    """Respond sessions on clean audio, with MTP (as served) and without: response exact-match per skill,
    drafter statistics, and whether both decodes agree."""
    plain = replace(served, mtp=False)
    items, misses = defaultdict(list), defaultdict(list)
    transcript_stats, response_stats, differ = DecodeStats(), DecodeStats(), []
    for s in split:
        pcm = pcm_bytes(s.audio)
        with_mtp, without = decode(runtime, served, pcm, True), decode(runtime, plain, pcm, True)
        skill = SKILLS.get(s.record["kind"], s.record["kind"])
        items[skill].append(s.index)
        if with_mtp.response != s.record["response"]:
            misses[skill].append(miss(s, with_mtp))
        transcript_stats.add(with_mtp.transcript_stats)
        response_stats.add(with_mtp.response_stats)
        if (with_mtp.finals, with_mtp.responses) != (without.finals, without.responses):
            differ.append(s.index)
    skills = {k: skill_summary(items[k], misses[k]) for k in sorted(items)}
    mtp = {
        "drafter": runtime.drafter is not None and served.mtp,
        "transcripts": mtp_summary(transcript_stats),
        "responses": mtp_summary(response_stats),
        "identical_to_no_mtp": not differ,
        "differing_utterances": differ,
    }
    return skills, mtp


def skill_summary(items: list[int], misses: list[dict]) -> dict:
    """Exact-match rate with its 95% interval; the utterances asked, so that two reports on the same
    corpus can be compared item by item (`rawwave compare`)."""
    n, right = len(items), len(items) - len(misses)
    low, high = wilson_interval(right, n)
    return {
        "utterances": n,
        "exact": round(right / n, 4),
        "interval": [round(low, 4), round(high, 4)],
        "items": items,
        "misses": misses,
    }


def miss(sample: Sample, decoded: Decoded) -> dict:
    return {
        "utterance": sample.index,
        "said": sample.record["text"],
        "heard": decoded.transcript,
        "expected": sample.record["response"],
        "answered": decoded.response,
    }


def word_delays(sample: Sample, decoded: Decoded) -> tuple[list[float], int]:
    """Per reference word that showed in a partial: first partial's audio time - the word's end time;
    and the number of reference words."""
    words = sample.record["words"]  # [[text, start_s, end_s], ...]
    ref, first = [w[0] for w in words], {}
    for heard_s, text in decoded.partials:
        for i in matched_words(ref, words_of(text)):
            first.setdefault(i, heard_s)
    return [round(first[i] - words[i][2], 4) for i in sorted(first)], len(words)


def delay_report(runtime: Runtime, served: StreamingOptions, split: list[Sample]) -> dict:
    """Transcribe sessions fed CHUNK_MS chunks of clean audio as they would arrive."""
    delays, total = [], 0
    for s in split:
        found, n = word_delays(s, decode(runtime, served, pcm_bytes(s.audio), False, CHUNK_BYTES))
        delays, total = delays + found, total + n
    return {
        "chunk_ms": CHUNK_MS,
        "words": total,
        "appeared": round(len(delays) / max(1, total), 4),
        "p50_s": percentile(delays, 50),
        "p95_s": percentile(delays, 95),
    }


def evaluate(model_dir: Path, data: Path, limit: int, settings: Settings, log=stamped) -> dict:
    runtime = Runtime(model_dir, settings)
    served = StreamingOptions.of(runtime.config, settings)
    splits = {split: samples(data, split, limit) for split in SPLITS}
    report: dict = {
        "model_dir": str(model_dir),
        "data": str(data),
        "limit": limit,
        "conditions": {"noise": f"{NOISE_COLOR} {NOISE_SNR_DB:g} dB SNR", "opus": f"{OPUS_BITRATE} bit/s"},
        "asr": {},
        "asr_by_kind": {},
    }
    for split, group in splits.items():
        log(f"eval: {split}, {len(group)} utterances x {len(CONDITIONS)} conditions")
        hyps = transcripts(runtime, served, group, log)
        report["asr"][split] = rates_by(lambda s: s.family, group, hyps)
        report["asr_by_kind"][split] = rates_by(lambda s: s.record["kind"], group, hyps)  # which text errs
    log("eval: skills and MTP (respond, with and without MTP)")
    report["skills"], report["mtp"] = skills_and_mtp(runtime, served, splits["eval-seen"])
    log(f"eval: emission delay ({CHUNK_MS} ms chunks)")
    report["delay"] = delay_report(runtime, served, splits["eval-seen"])
    return report


# ---- model directory, table, command line ----------------------------------------------------------


def model_directory(path: Path, log=stamped) -> Path:
    """An exported model directory as given; a checkpoint is exported (with its drafter) into the cache."""
    if (path / RUNTIME_CONFIG_FILE).is_file():
        return path
    if not (path / "config.json").is_file():
        raise RawwaveError(f"{path}: neither a model directory ({RUNTIME_CONFIG_FILE}) nor a checkpoint")
    from export.exporter import default_assistant, export_model  # torch: only when exporting

    out, assistant = EXPORT_CACHE / path.name, default_assistant(path)
    log(f"eval: exporting {path} (drafter {assistant}) to {out}")
    export_model(path, out, assistant)
    return out


def asr_row(split: str, group: str, by: dict) -> str:
    cells = "  ".join(f"{by[c]['wer']:>8.3f}/{by[c]['cer']:<8.3f}" for c in CONDITIONS)
    return f"{split:<13} {group:<15} {by['clean']['utterances']:>4}  {cells}"


def skill_row(skill: str, v: dict) -> str:
    low, high = v["interval"]
    return f"skill {skill:<10} n={v['utterances']:<4} exact {v['exact']:.3f}  95% {low:.2f}-{high:.2f}"


def table(report: dict) -> str:
    header = "  ".join(f"{c + ' WER/CER':>17}" for c in CONDITIONS)
    lines = [f"{'split':<13} {'family / kind':<15} {'n':>4}  {header}"]
    for split, families in report["asr"].items():
        lines += [asr_row(split, family, by) for family, by in families.items()]
    for split, kinds in report["asr_by_kind"].items():  # its "all" is the row above
        lines += [asr_row(split, f"kind {kind}", by) for kind, by in kinds.items() if kind != "all"]
    lines += [skill_row(k, v) for k, v in report["skills"].items()]
    mtp = report["mtp"]
    for part in ("transcripts", "responses"):
        m = mtp[part]
        lines.append(
            f"mtp {part:<12} acceptance {m['acceptance']:.3f}  tokens/call {m['tokens_per_call']:.2f}"
        )
    lines.append(f"mtp drafter={mtp['drafter']} identical to --no-mtp: {mtp['identical_to_no_mtp']}")
    d = report["delay"]
    lines.append(
        f"delay ({d['chunk_ms']} ms chunks) p50 {d['p50_s']} s  p95 {d['p95_s']} s  appeared {d['appeared']}"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="exported model directory (or a checkpoint to export)")
    parser.add_argument("--data", type=Path, default=Path("data/corpus"))
    parser.add_argument("--limit", type=int, default=100, help="utterances per split")
    parser.add_argument("--out", type=Path, default=None, help="report JSON (default runs/eval/NAME.json)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--no-mtp", action="store_true", help="serve without the drafter")


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    settings = (settings or load_settings()).model_copy(
        update={"ort_intra_threads": args.threads, "ort_inter_threads": 1, "mtp": not args.no_mtp}
    )
    model_dir = model_directory(args.model_dir)
    report = evaluate(model_dir, args.data, args.limit, settings)
    out = args.out or Path("runs/eval") / f"{args.model_dir.resolve().name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))  # noqa: T201
    stamped(f"eval: report written to {out}")
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m export.evaluate", description=__doc__.split("\n")[0])
    add_arguments(cli)
    sys.exit(run(cli.parse_args()))
