"""Synthesis with word timings (real espeak-ng and flite) and the augmentation that follows it."""

import numpy as np
import pytest

from export import augment, speech
from export.speech import Voice

TEXT = "what is seventeen plus twenty five and the time of the day"


def check_timings(s: speech.Speech, text: str) -> None:
    duration = len(s.audio) / speech.SAMPLE_RATE
    assert [w.text for w in s.words] == text.split()
    assert all(w.start < w.end for w in s.words)
    assert all(a.end <= b.start + 1e-6 for a, b in zip(s.words, s.words[1:], strict=False))
    assert s.words[-1].end <= duration + 1e-6
    assert 0.02 < np.sqrt(np.mean(s.audio**2)) < 0.5


@pytest.mark.parametrize("voice", [Voice("espeak", "en-us+m3", 175, 50), Voice("espeak", "en+f2", 230, 70)])
def test_espeak_word_timings(voice):
    s = speech.synthesize(TEXT, voice)
    check_timings(s, TEXT)
    assert 1.5 < len(s.audio) / speech.SAMPLE_RATE < 6


def test_espeak_merged_function_words_split_their_event():
    events = [(0, 0), (8, 8000)]  # one event for "of the", one for "day"
    audio = np.ones(16000, np.float32) * 0.1
    words = speech.espeak_word_timings("of the day", events, audio)
    assert [w.text for w in words] == ["of", "the", "day"]
    assert words[0].start == 0 and words[1].end == pytest.approx(0.5)


def test_flite_word_timings_and_contractions():
    text = "what's twenty five you'd think"
    s = speech.synthesize(text, Voice("flite", "kal16", 1.0, 0))
    check_timings(s, text)


def test_slower_voice_is_longer():
    fast = speech.synthesize(TEXT, Voice("espeak", "en-us", 240, 50))
    slow = speech.synthesize(TEXT, Voice("espeak", "en-us", 130, 50))
    assert len(slow.audio) > 1.4 * len(fast.audio)


def median_pitch(audio: np.ndarray, rate: int = 16_000) -> float:
    """Median autocorrelation F0 (60-400 Hz) over the voiced 40 ms frames."""
    pitches = []
    for start in range(0, len(audio) - 640, 320):
        x = audio[start : start + 640] - audio[start : start + 640].mean()
        r = np.correlate(x, x, "full")[639:]
        lag = rate // 400 + int(np.argmax(r[rate // 400 : rate // 60]))
        if np.sqrt((x**2).mean()) > 0.02 and r[lag] > 0.3 * r[0]:
            pitches.append(rate / lag)
    return float(np.median(pitches))


@pytest.mark.parametrize("name", speech.FLITE_PITCHED)
def test_flite_voices_speak_at_the_sampled_pitch_and_back(name):
    own = median_pitch(speech.synthesize(TEXT, Voice("flite", name, 1.0, 0)).audio)
    assert median_pitch(speech.synthesize(TEXT, Voice("flite", name, 1.0, 230)).audio) == pytest.approx(
        230, rel=0.1
    )
    back = median_pitch(speech.synthesize(TEXT, Voice("flite", name, 1.0, 0)).audio)
    assert back == pytest.approx(own, rel=0.05) and own < 160  # awb's own varies by ~1% between calls


def test_training_draws_high_pitched_flite_voices():
    rng = __import__("random").Random(0)
    pitches = [v.pitch for v in (speech.sample_voice(rng) for _ in range(2000)) if v.engine == "flite"]
    assert 0.2 < np.mean([p > 0 for p in pitches]) < 0.5
    assert min(p for p in pitches if p) >= speech.FLITE_PITCH_HZ[0]


def test_held_out_voices_never_sampled_for_training():
    rng = __import__("random").Random(0)
    names = {speech.sample_voice(rng).name for _ in range(500)}
    assert not names & set(speech.HELD_OUT_VOICES)


def test_opus_round_trip_keeps_length_and_alignment():
    s = speech.synthesize(TEXT, Voice("espeak", "en-us", 175, 50))
    out = augment.opus_round_trip(s.audio, 24_000)
    assert len(out) == len(s.audio)
    assert np.corrcoef(out, s.audio)[0, 1] > 0.8


def test_augment_scale_matches_speed():
    audio = speech.synthesize("one two three", Voice("espeak", "en-us", 175, 50)).audio
    rng = np.random.default_rng(0)
    for _ in range(10):
        out, scale = augment.augment(audio, rng)
        assert abs(len(out) - len(audio) * scale) <= 2
        assert np.abs(out).max() <= 1.0
