"""Interleaved streaming: each chunk's words are decoded right after its audio, as the model was trained.

For models whose runtime.json says `streaming.format: "interleaved"` (our default model). The audio goes
into the KV cache one chunk (`streaming.chunk_frames` frames) at a time, wrapped as in training
(`<|audio>` frames `<audio|>`); the model writes the words the chunk completed and asks for more audio by
predicting `<|audio>`. Its words stay in the cache, so nothing is decoded twice and a partial is never
revised (stable == text): a word appears at most one chunk after it ends. The end of a turn feeds the
last, shorter chunk, publishes the final, and closes the user turn; a response follows in the model turn.

Verbs, endpointing, events and determinism are worker.session's: chunk boundaries are in audio time,
so the same audio yields the same events however it arrived.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np

from rawwave.contract import Event, FinalEvent, PartialEvent
from worker.decoding import Context, StopRule, generate, prefill
from worker.runtime import Runtime
from worker.session import Response, StreamingOptions, StreamingSession

# Words the model may write after one chunk before it must take more audio: a 320 ms chunk completes
# at most a few words (~10 tokens); the cap bounds a model that never asks for audio.
CHUNK_MAX_TOKENS = 24


class InterleavedSession(StreamingSession):
    @cached_property
    def words_stop(self) -> StopRule:
        """A chunk's words end where the model asks for audio, ends its turn, or ends the transcript
        (transcript_end: no transcript holds one; a model trained in the branch format first writes it)."""
        end = self.prompt.transcript_end
        ends = {end[0]} if len(end) == 1 else set()
        return StopRule(self.prompt.transcript_stop.eos | {self.runtime.config.tokens.boa} | ends)

    def _take_frame(self, frame: np.ndarray) -> list[Event]:
        seg, opts = self.segment, self.options
        seg.add(frame, opts.silence_dbfs)
        endpointing = opts.endpoint_frames > 0
        if endpointing and seg.silent_run >= opts.endpoint_frames:
            # words heard in "silence" still end a turn: they were published as partials
            return self._end_turn() if seg.speech or seg.stable else self._reset_segment()
        if seg.frames >= opts.max_frames:  # the words so far are out already: the turn simply ends here
            return self._end_turn()
        if seg.frames - seg.fed >= opts.chunk_frames:
            return self._chunk()
        return []

    def _chunk(self) -> list[Event]:
        """Feed a whole chunk; a partial when it completed words."""
        seg = self.segment
        self._feed_chunk()
        text = self.runtime.decode(seg.stable)
        if text == seg.stable_text:
            return []
        seg.stable_text = text
        seg.revision += 1
        return [PartialEvent(session=self.session_id, seq=self._seq(), t_ms=self.t_ms, text=text,
                             stable=text, revision=seg.revision)]  # fmt: skip

    def _feed_chunk(self) -> None:
        """The frames not yet in the cache, wrapped as a chunk, then the words the model writes for them
        (kept in the cache: the next chunk follows them)."""
        seg = self.segment
        runtime, tokens = self.runtime, self.runtime.config.tokens
        audio = runtime.embed_audio(np.concatenate(seg.audio[seg.fed :]))  # (n, H)
        wrap = runtime.embed_tokens([tokens.boa]), runtime.embed_tokens([tokens.eoa])
        embeds = np.concatenate([wrap[0], audio, wrap[1]])  # (n + 2, H)
        logits, hidden, cache = self.decoder.extend_embeds(seg.cache.cache, seg.cache.length, embeds, keep=1)
        ctx = Context(cache, seg.cache.length + len(embeds), logits[-1], hidden[-1])
        gen = generate(self.decoder, ctx, self.words_stop, CHUNK_MAX_TOKENS, self.drafter)
        self.stats.add(gen.stats)
        seg.cache, seg.fed = gen.ctx, seg.frames
        seg.stable = [*seg.stable, *gen.tokens]

    def _end_turn(self) -> list[Event]:
        if self.segment.frames > self.segment.fed:
            self._feed_chunk()
        events = self._final_events()
        self._new_segment()
        return events

    def _final_events(self) -> list[Event]:
        seg = self.segment
        self.finals += 1
        final = FinalEvent(session=self.session_id, seq=self._seq(), t_ms=self.t_ms,
                           text=self.runtime.decode(seg.stable))  # fmt: skip
        if self.respond:  # close the user turn, open the model's: the response is all the model turn holds
            self.response = Response(prefill(self.decoder, seg.cache, self.prompt.suffix), self.t_ms)
        return [final]


def open_session(runtime: Runtime, options: StreamingOptions, *args: Any, **kwargs: Any) -> StreamingSession:
    """The streaming session the model directory's format asks for (StreamingSession's arguments)."""
    kind = InterleavedSession if options.format == "interleaved" else StreamingSession
    return kind(runtime, options, *args, **kwargs)
