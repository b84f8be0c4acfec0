"""What the end-to-end benchmarks feed and how they score it: synthesized utterances with word timings
(the committed evaluation sentences), word-appearance matching against partial transcripts, WER, and
the machine's load and per-process CPU / memory read from /proc."""

from __future__ import annotations

import difflib
import io
import os
import random
import re
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.report import REPO
from export.metrics import edit_distance

SENTENCES = REPO / "export" / "eval_sentences.txt"
SAMPLE_RATE = 16000
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Utterance:
    text: str
    pcm: np.ndarray  # int16 at 16 kHz: the speech, then `silence_s` of digital silence
    words: list[tuple[str, float, float]]  # (word, start s, end s) from the synthesizer
    voice: str

    @property
    def speech_end(self) -> float:
        return self.words[-1][2] if self.words else 0.0

    @property
    def seconds(self) -> float:
        return len(self.pcm) / SAMPLE_RATE

    def wav(self) -> bytes:
        return wav_bytes(self.pcm)


def sentences(n: int, offset: int = 0) -> list[str]:
    """The first n committed evaluation sentences (text column), from `offset`, wrapping around."""
    texts = [line.split("\t")[0].strip() for line in SENTENCES.read_text().splitlines() if line.strip()]
    return [texts[(offset + i) % len(texts)] for i in range(n)]


def utterances(n: int, seed: int = 0, held_out: bool = False, silence_s: float = 0.0) -> list[Utterance]:
    """n evaluation sentences spoken by voices drawn from a fixed seed (the held-out family if asked)."""
    from export import speech

    out = []
    for i, text in enumerate(sentences(n)):
        rng = random.Random(f"bench-{seed}-{i}")
        spoken = None
        for _ in range(10):  # a voice that cannot say the sentence is redrawn (bounded)
            try:
                spoken = speech.synthesize(text, speech.sample_voice(rng, held_out=held_out))
                break
            except ValueError:
                continue
        assert spoken is not None, f"no voice could say {text!r}"
        pcm = np.clip(np.round(spoken.audio * 32767), -32768, 32767).astype(np.int16)
        pcm = np.concatenate([pcm, np.zeros(int(silence_s * SAMPLE_RATE), np.int16)])
        words = [(w.text, w.start, w.end) for w in spoken.words]
        out.append(Utterance(text, pcm, words, spoken.voice.label))
    return out


def wav_bytes(pcm: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    return buffer.getvalue()


# -- scoring ------------------------------------------------------------------------------------------


def normalize(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def matched_words(reference: list[str], text: str) -> set[int]:
    """Indices of reference words that an in-order alignment (difflib) finds in text."""
    matcher = difflib.SequenceMatcher(a=reference, b=normalize(text), autojunk=False)
    return {block.a + k for block in matcher.get_matching_blocks() for k in range(block.size)}


def reference_tokens(words: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The synthesizer's words as normalized tokens, each with its word's (start, end) in seconds."""
    return [(token, start, end) for word, start, end in words for token in normalize(word)]


def word_appearances(
    reference: list[tuple[str, float, float]], partials: list[tuple[float, float, str]]
) -> dict[int, float]:
    """Reference token index -> wall time of the first partial (arrival, audio time s, text) whose
    alignment holds it. A partial only counts for words that had begun by its audio time: the weak
    model's stock phrases ("lights", "thermostat") must not count as hearing a word not yet spoken."""
    tokens = [token for token, _, _ in reference]
    first: dict[int, float] = {}
    for at, audio_s, text in partials:
        for i in matched_words(tokens, text):
            if reference[i][1] <= audio_s:
                first.setdefault(i, at)
    return first


def wer(references: list[str], hypotheses: list[str]) -> float:
    errors = sum(
        edit_distance(normalize(r), normalize(h)) for r, h in zip(references, hypotheses, strict=True)
    )
    return errors / max(1, sum(len(normalize(r)) for r in references))


# -- the machine ----------------------------------------------------------------------------------------


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its reaped children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def versions() -> dict[str, str]:
    from bench.report import _version

    return {name: _version(name) for name in ("torch", "onnx", "tokenizers", "pocketsphinx", "av")}


def finite(value: object) -> object:
    """value with every NaN / inf float replaced by None, so the JSON written is strict JSON."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def stats(values: list[float]) -> dict[str, object]:
    from bench.report import median, percentile

    return finite({"n": len(values), "p50": median(values), "p95": percentile(values, 95),
                   "max": max(values) if values else None})  # fmt: skip
