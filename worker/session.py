"""One session's streaming state: audio in, contract events out. Verbs: feed, end, step, abort.

Audio soft tokens go into a KV cache as frames arrive (only new audio is prefilled). Every partial
interval of AUDIO time the session branches from that cache: close the audio and the user turn, open
the model turn, decode greedily, publish a partial, drop the branch. Decisions (partials, end of turn,
segment cuts) depend only on the audio, and prefill calls happen only at those points, so the same
audio yields the same events however it was chunked: a reclaimed session replays to identical events.

Stable prefix (local agreement): the tokens the last two hypotheses agree on are committed and forced
into every later decode of the turn, the final included, so what was stable never changes. The
previous hypothesis is the first draft of the next decode (verified in the same call as the forced
tokens); the MTP drafter proposes the rest. Knows nothing of Redis: `worker.ownership` moves events.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rawwave.contract import (
    SAMPLE_WIDTH,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    FinalEvent,
    PartialEvent,
    ResponseDeltaEvent,
    ResponseDoneEvent,
)
from rawwave.model_dir import ModelDirError, RuntimeConfig
from rawwave.settings import Settings
from worker.decoding import (
    AdaptiveDrafter,
    Context,
    DecodeStats,
    Generation,
    StopRule,
    Target,
    generate,
    prefill,
)
from worker.image import ImageError, image_patches
from worker.runtime import Runtime

RESPONSE_STEP_TOKENS = 16  # response tokens per step() call: the event loop publishes in between
USER_TURN = "<|turn>user\n"  # an image opens the user turn, before the instruction and the audio
NO_ROW = np.zeros(0, np.float32)  # an audio cache's context: every branch starts with forced tokens


class Decoder(Target, Protocol):
    """What a session's decoder calls go through: the Runtime itself, or a worker.batcher.Batcher."""

    def extend_embeds(
        self, cache: Any, length: int, embeds: np.ndarray, keep: int = 0
    ) -> tuple[np.ndarray, np.ndarray, Any]: ...


@dataclass(frozen=True)
class StreamingOptions:
    """The numbers a session runs by: runtime.json's streaming section, overridden by settings."""

    frame_samples: int
    frame_ms: float
    format: str  # "branch" (worker.session) or "interleaved" (worker.interleaved)
    chunk_frames: int  # interleaved: audio frames per chunk
    interval_frames: int  # branch: audio frames between partials
    endpoint_frames: int  # trailing silent frames that end a turn; 0: only the end marker does
    max_frames: int  # longest segment, in frames
    silence_dbfs: float  # a frame quieter than this is silence
    max_transcript_tokens: int
    max_response_tokens: int
    mtp: bool
    mtp_confidence: float = 0.0  # see Settings.mtp_confidence

    @classmethod
    def of(cls, config: RuntimeConfig, settings: Settings) -> StreamingOptions:
        streaming, frame_ms = config.streaming, config.frame_ms
        interval = settings.partial_interval_ms or streaming.partial_interval_ms
        silence = (
            streaming.endpoint_silence_ms
            if settings.endpoint_silence_ms is None
            else settings.endpoint_silence_ms
        )
        return cls(
            frame_samples=config.frame_samples,
            frame_ms=frame_ms,
            format=streaming.format,
            chunk_frames=streaming.chunk_frames,
            interval_frames=max(1, round(interval / frame_ms)),
            endpoint_frames=round(silence / frame_ms),
            max_frames=max(1, int(streaming.max_audio_s * 1000 / frame_ms)),
            silence_dbfs=settings.endpoint_silence_dbfs,
            max_transcript_tokens=streaming.max_transcript_tokens,
            max_response_tokens=settings.max_response_tokens,
            mtp=settings.mtp,
            mtp_confidence=settings.mtp_confidence,
        )


