"""On-the-fly augmentation matching how audio reaches the server: level, noise, speed, room, band
limits and an Opus (WebRTC) round trip at 48 kHz. Operates on 16 kHz float32 mono; knows nothing of
text except that speed changes stretch word timings (the returned factor)."""

from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from export.speech import SAMPLE_RATE, resample

OPUS_RATE = 48000
OPUS_FRAME = 960  # 20 ms at 48 kHz, what WebRTC sends
OPUS_LOOKAHEAD = 312  # libopus encoder delay (6.5 ms at 48 kHz), trimmed so timings stay put


@dataclass(frozen=True)
class AugmentSettings:
    # probability of each stage
    p_speed: float = 0.4
    p_reverb: float = 0.25
    p_band: float = 0.25
    p_noise: float = 0.4
    p_opus: float = 0.12  # the round trip costs ~70 ms per 2 s utterance on one core
    # ranges
    speed: tuple[float, float] = (0.85, 1.15)  # >1 is faster
    rt60: tuple[float, float] = (0.1, 0.6)  # seconds
    snr_db: tuple[float, float] = (5.0, 35.0)
    gain_db: tuple[float, float] = (-24.0, 3.0)  # relative to a 0.1 RMS level
    opus_bitrates: tuple[int, ...] = (12_000, 16_000, 24_000, 32_000)


def augment(
    audio: np.ndarray, rng: np.random.Generator, s: AugmentSettings = AugmentSettings()
) -> tuple[np.ndarray, float]:
    """Returns (augmented audio, time scale): multiply word timings by the scale."""
    scale = 1.0
    if rng.random() < s.p_speed:
        factor = rng.uniform(*s.speed)
        audio, scale = change_speed(audio, factor), 1.0 / factor
    if rng.random() < s.p_reverb:
        audio = reverb(audio, rng.uniform(*s.rt60), rng)
    if rng.random() < s.p_band:
        audio = band_limit(
            audio,
            *rng.choice([(300.0, 3400.0), (100.0, rng.uniform(3000, 7000)), (rng.uniform(150, 500), 8000.0)]),
        )
    if rng.random() < s.p_noise:
        audio = add_noise(audio, rng.uniform(*s.snr_db), rng.choice(["white", "pink", "brown"]), rng)
    audio = set_level(audio, rng.uniform(*s.gain_db))
    if rng.random() < s.p_opus:
        audio = opus_round_trip(audio, int(rng.choice(s.opus_bitrates)))
    return np.clip(audio, -1.0, 1.0).astype(np.float32), scale


def fft_size(n: int) -> int:
    return 1 << int(np.ceil(np.log2(max(n, 2))))


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """Play factor times faster (pitch moves with it, as in tape-speed perturbation)."""
    return resample(audio, round(SAMPLE_RATE * factor), SAMPLE_RATE)


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)) + 1e-9)


def set_level(audio: np.ndarray, gain_db: float) -> np.ndarray:
    return audio * (0.1 * 10 ** (gain_db / 20) / rms(audio))


def reverb(audio: np.ndarray, rt60: float, rng: np.random.Generator) -> np.ndarray:
    """Convolve with a synthetic room response: direct path plus exponentially decaying noise."""
    n = int(rt60 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)  # -60 dB at rt60
    ir = np.concatenate([[1.0], 0.3 * tail / np.sqrt(np.sum(tail**2) + 1e-9)])
    size = fft_size(len(audio) + len(ir))
    wet = np.fft.irfft(np.fft.rfft(audio, size) * np.fft.rfft(ir, size), size)[: len(audio)]
    return wet * (rms(audio) / rms(wet))


def band_limit(audio: np.ndarray, low_hz: float, high_hz: float) -> np.ndarray:
    """Zero the spectrum outside [low_hz, high_hz] (whole-utterance FFT, a brick-wall filter)."""
    size = fft_size(len(audio))
    spectrum = np.fft.rfft(audio, size)
    freqs = np.fft.rfftfreq(size, 1 / SAMPLE_RATE)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0
    return np.fft.irfft(spectrum, size)[: len(audio)]


def add_noise(audio: np.ndarray, snr_db: float, color: str, rng: np.random.Generator) -> np.ndarray:
    """Stationary noise of a 1/f^a colour at snr_db relative to the speech."""
    exponent = {"white": 0.0, "pink": 0.5, "brown": 1.0}[color]
    size = fft_size(len(audio))
    spectrum = np.fft.rfft(rng.standard_normal(size))
    freqs = np.maximum(np.fft.rfftfreq(size, 1 / SAMPLE_RATE), 20.0)
    noise = np.fft.irfft(spectrum / freqs**exponent, size)[: len(audio)]
    return audio + noise * (rms(audio) / rms(noise) * 10 ** (-snr_db / 20))


def opus_round_trip(audio: np.ndarray, bitrate: int) -> np.ndarray:
    """Encode to Opus at 48 kHz (20 ms frames, libopus via PyAV), decode, back to 16 kHz, same length."""
    up = resample(audio, SAMPLE_RATE, OPUS_RATE)
    pcm = np.clip(up * 32767, -32768, 32767).astype(np.int16)
    pcm = np.pad(pcm, (0, -len(pcm) % OPUS_FRAME + OPUS_FRAME))  # flush the encoder's lookahead
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = OPUS_RATE, "mono", "s16"
    encoder.bit_rate = bitrate
    encoder.time_base = Fraction(1, OPUS_RATE)
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout = OPUS_RATE, "mono"
    out = []
    for start in range(0, len(pcm), OPUS_FRAME):
        frame = av.AudioFrame.from_ndarray(pcm[None, start : start + OPUS_FRAME], format="s16", layout="mono")
        frame.sample_rate, frame.pts = OPUS_RATE, start
        for packet in encoder.encode(frame):
            out += [f.to_ndarray().reshape(-1) for f in decoder.decode(packet)]
    for packet in encoder.encode(None):
        out += [f.to_ndarray().reshape(-1) for f in decoder.decode(packet)]
    decoded = np.concatenate(out).astype(np.float32)[OPUS_LOOKAHEAD:]  # no pre-skip without a container
    decoded = decoded / 32768.0 if np.abs(decoded).max() > 2 else decoded
    down = resample(decoded, OPUS_RATE, SAMPLE_RATE)
    return np.pad(down, (0, max(0, len(audio) - len(down))))[: len(audio)]
