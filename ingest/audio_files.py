"""Audio files to 16 kHz mono s16le PCM: decode with PyAV, refuse what is not sane audio.

Caps are enforced while decoding, so a decompression bomb or a ten-hour file costs at most the
allowed amount of work. Opening validates the container, the header and the first decoded block;
a caller announces a session only after `open_audio` returns, so a bad file never half-writes one.
It knows nothing of Redis or sessions.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import av
import av.error
import numpy as np

from rawwave.contract import SAMPLE_RATE, SAMPLE_WIDTH
from rawwave.errors import RawwaveError

MAX_INPUT_RATE = 384_000  # Hz; the highest rate real recording gear produces
MIN_INPUT_RATE = 1_000  # Hz; below this nothing is speech
MAX_INPUT_CHANNELS = 32  # beyond this a header is lying (or it is not a recording we serve)
FLOAT_FORMATS = frozenset({"flt", "fltp", "dbl", "dblp"})  # sample formats that can hold NaN/inf
TRUNCATED_RATIO = 0.9  # decoded audio shorter than this share of the declared length is truncated
TRUNCATED_SLACK_S = 0.25  # codec priming and padding make short files decode a little short

AudioSource = str | Path | bytes | BinaryIO


class BadAudioError(RawwaveError):
    """The input is not audio we can serve; the message says why, for the person who sent it."""

    code = "bad_audio"


class NotAudioError(BadAudioError):
    """Empty, unreadable, or a container without an audio stream."""


class CorruptAudioError(BadAudioError):
    """The container opened but its data does not decode (or stops early: truncated)."""


class AudioHeaderError(BadAudioError):
    """The header declares an absurd rate or channel count."""


class NonFiniteAudioError(BadAudioError):
    """Float samples that are NaN or infinite."""


class AudioTooLongError(BadAudioError):
    """More audio than one session may carry."""

    code = "too_long"


@dataclass(frozen=True)
class DecodeLimits:
    max_seconds: float  # longest decoded audio, at 16 kHz
    max_input_bytes: int  # most decoded (pre-resample) sample bytes, a guard against bombs

    @classmethod
    def for_session(cls, max_session_s: float) -> DecodeLimits:
        # even at the highest rate and channel count we accept, max_seconds of float samples
        per_second = MAX_INPUT_RATE * MAX_INPUT_CHANNELS * 4
        return cls(max_seconds=max_session_s, max_input_bytes=int(max_session_s * per_second))

    @property
    def max_output_bytes(self) -> int:
        return int(self.max_seconds * SAMPLE_RATE) * SAMPLE_WIDTH


class DecodedAudio:
    """An opened, validated audio file; `blocks()` yields its 16 kHz mono s16le PCM."""

    def __init__(self, container: Any, stream: Any, limits: DecodeLimits, name: str) -> None:
        self._container = container
        self._stream = stream
        self._limits = limits
        self.name = name
        self.input_rate: int = stream.rate
        self.input_channels: int = stream.channels
        self.declared_s = _declared_seconds(container, stream)
        self.missing_bytes = 0  # bytes the header promised that the file lacks (WAV)
        # downmix = the plain mean of the channels (swresample's own downmix is 3 dB quieter for
        # dual mono); so: to planar float at the input rate, average, then to 16 kHz s16
        self._planar = av.AudioResampler(format="fltp")
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        self._input_bytes = 0
        self.output_bytes = 0
        self._frames = self._container.decode(self._stream)
        self._first = self._first_block()

    def blocks(self) -> Iterator[bytes]:
        """PCM blocks as decoded; raises a BadAudioError subclass if the file goes bad midway."""
        try:
            yield self._first
            for frame in self._decoded_frames():
                if pcm := self._resample(frame):
                    yield pcm
            if tail := self._flush():
                yield tail
            self._check_complete()
        finally:
            self.close()

    def close(self) -> None:
        self._container.close()

    @property
    def seconds(self) -> float:
        return self.output_bytes / (SAMPLE_RATE * SAMPLE_WIDTH)

    def _first_block(self) -> bytes:
        for frame in self._decoded_frames():
            if pcm := self._resample(frame):
                return pcm
        if pcm := self._flush():
            return pcm
        raise NotAudioError(f"{self.name}: no audio samples in the file")

    def _decoded_frames(self) -> Iterator[Any]:
        try:
            for frame in self._frames:
                self._check_frame(frame)
                yield frame
        except av.error.FFmpegError as e:
            raise CorruptAudioError(f"{self.name}: audio data does not decode ({_ffmpeg_reason(e)})") from e

    def _check_frame(self, frame: Any) -> None:
        self._input_bytes += sum(plane.buffer_size for plane in frame.planes)
        if self._input_bytes > self._limits.max_input_bytes:
            raise AudioTooLongError(f"{self.name}: decodes to more than {self._limits.max_input_bytes} bytes")
        if frame.format.name in FLOAT_FORMATS and not np.isfinite(frame.to_ndarray()).all():
            raise NonFiniteAudioError(f"{self.name}: samples are NaN or infinite near {self._at(frame)}")

    def _resample(self, frame: Any) -> bytes:
        frame.pts = None  # we stream contiguous audio; let the resamplers ignore gaps in timestamps
        return b"".join(
            self._take(self._resampler.resample(_downmix(f))) for f in self._planar.resample(frame)
        )

    def _flush(self) -> bytes:
        return self._take(self._resampler.resample(None))

    def _take(self, frames: list[Any]) -> bytes:
        pcm = b"".join(f.to_ndarray().tobytes() for f in frames)
        self.output_bytes += len(pcm)
        if self.output_bytes > self._limits.max_output_bytes:
            raise AudioTooLongError(
                f"{self.name}: longer than the {self._limits.max_seconds:g} s a session may carry"
            )
        return pcm

    def _check_complete(self) -> None:
        if self.missing_bytes:
            raise CorruptAudioError(
                f"{self.name}: truncated: {self.missing_bytes} bytes of audio data missing"
            )
        declared = self.declared_s
        if declared and self.seconds < declared * TRUNCATED_RATIO - TRUNCATED_SLACK_S:
            raise CorruptAudioError(
                f"{self.name}: truncated: {self.seconds:.2f} s of a declared {declared:.2f} s"
            )

    def _at(self, frame: Any) -> str:
        return f"{float(frame.time):.2f} s" if frame.time is not None else f"{self.seconds:.2f} s"


def open_audio(source: AudioSource, limits: DecodeLimits, name: str | None = None) -> DecodedAudio:
    """Open and validate `source` (path, bytes or binary file); decodes the first block."""
    name = name or (Path(source).name if isinstance(source, str | Path) else "upload")
    container = _open_container(source, name)
    try:
        stream = _audio_stream(container, name)
        audio = DecodedAudio(container, stream, limits, name)
    except BaseException:
        container.close()
        raise
    if container.format.name == "wav":
        audio.missing_bytes = _wav_missing_bytes(source)
    return audio


def decode_all(source: AudioSource, limits: DecodeLimits, name: str | None = None) -> bytes:
    """The whole file as 16 kHz mono s16le PCM (tests and small inputs)."""
    return b"".join(open_audio(source, limits, name).blocks())


def _open_container(source: AudioSource, name: str) -> Any:
    if isinstance(source, bytes):
        if not source:
            raise NotAudioError(f"{name}: empty input")
        source = io.BytesIO(source)
    elif isinstance(source, str | Path) and Path(source).is_file() and Path(source).stat().st_size == 0:
        raise NotAudioError(f"{name}: empty file")
    try:
        return av.open(source if not isinstance(source, Path) else str(source), mode="r")
    except FileNotFoundError as e:
        raise NotAudioError(f"{name}: no such file") from e
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise NotAudioError(f"{name}: not a readable audio file ({_ffmpeg_reason(e)})") from e


def _audio_stream(container: Any, name: str) -> Any:
    if not container.streams.audio:
        raise NotAudioError(f"{name}: the file has no audio stream")
    stream = container.streams.audio[0]
    try:
        rate, channels = stream.rate or 0, stream.channels or 0
    except AttributeError as e:  # PyAV leaves a stream of an unknown codec without a codec context
        raise NotAudioError(f"{name}: the audio stream's codec is unknown") from e
    if not MIN_INPUT_RATE <= rate <= MAX_INPUT_RATE:
        raise AudioHeaderError(f"{name}: sample rate {rate} Hz is outside {MIN_INPUT_RATE}..{MAX_INPUT_RATE}")
    if not 1 <= channels <= MAX_INPUT_CHANNELS:
        raise AudioHeaderError(f"{name}: {channels} channels is outside 1..{MAX_INPUT_CHANNELS}")
    return stream


def _downmix(planar: Any) -> av.AudioFrame:
    """A planar float frame (channels, n) to mono (1, n) by the channel mean."""
    mono = planar.to_ndarray().mean(axis=0, keepdims=True, dtype=np.float32)  # (1, n)
    frame = av.AudioFrame.from_ndarray(mono, format="fltp", layout="mono")
    frame.sample_rate = planar.sample_rate
    return frame


def _wav_missing_bytes(source: AudioSource) -> int:
    """FFmpeg trusts a WAV's size over its header; we compare the `data` chunk size with the bytes."""
    if isinstance(source, bytes):
        head, total = source[:4096], len(source)
    elif isinstance(source, str | Path):
        with open(source, "rb") as f:
            head, total = f.read(4096), Path(source).stat().st_size
    else:
        return 0
    at = head.find(b"data", 12)
    if at < 0 or at + 8 > len(head):
        return 0
    declared = int.from_bytes(head[at + 4 : at + 8], "little")
    if declared in (0, 0xFFFFFFFF):  # streamed WAVs leave the size unset
        return 0
    return max(0, at + 8 + declared - total)


def _declared_seconds(container: Any, stream: Any) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * Fraction(stream.time_base))
    return container.duration / av.time_base if container.duration else None


def _ffmpeg_reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error)