@dataclass(frozen=True)
class Prompt:
    """The token pieces of one session's turns, encoded once."""

    prefix: list[int]  # before the audio
    suffix: list[int]  # after the audio: closes the user turn, opens the model turn
    transcript_stop: StopRule
    response_stop: StopRule
    transcript_end: list[int]

    @classmethod
    def of(cls, runtime: Runtime, respond: bool, image_tokens: int = 0) -> Prompt:
        p, eos = runtime.config.prompt, frozenset(runtime.config.tokens.eos)
        turn_end = runtime.encode(p.turn_end)
        eos = eos | ({turn_end[0]} if len(turn_end) == 1 else set())
        end = runtime.encode(p.transcript_end)
        prefix = p.respond_prefix if respond else p.transcribe_prefix
        return cls(
            prefix=with_image(runtime, prefix, image_tokens) if image_tokens else runtime.encode(prefix),
            suffix=runtime.encode(p.audio_suffix),
            transcript_stop=StopRule(eos, tuple(end)),
            response_stop=StopRule(eos, tuple(turn_end) if len(turn_end) > 1 else ()),
            transcript_end=end,
        )


def with_image(runtime: Runtime, prefix: str, count: int) -> list[int]:
    """The prefix tokens with an image of `count` soft tokens first in the user turn: what the reference
    chat template and processor make of user content [image, text, audio] (`<|image>`, count image
    placeholders, `<image|>`). There the image stays in the prefix that every turn starts from."""
    head, turn, tail = prefix.partition(USER_TURN)
    tokens = runtime.config.tokens
    if not turn or tokens.boi is None or tokens.eoi is None or tokens.image is None:
        raise ModelDirError(f"no place for an image in the prompt {prefix!r} (no {USER_TURN!r} or image ids)")
    image = [tokens.boi, *[tokens.image] * count, tokens.eoi]
    return [*runtime.encode(head + turn), *image, *runtime.encode(tail)]


def image_soft_tokens(runtime: Runtime, data: bytes) -> np.ndarray:
    """A session's image as soft tokens (N, H). ImageError `no_vision` when the model takes no image,
    `bad_image` when the image is corrupt, unsupported or too large."""
    if runtime.vision is None or runtime.config.vision is None:
        message = f"model {runtime.model_dir.name!r} has no vision: it cannot take this session's image"
        raise ImageError(message, "no_vision")
    image = image_patches(data, runtime.config.vision)
    return runtime.embed_image(image.patches, image.xy)  # (N, H)


def frame_dbfs(frame: np.ndarray) -> float:
    """Level of one frame of s16 samples, in dB relative to full scale."""
    rms = math.sqrt(float(np.mean(frame.astype(np.float64) ** 2)))
    return 20 * math.log10(max(rms, 1e-9) / 32768)


