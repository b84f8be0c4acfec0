"""Synthesized speech with word timings: the voices we train on, the voice we hold out, and synthesis.

Two engines, both through their C libraries (ctypes), both giving word timings from the synthesizer
itself rather than from an aligner:
- espeak-ng: the synth callback's WORD events carry the word's character position and its sample
  offset. espeak merges some function words into one event ("of the"); those words share the event's
  span, split in proportion to their characters. A word ends where the next begins, less trailing
  silence.
- flite: the utterance's Word relation; a word starts at the end of the segment before its first
  segment and ends at the end of its last segment (flite's own segment durations).
Output is always 16 kHz mono float32 in [-1, 1]. Knows nothing about text sources or augmentation.
"""

import ctypes
import functools
import random
from dataclasses import dataclass

import av
import numpy as np

SAMPLE_RATE = 16000

ESPEAK_LANGUAGES = ["en-us", "en", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd"]
ESPEAK_LANGUAGES += ["en-029", "en-us-nyc"]
FLITE_VOICES = ["kal", "kal16", "awb", "rms", "slt"]
# Held out of training entirely, for a separate report: flite's CMU SLT voice (statistical parametric,
# the only female flite voice and the most natural one we have; a different engine from espeak).
HELD_OUT_VOICES = ["slt"]
FLITE_SHARE = 0.3  # fraction of training utterances spoken by flite
# flite voices whose pitch follows int_f0_target_mean (rms ignores it). Half their utterances get a target
# F0 in the range of women's and children's voices: slt, held out, is the only female voice we have.
FLITE_PITCHED = ["kal", "kal16", "awb"]
FLITE_PITCH_SHARE = 0.5
FLITE_PITCH_HZ = (140, 270)

_SILENCE_DB = -40.0  # below this (relative to the utterance peak) a 10 ms frame counts as silence


@dataclass(frozen=True)
class Voice:
    engine: str  # "espeak" or "flite"
    name: str  # espeak: "en-gb+m3"; flite: "awb"
    rate: float  # espeak: words per minute; flite: duration stretch (>1 is slower)
    pitch: int  # espeak: 0-100 base pitch; flite: target mean F0 in Hz (0: the voice's own)

    @property
    def label(self) -> str:
        return f"{self.engine}:{self.name}:{self.rate:g}:{self.pitch}"


@dataclass(frozen=True)
class Word:
    text: str
    start: float  # seconds
    end: float  # seconds


@dataclass
class Speech:
    audio: np.ndarray  # (T,) float32 at SAMPLE_RATE
    words: list[Word]
    voice: Voice


# ---- voices ----------------------------------------------------------------------------------------


@functools.cache
def espeak_variants() -> list[str]:
    """espeak-ng's voice variants ("m3", "f2", "klatt", ...), from its data directory."""
    from pathlib import Path

    for root in ("/usr/lib/x86_64-linux-gnu/espeak-ng-data", "/usr/share/espeak-ng-data"):
        path = Path(root) / "voices" / "!v"
        if path.is_dir():
            return sorted(p.name for p in path.iterdir() if p.is_file())
    return ["m1", "m3", "f1", "f3"]


def sample_voice(rng: random.Random, held_out: bool = False) -> Voice:
    if held_out:
        return Voice("flite", rng.choice(HELD_OUT_VOICES), round(rng.uniform(0.85, 1.2), 2), 0)
    if rng.random() < FLITE_SHARE:
        name = rng.choice([v for v in FLITE_VOICES if v not in HELD_OUT_VOICES])
        rate = round(rng.uniform(0.8, 1.3), 2)
        pitched = name in FLITE_PITCHED and rng.random() < FLITE_PITCH_SHARE
        return Voice("flite", name, rate, rng.randint(*FLITE_PITCH_HZ) if pitched else 0)
    name = f"{rng.choice(ESPEAK_LANGUAGES)}+{rng.choice(espeak_variants())}"
    return Voice("espeak", name, rng.randint(120, 250), rng.randint(15, 85))


# ---- shared audio helpers --------------------------------------------------------------------------


def resample(audio: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
    """int16 or float32 mono -> float32 at rate_out, with libswresample (via PyAV)."""
    if rate_in == rate_out:
        return audio.astype(np.float32) / (32768.0 if audio.dtype == np.int16 else 1.0)
    pcm = audio if audio.dtype == np.int16 else np.clip(audio * 32767, -32768, 32767).astype(np.int16)
    frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
    frame.sample_rate = rate_in
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate_out)
    out = [f.to_ndarray()[0] for f in resampler.resample(frame)]
    out += [f.to_ndarray()[0] for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def speech_end(audio: np.ndarray, start: int, stop: int) -> int:
    """The last sample in [start, stop) before trailing silence (10 ms frames, peak-relative)."""
    hop = SAMPLE_RATE // 100
    seg = audio[start:stop]
    if len(seg) < hop:
        return stop
    frames = seg[: len(seg) // hop * hop].reshape(-1, hop)
    level = 20 * np.log10(np.sqrt((frames**2).mean(1)) + 1e-9)
    loud = np.nonzero(level > 20 * np.log10(np.abs(audio).max() + 1e-9) + _SILENCE_DB)[0]
    return start + (int(loud[-1]) + 1) * hop if len(loud) else start + hop


def _word_spans(text: str) -> list[tuple[str, int]]:
    """(word, character offset) for each space-separated word."""
    spans, pos = [], 0
    for word in text.split(" "):
        spans.append((word, pos))
        pos += len(word) + 1
    return spans


# ---- espeak-ng ---------------------------------------------------------------------------------------


class _EspeakEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character position
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms
        ("sample", ctypes.c_int),  # sample offset at the engine's rate
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_EVENT_WORD, _EVENT_LIST_TERMINATED = 1, 0
_AUDIO_OUTPUT_SYNCHRONOUS, _INITIALIZE_DONT_EXIT, _CHARS_UTF8, _POS_CHARACTER = 2, 0x8000, 1, 1
_PARAM_RATE, _PARAM_PITCH = 1, 3
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent)
)


class Espeak:
    """One process-wide espeak-ng engine in synchronous mode (the library has global state)."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libespeak-ng.so.1")
        self.rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INITIALIZE_DONT_EXIT)
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int]] = []  # (0-based char position, sample)
        self._callback = _CALLBACK(self._on_audio)  # keep a reference: ctypes does not
        self.lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            if events[i].type == _EVENT_WORD:
                self._events.append((events[i].text_position - 1, events[i].sample))
            i += 1
        return 0

    def synthesize(self, text: str, voice: Voice) -> Speech:
        if self.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice.name!r}")
        self.lib.espeak_SetParameter(_PARAM_RATE, int(voice.rate), 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, voice.pitch, 0)
        self._chunks, self._events = [], []
        data = text.encode()
        self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        self.lib.espeak_Synchronize()
        raw = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        audio = resample(raw, self.rate)
        scale = SAMPLE_RATE / self.rate
        starts = [(pos, int(sample * scale)) for pos, sample in self._events]
        return Speech(audio, espeak_word_timings(text, starts, audio), voice)


def espeak_word_timings(text: str, events: list[tuple[int, int]], audio: np.ndarray) -> list[Word]:
    """Word timings from espeak WORD events (char position, sample at 16 kHz).

    Each event opens a group of words (those from its character position up to the next event's);
    a group's span is split among its words by character count; a group ends where the next group
    begins, less trailing silence.
    """
    spans = _word_spans(text)
    firsts = sorted({_word_at(spans, pos) for pos, _ in events} | {0})
    onset = {_word_at(spans, pos): sample for pos, sample in reversed(events)}
    onset.setdefault(0, 0)
    words = []
    for g, first in enumerate(firsts):
        last = firsts[g + 1] if g + 1 < len(firsts) else len(spans)
        start = onset[first]
        stop = onset[firsts[g + 1]] if g + 1 < len(firsts) else len(audio)
        end = max(speech_end(audio, start, stop), start + 1)
        words += _split_span(spans[first:last], start, end)
    return words


def _word_at(spans: list[tuple[str, int]], pos: int) -> int:
    """Index of the word containing (or next after) character position pos."""
    for i, (word, offset) in enumerate(spans):
        if pos < offset + len(word):
            return i
    return len(spans) - 1


def _split_span(group: list[tuple[str, int]], start: int, end: int) -> list[Word]:
    total = sum(len(w) for w, _ in group)
    words, t = [], start
    for word, _ in group:
        t_end = t + (end - start) * len(word) / total
        words.append(Word(word, t / SAMPLE_RATE, t_end / SAMPLE_RATE))
        t = t_end
    return words


# ---- flite -------------------------------------------------------------------------------------------


class _FliteWave(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_char_p),
        ("sample_rate", ctypes.c_int),
        ("num_samples", ctypes.c_int),
        ("num_channels", ctypes.c_int),
        ("samples", ctypes.POINTER(ctypes.c_short)),
    ]


_FLITE_SIGNATURES = {
    "flite_synth_text": (ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_void_p]),
    "utt_wave": (ctypes.POINTER(_FliteWave), [ctypes.c_void_p]),
    "utt_relation": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
    "relation_head": (ctypes.c_void_p, [ctypes.c_void_p]),
    "item_next": (ctypes.c_void_p, [ctypes.c_void_p]),
    "item_feat_string": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_char_p]),
    "ffeature_float": (ctypes.c_float, [ctypes.c_void_p, ctypes.c_char_p]),
    "delete_utterance": (None, [ctypes.c_void_p]),
    "feat_set_float": (None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_float]),
    "feat_remove": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]),
}
_WORD_START = b"R:SylStructure.daughter1.daughter1.R:Segment.p.end"
_WORD_END = b"R:SylStructure.daughtern.daughtern.R:Segment.end"


class Flite:
    """flite with its CMU US voices loaded on first use."""

    def __init__(self) -> None:
        load = functools.partial(ctypes.CDLL, mode=ctypes.RTLD_GLOBAL)
        self.lib = load("libflite.so.1")
        load("libflite_usenglish.so.1")
        load("libflite_cmulex.so.1")
        for name, (restype, argtypes) in _FLITE_SIGNATURES.items():
            getattr(self.lib, name).restype = restype
            getattr(self.lib, name).argtypes = argtypes
        self.lib.flite_init()
        self._voices: dict[str, int] = {}

    def _voice(self, name: str) -> int:
        if name not in self._voices:
            register = getattr(
                ctypes.CDLL(f"libflite_cmu_us_{name}.so.1", mode=ctypes.RTLD_GLOBAL),
                f"register_cmu_us_{name}",
            )
            register.restype, register.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
            self._voices[name] = register(None)
        return self._voices[name]

    def synthesize(self, text: str, voice: Voice) -> Speech:
        vox = self._voice(voice.name)
        features = ctypes.cast(vox, ctypes.POINTER(ctypes.c_void_p))[1]  # cst_voice.features
        self.lib.feat_set_float(features, b"duration_stretch", voice.rate)
        if voice.pitch:
            self.lib.feat_set_float(features, b"int_f0_target_mean", float(voice.pitch))
        else:  # the voice's own intonation model decides
            self.lib.feat_remove(features, b"int_f0_target_mean")
        utt = self.lib.flite_synth_text(text.encode(), vox)
        try:
            wave = self.lib.utt_wave(utt).contents
            raw = np.ctypeslib.as_array(wave.samples, (wave.num_samples,)).copy()
            audio = resample(raw, wave.sample_rate)
            words = self._words(utt)
        finally:
            self.lib.delete_utterance(utt)
        return Speech(audio, _match_words(text, words, len(audio) / SAMPLE_RATE), voice)

    def _words(self, utt: int) -> list[Word]:
        item = self.lib.relation_head(self.lib.utt_relation(utt, b"Word"))
        words = []
        while item:
            name = self.lib.item_feat_string(item, b"name").decode()
            start, end = self.lib.ffeature_float(item, _WORD_START), self.lib.ffeature_float(item, _WORD_END)
            words.append(Word(name, float(start), float(end)))
            item = self.lib.item_next(item)
        return words


def _match_words(text: str, words: list[Word], duration: float) -> list[Word]:
    """Map flite's tokens onto our words by their letters.

    flite splits contractions ("what's" -> "what", "'s") and spells unknown acronyms letter by letter,
    so one of our words may be several of its tokens; their span is the union.
    """
    out, i = [], 0
    for word in text.split():
        target, letters, first = _letters(word), "", i
        while i < len(words) and len(letters) < len(target):
            letters += _letters(words[i].text)
            i += 1
        if letters != target:
            raise ValueError(f"flite tokens do not spell {word!r} in {text!r}")
        out.append(Word(word, min(words[first].start, duration), min(words[i - 1].end, duration)))
    if i != len(words):
        raise ValueError(f"flite has extra tokens for {text!r}")
    return out


def _letters(word: str) -> str:
    return "".join(c for c in word.lower() if c.isalpha())


# ---- one entry point ----------------------------------------------------------------------------------


@functools.cache
def _engine(name: str):
    return Espeak() if name == "espeak" else Flite()


def synthesize(text: str, voice: Voice) -> Speech:
    """Speak text (lower-case words separated by single spaces) in voice, with word timings."""
    return _engine(voice.engine).synthesize(text, voice)
