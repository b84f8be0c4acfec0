"""Decoding: every format gives the same 16 kHz mono PCM; every bad input gets its own clear error."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from ingest.audio_files import (
    AudioHeaderError,
    AudioTooLongError,
    BadAudioError,
    CorruptAudioError,
    DecodeLimits,
    NonFiniteAudioError,
    NotAudioError,
    decode_all,
    open_audio,
)
from rawwave.errors import RawwaveError

from .conftest import FORMATS

LIMITS = DecodeLimits.for_session(600.0)


def samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768


def envelope(x: np.ndarray, hop: int = 320) -> np.ndarray:
    """RMS per 20 ms: robust to codec phase and filter differences, faithful to the speech shape."""
    frames = x[: len(x) // hop * hop].reshape(-1, hop)
    return np.sqrt((frames**2).mean(axis=1))


def aligned_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 10) -> float:
    """Best correlation of two envelopes over small lags (encoders add a few ms of priming)."""
    best = -1.0
    for lag in range(-max_lag, max_lag + 1):
        x, y = (a[lag:], b) if lag >= 0 else (a, b[-lag:])
        n = min(len(x), len(y))
        best = max(best, float(np.corrcoef(x[:n], y[:n])[0, 1]))
    return best


def test_wav_decodes_to_the_original_samples(speech_wav: Path) -> None:
    pcm = decode_all(speech_wav, LIMITS)
    assert pcm == speech_wav.read_bytes()[44:]  # already 16 kHz mono s16: a lossless pass-through


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_gives_the_same_pcm(audio_dir: Path, speech_wav: Path, fmt: str) -> None:
    reference = samples(decode_all(speech_wav, LIMITS))
    decoded = samples(decode_all(audio_dir / f"s.{fmt}", LIMITS))
    assert abs(len(decoded) - len(reference)) < 0.06 * 16000  # within 60 ms (codec padding)
    assert aligned_correlation(envelope(decoded), envelope(reference)) > 0.97
    level = np.sqrt((decoded**2).mean() / (reference**2).mean())
    assert 0.6 < level < 1.3  # lossy codecs and up/downmixing move the level a little, never a lot


def test_downmix_is_the_channel_mean(audio_dir: Path, speech_wav: Path) -> None:
    reference = samples(decode_all(speech_wav, LIMITS))
    decoded = samples(decode_all(audio_dir / "dual.wav", LIMITS))  # 44.1 kHz, L = R = the speech
    n = min(len(decoded), len(reference))
    assert np.abs(decoded[:n] - reference[:n]).max() < 0.02  # only the two resamplings differ


def test_bytes_and_file_objects_decode_like_paths(audio_dir: Path) -> None:
    path = audio_dir / "s.flac"
    from_path = decode_all(path, LIMITS)
    assert decode_all(path.read_bytes(), LIMITS) == from_path
    with path.open("rb") as f:
        assert decode_all(f, LIMITS) == from_path


def test_opening_validates_before_reading_everything(speech_wav: Path) -> None:
    audio = open_audio(speech_wav, LIMITS)
    assert (audio.input_rate, audio.input_channels) == (16000, 1)
    assert 2.5 < audio.declared_s < 3.2
    assert sum(len(b) for b in audio.blocks()) == len(speech_wav.read_bytes()) - 44


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _patched_wav(wav: bytes, offset: int, fmt: str, value: int) -> bytes:
    data = bytearray(wav)
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


def _nan_wav(tmp_path: Path, speech_wav: Path, bad: float) -> Path:
    x = samples(speech_wav.read_bytes()[44:]).copy()
    x[8000] = bad
    header = b"RIFF" + struct.pack("<I", 36 + 4 * len(x)) + b"WAVEfmt "
    header += struct.pack("<IHHIIHH", 16, 3, 1, 16000, 64000, 4, 32) + b"data" + struct.pack("<I", 4 * len(x))
    return _write(tmp_path / "nan.wav", header + x.astype("<f4").tobytes())


def test_float_wav_decodes(tmp_path: Path, speech_wav: Path) -> None:
    good = _nan_wav(tmp_path, speech_wav, 0.0)
    assert abs(len(decode_all(good, LIMITS)) - (len(speech_wav.read_bytes()) - 44)) <= 64


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_samples_are_refused(tmp_path: Path, speech_wav: Path, bad: float) -> None:
    with pytest.raises(NonFiniteAudioError, match="NaN or infinite"):
        decode_all(_nan_wav(tmp_path, speech_wav, bad), LIMITS)


def test_bad_inputs_each_get_a_clear_error(tmp_path: Path, audio_dir: Path, speech_wav: Path) -> None:
    wav, flac, mp3 = (
        speech_wav.read_bytes(),
        (audio_dir / "s.flac").read_bytes(),
        (audio_dir / "s.mp3").read_bytes(),
    )
    cases: list[tuple[object, type[BadAudioError], str]] = [
        (_write(tmp_path / "empty.wav", b""), NotAudioError, "empty"),
        (b"", NotAudioError, "empty"),
        (tmp_path / "missing.wav", NotAudioError, "no such file"),
        (
            _write(tmp_path / "notes.wav", b"just some text, not audio\n" * 20),
            NotAudioError,
            "not a readable",
        ),
        (_write(tmp_path / "header.wav", wav[:40]), NotAudioError, "not a readable"),
        (_write(tmp_path / "cut.wav", wav[: len(wav) // 2]), CorruptAudioError, "truncated"),
        (_write(tmp_path / "cut.flac", flac[: len(flac) // 3]), CorruptAudioError, "does not decode"),
        (_write(tmp_path / "cut.mp3", mp3[: len(mp3) // 2]), CorruptAudioError, "truncated"),
        (_write(tmp_path / "rate.wav", _patched_wav(wav, 24, "<I", 655350)), AudioHeaderError, "655350 Hz"),
        (_write(tmp_path / "chan.wav", _patched_wav(wav, 22, "<H", 200)), AudioHeaderError, "200 channels"),
    ]
    for source, error, message in cases:
        with pytest.raises(error, match=message):
            decode_all(source, LIMITS)  # type: ignore[arg-type]


def test_a_file_without_audio_is_refused(tmp_path: Path) -> None:
    import subprocess

    image = tmp_path / "pixel.png"
    subprocess.run(
        [
            "ffmpeg",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "color=c=red:s=8x8",
            "-frames:v",
            "1",
            str(image),
        ],
        check=True,
    )
    with pytest.raises(NotAudioError, match="no audio stream"):
        decode_all(image, LIMITS)


def test_duration_cap_is_enforced_while_decoding(speech_wav: Path) -> None:
    with pytest.raises(AudioTooLongError, match="1 s"):
        decode_all(speech_wav, DecodeLimits.for_session(1.0))


def test_decoded_byte_cap_stops_a_bomb(audio_dir: Path) -> None:
    with pytest.raises(AudioTooLongError, match="bytes"):
        decode_all(audio_dir / "s.flac", DecodeLimits(max_seconds=600, max_input_bytes=50_000))


def test_errors_are_rawwave_errors_with_codes() -> None:
    assert issubclass(BadAudioError, RawwaveError)
    assert AudioTooLongError.code == "too_long" and NotAudioError.code == "bad_audio"