def best_cut(levels: Sequence[float], window: int) -> int:
    """Where to cut an over-long segment: after the quietest `window` frames of its second half (the
    latest on ties). Returns the number of frames the segment keeps."""
    n = len(levels)
    if n <= window:
        return n
    sums = np.convolve(np.asarray(levels, np.float64), np.ones(window), mode="valid")  # (n - window + 1,)
    first = max(0, n // 2 - window)
    candidates = sums[first:]
    best = first + len(candidates) - 1 - int(np.argmin(candidates[::-1]))  # window start, latest minimum
    return best + window // 2 + 1


def stable_text(previous: str, text: str, candidate: str) -> str:
    """The stable text to publish: the decoded stable tokens, trimmed to a clean prefix of text, and
    never shorter than what was already published (monotonic)."""
    while candidate and (not text.startswith(candidate) or candidate.endswith("\ufffd")):
        candidate = candidate[:-1]
    if text.startswith(previous) and len(candidate) <= len(previous):
        return previous
    if candidate.startswith(previous):
        return candidate
    common = 0  # only a detokenizer quirk gets here; keep the contract (stable is a prefix of text)
    while common < min(len(previous), len(text)) and previous[common] == text[common]:
        common += 1
    return text[:common]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclass
class Segment:
    """One user turn being heard: its audio, its audio cache, and its hypotheses."""

    start_frame: int  # session frame index of its first frame
    cache: Context  # prefix + the first `fed` frames
    audio: list[np.ndarray] = field(default_factory=list)  # every frame so far, s16
    levels: list[float] = field(default_factory=list)  # dBFS of every frame
    fed: int = 0  # frames prefilled into the cache
    silent_run: int = 0  # trailing silent frames
    speech: bool = False  # a frame above the silence threshold was heard
    stable: list[int] = field(default_factory=list)  # committed transcript tokens
    hypothesis: list[int] = field(default_factory=list)
    stable_text: str = ""
    revision: int = 0

    @property
    def frames(self) -> int:
        return len(self.audio)

    def add(self, frame: np.ndarray, silence_dbfs: float) -> None:
        level = frame_dbfs(frame)
        self.audio.append(frame)
        self.levels.append(level)
        silent = level < silence_dbfs
        self.silent_run = self.silent_run + 1 if silent else 0
        self.speech = self.speech or not silent


@dataclass
class Response:
    """A response being generated after a final transcript."""

    ctx: Context
    t_ms: int
    tokens: list[int] = field(default_factory=list)
    sent: str = ""  # text already published as deltas


class StreamingSession:
    """Feed audio, end the input, and call step() until it returns [] (needs audio) or `done`.
    Decoder calls go through `decoder` (default: the runtime itself). An `image` (encoded bytes) goes
    into the prompt once, at the start of every turn's user content; ImageError when it cannot."""

    def __init__(
        self,
        runtime: Runtime,
        options: StreamingOptions,
        session_id: str,
        respond: bool,
        decoder: Decoder | None = None,
        image: bytes | None = None,
    ) -> None:
        self.runtime, self.options, self.session_id, self.respond = runtime, options, session_id, respond
        self.decoder: Decoder = decoder or runtime
        soft = image_soft_tokens(runtime, image) if image is not None else None  # (N, H)
        self.prompt = Prompt.of(runtime, respond, 0 if soft is None else len(soft))
        drafting = options.mtp and runtime.drafter is not None
        # Transcripts and responses get their own acceptance estimate (one round-cost table): a drafter
        # that guesses responses well but a chunk's few words poorly must not stop drafting responses.
        confident = options.mtp_confidence
        self.drafter = (
            AdaptiveDrafter(runtime.drafter, part="transcript", confidence=confident) if drafting else None
        )
        self.response_drafter = (
            AdaptiveDrafter(runtime.drafter, part="response", confidence=confident) if drafting else None
        )
        start = runtime.start(self.prompt.prefix, soft)
        self.prefix = Context(start.cache, start.length, NO_ROW, NO_ROW)
        self.samples = np.zeros(0, np.int16)  # received, not yet a whole frame
        self.frames: deque[np.ndarray] = deque()  # whole frames waiting for step()
        self.segment = Segment(0, self.prefix)
        self.response: Response | None = None
        self.seq = 0  # last event seq handed out
        self.finals = 0
        self.ended = False
        self.done = False
        self.stats = DecodeStats()

    # -- verbs ---------------------------------------------------------------------------------

    def feed(self, pcm: bytes) -> None:
        """Queue s16le audio; no computation happens here."""
        samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % SAMPLE_WIDTH], dtype="<i2")
        self.samples = np.concatenate([self.samples, samples])
        whole = len(self.samples) // self.options.frame_samples * self.options.frame_samples
        for frame in self.samples[:whole].reshape(-1, self.options.frame_samples):
            self.frames.append(frame)
        self.samples = self.samples[whole:]

    def end(self) -> None:
        """No more audio: a trailing partial frame is padded with silence."""
        if len(self.samples):
            tail = np.zeros(self.options.frame_samples, np.int16)
            tail[: len(self.samples)] = self.samples
            self.frames.append(tail)
            self.samples = np.zeros(0, np.int16)
        self.ended = True

    def step(self) -> list[Event]:
        """Work until some events are ready; [] when it needs more audio (or is done)."""
        while not self.done:
            events = self._advance()
            if events is None:
                return []
            if events:
                return events
        return []

    def abort(self, code: ErrorCode, message: str) -> list[Event]:
        """End the session with an error event and done (poison input, too long, shutting down)."""
        self.done = True
        error = ErrorEvent(
            session=self.session_id, seq=self._seq(), t_ms=self.t_ms, code=code, message=message
        )
        return [error, DoneEvent(session=self.session_id, seq=self._seq(), t_ms=self.t_ms)]

    @property
    def t_ms(self) -> int:
        return round((self.segment.start_frame + self.segment.frames) * self.options.frame_ms)

    # -- the work loop -------------------------------------------------------------------------

    def _advance(self) -> list[Event] | None:
        """One unit of work: a response chunk, or one frame. None: nothing can be done yet."""
        if self.response is not None:
            return self._continue_response()
        if self.frames:
            return self._take_frame(self.frames.popleft())
        if self.ended:
            return self._close()
        return None

    def _take_frame(self, frame: np.ndarray) -> list[Event]:
        seg, opts = self.segment, self.options
        seg.add(frame, opts.silence_dbfs)
        endpointing = opts.endpoint_frames > 0
        if endpointing and seg.silent_run >= opts.endpoint_frames:
            return self._end_turn() if seg.speech else self._reset_segment()
        if seg.frames >= opts.max_frames:
            return self._cut_segment()
        if seg.frames % opts.interval_frames == 0 and (seg.speech or not endpointing):
            return self._partial()
        return []

    def _close(self) -> list[Event]:
        """Input ended and every frame is in: the last turn's final (if it heard anything), then done."""
        seg = self.segment
        events: list[Event] = []
        if seg.frames and (seg.speech or not self.options.endpoint_frames or not self.finals):
            events = self._end_turn()
            if self.response is not None:
                return events
        self.done = True
        return [*events, DoneEvent(session=self.session_id, seq=self._seq(), t_ms=self.t_ms)]

    # -- segments ------------------------------------------------------------------------------

    def _prefill_pending(self) -> None:
        seg = self.segment
        if seg.fed == seg.frames:
            return
        embeds = self.runtime.embed_audio(np.concatenate(seg.audio[seg.fed :]))  # (n, H)
        _, _, cache = self.decoder.extend_embeds(seg.cache.cache, seg.cache.length, embeds, keep=1)
        seg.cache = Context(cache, seg.cache.length + len(embeds), NO_ROW, NO_ROW)
        seg.fed = seg.frames

    def _new_segment(self, carried: Sequence[np.ndarray] = ()) -> None:
        """Start the next turn where this one ends; carried frames are taken in again, in order."""
        self.segment = Segment(self.segment.start_frame + self.segment.frames, self.prefix)
        self.frames.extendleft(reversed(carried))

    def _reset_segment(self) -> list[Event]:
        """A turn of silence only: forget it, no events."""
        self._new_segment()
        return []

    def _cut_segment(self) -> list[Event]:
        """The segment reached max_audio_s: end the turn at its best silence, carry the rest over."""
        seg = self.segment
        self._prefill_pending()
        keep = best_cut(seg.levels, max(1, self.options.interval_frames // 2))
        carried = seg.audio[keep:]
        length = self.prefix.length + keep
        seg.cache = Context(self.decoder.truncate(seg.cache.cache, length), length, NO_ROW, NO_ROW)
        seg.audio, seg.levels, seg.fed = seg.audio[:keep], seg.levels[:keep], keep
        events = self._final_events()
        self._new_segment(carried)
        return events

    def _end_turn(self) -> list[Event]:
        self._prefill_pending()
        events = self._final_events()
        self._new_segment()
        return events

    # -- hypotheses ----------------------------------------------------------------------------

    def _decode(self, seg: Segment) -> Generation:
        """Branch from the audio cache: forced suffix + stable tokens, previous hypothesis as a draft."""
        budget = len(self.prompt.suffix) + self.options.max_transcript_tokens
        forced = [*self.prompt.suffix, *seg.stable]
        guess = seg.hypothesis[len(seg.stable) :]
        gen = generate(
            self.decoder, seg.cache, self.prompt.transcript_stop, budget, self.drafter, forced, guess
        )
        self.stats.add(gen.stats)
        return gen

    def _transcript(self, gen: Generation) -> list[int]:
        tokens = gen.tokens[len(self.prompt.suffix) :]
        end = self.prompt.transcript_end
        return tokens[: -len(end)] if end and tokens[-len(end) :] == end else tokens

    def _partial(self) -> list[Event]:
        seg = self.segment
        self._prefill_pending()
        hypothesis = self._transcript(self._decode(seg))
        seg.stable = hypothesis[: max(len(seg.stable), common_prefix(hypothesis, seg.hypothesis))]
        seg.hypothesis = hypothesis
        text = self.runtime.decode(hypothesis)
        seg.stable_text = stable_text(seg.stable_text, text, self.runtime.decode(seg.stable))
        seg.revision += 1
        return [PartialEvent(session=self.session_id, seq=self._seq(), t_ms=self.t_ms, text=text,
                             stable=seg.stable_text, revision=seg.revision)]  # fmt: skip

    def _final_events(self) -> list[Event]:
        seg = self.segment
        t_ms = self.t_ms
        gen = self._decode(seg)
        transcript = self._transcript(gen)
        self.finals += 1
        events: list[Event] = [FinalEvent(session=self.session_id, seq=self._seq(), t_ms=t_ms,
                                          text=self.runtime.decode(transcript))]  # fmt: skip
        if self.respond:
            self.response = self._start_response(gen, transcript, t_ms)
        return events

    # -- responses -----------------------------------------------------------------------------

    def _start_response(self, gen: Generation, transcript: list[int], t_ms: int) -> Response:
        """The response follows the transcript and transcript_end in the same model turn."""
        ended = gen.tokens[len(self.prompt.suffix) + len(transcript) :] == self.prompt.transcript_end
        forced = [] if ended else self.prompt.transcript_end
        return Response(prefill(self.decoder, gen.ctx, forced) if forced else gen.ctx, t_ms)

    def _continue_response(self) -> list[Event]:
        response, opts = self.response, self.options
        assert response is not None
        budget = min(RESPONSE_STEP_TOKENS, opts.max_response_tokens - len(response.tokens))
        gen = generate(self.decoder, response.ctx, self.prompt.response_stop, budget, self.response_drafter)
        self.stats.add(gen.stats)
        events = self._deltas(response, gen.tokens)
        response.ctx = gen.ctx
        if gen.stopped or len(response.tokens) >= opts.max_response_tokens:
            self.response = None
            text = self.runtime.decode(response.tokens)
            events += [
                ResponseDoneEvent(session=self.session_id, seq=self._seq(), t_ms=response.t_ms, text=text)
            ]
        return events

    def _deltas(self, response: Response, tokens: list[int]) -> list[Event]:
        """One delta per token that completes text (identical events whatever the decode rounds were)."""
        events: list[Event] = []
        for token in tokens:
            response.tokens.append(token)
            text = self.runtime.decode(response.tokens)
            if (
                text.endswith("\ufffd")
                or not text.startswith(response.sent)
                or len(text) == len(response.sent)
            ):
                continue
            delta, response.sent = text[len(response.sent) :], text
            events.append(
                ResponseDeltaEvent(session=self.session_id, seq=self._seq(), t_ms=response.t_ms, text=delta)
            )
        return events

    def _seq(self) -> int:
        self.seq += 1
        return self.seq
