"""Greedy decoding and lossless speculative decoding over an abstract target model and drafter.

Knows nothing of ONNX Runtime, audio or Redis: `worker.runtime` provides a `Target` and a `Drafter`,
and the tests drive these functions with a numpy toy model. Every token this module emits is the
target's own greedy choice, so speculation changes speed, never output.

Speculative decoding in one rule. Given a context whose last position predicts token t0 = argmax, feed
[t0, d1 .. dk] (k drafted tokens) in one decoder call. Row i of the returned logits is the target's
prediction after t0, d1 .. di, so d(i+1) is what plain greedy would have produced exactly when
d(i+1) == argmax(row i). Keep t0 and the longest agreeing prefix d1 .. dn; row n then predicts the
next round's t0 for free. Each call emits between 1 and k + 1 tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Context:
    """A decoder state ready to extend: a KV cache of `length` positions and what its last one says."""

    cache: Any  # the runtime's opaque KV cache
    length: int  # positions in the cache
    logits: np.ndarray  # (V,) prediction of the next token
    hidden: np.ndarray  # (H,) last hidden state at the last position: the drafter's input

    @property
    def next_token(self) -> int:
        return int(self.logits.argmax())


class Target(Protocol):
    def extend(
        self, cache: Any, length: int, token_ids: Sequence[int], keep: int = 0
    ) -> tuple[np.ndarray, np.ndarray, Any]:
        """Append tokens to a cache (never mutated): logits of the last `keep` rows (0: all) (K, V),
        hidden (T, H), the new cache."""
        ...

    def truncate(self, cache: Any, length: int) -> Any:
        """The cache's first `length` positions (exact: attention is causal)."""
        ...


class Drafter(Protocol):
    num_draft_tokens: int

    def propose(self, ctx: Context, token: int, count: int) -> list[int]:
        """Guess `count` tokens that follow `token`, the target's next token after ctx."""
        ...


class AdaptiveDrafter:
    """Drafts only while drafting pays (per session): a round with every draft accepted lengthens the next
    draft by one, up to the drafter's k; a round with none accepted halves it. At zero it probes with one
    token every PROBE_EVERY rounds. Only speed changes: verification keeps the output exact."""

    PROBE_EVERY = 8

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner
        self.num_draft_tokens = inner.num_draft_tokens
        self.length = inner.num_draft_tokens
        self.rounds_idle = 0

    def propose(self, ctx: Context, token: int, count: int) -> list[int]:
        length = self.length
        if length == 0:
            self.rounds_idle += 1
            length = 1 if self.rounds_idle % self.PROBE_EVERY == 0 else 0
        return self.inner.propose(ctx, token, min(count, length)) if length else []

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:
            self.length = min(self.num_draft_tokens, self.length + 1)
        elif accepted == 0:
            self.length //= 2


@dataclass(frozen=True)
class StopRule:
    """Generation ends before any of `eos`, or after the token sequence `end` (which is kept)."""

    eos: frozenset[int]
    end: tuple[int, ...] = ()

    def stops_before(self, token: int) -> bool:
        return token in self.eos

    def stops_after(self, tokens: Sequence[int]) -> bool:
        n = len(self.end)
        return n > 0 and len(tokens) >= n and tuple(tokens[-n:]) == self.end


@dataclass
class DecodeStats:
    """Counters a worker aggregates into its metrics."""

    calls: int = 0  # decoder calls made while generating
    tokens: int = 0  # tokens generated (forced ones not counted)
    drafted: int = 0  # drafter proposals verified
    accepted: int = 0  # drafter proposals the target agreed with
    guessed: int = 0  # previous-hypothesis tokens verified
    guess_accepted: int = 0
    seconds: float = 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_call(self) -> float:
        """Mean accepted length: tokens emitted per decoder call."""
        return self.tokens / self.calls if self.calls else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def add(self, other: DecodeStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Generation:
    tokens: list[int]  # generated tokens, the stop token excluded
    ctx: Context  # positioned after the last generated token
    stopped: bool  # a stop rule ended it (not the token budget)
    stats: DecodeStats = field(default_factory=DecodeStats)


@dataclass(frozen=True)
class Round:
    """One decoder call's result: `tokens` kept, and the context after each of them."""

    tokens: list[int]
    committed: int  # how many of `tokens` were fed unconditionally (the rest are accepted drafts)
    _base: Context
    _logits: np.ndarray  # (k + 1, V) rows from the last committed token on
    _hidden: np.ndarray  # (T, H)
    _cache: Any

    def context(self, target: Target, kept: int) -> Context:
        """The context after the first `kept` tokens of this round (kept >= 1)."""
        length = self._base.length + kept
        cache = self._cache if kept == len(self._hidden) else target.truncate(self._cache, length)
        return Context(cache, length, self._logits[kept - self.committed], self._hidden[kept - 1])


def agreeing_prefix(drafts: Sequence[int], predicted: Sequence[int]) -> int:
    """How many leading drafts equal the target's predictions."""
    n = 0
    while n < len(drafts) and drafts[n] == predicted[n]:
        n += 1
    return n


def verify(target: Target, ctx: Context, committed: Sequence[int], drafts: Sequence[int]) -> Round:
    """Feed committed tokens and drafts in one call; keep the committed ones and the agreeing drafts."""
    if not committed:
        raise ValueError("verify needs at least one committed token")
    fed = [*committed, *drafts]
    logits, hidden, cache = target.extend(
        ctx.cache, ctx.length, fed, keep=len(drafts) + 1
    )  # (k+1, V), (T, H)
    predicted = logits[:-1].argmax(-1)  # (k,) the target's choice after each committed/draft prefix
    n = agreeing_prefix(drafts, predicted.tolist())
    return Round([*committed, *drafts[:n]], len(committed), ctx, logits, hidden, cache)


def prefill(target: Target, ctx: Context, tokens: Sequence[int]) -> Context:
    """Append known tokens (a prompt piece) in one call."""
    return verify(target, ctx, tokens, ()).context(target, len(tokens))


def generate(
    target: Target,
    ctx: Context,
    stop: StopRule,
    max_tokens: int,
    drafter: Drafter | None = None,
    forced: Sequence[int] = (),
    guess: Sequence[int] = (),
) -> Generation:
    """Greedy decoding from ctx: `forced` tokens first (committed, never a stop), then the target's
    choices. `guess` (e.g. the previous hypothesis past the forced tokens) is verified as the first
    draft; the drafter proposes later rounds. The output never depends on guess or drafter."""
    stats, start = DecodeStats(), time.perf_counter()
    tokens: list[int] = []
    committed, drafts, first_generated = list(forced), list(guess), len(forced)
    while len(tokens) < max_tokens or committed:
        if not committed:
            first = ctx.next_token
            if stop.stops_before(first):
                return _done(tokens, ctx, True, stats, start, len(forced))
            committed, first_generated = [first], 0
            drafts = _first_drafts(drafter, ctx, first, drafts, max_tokens - len(tokens) - 1)
        drafts = drafts[: max(0, max_tokens - len(tokens) - len(committed))]
        round_ = verify(target, ctx, committed, drafts)
        guessing = bool(guess) and stats.calls == 0
        _count(stats, round_, len(drafts), guessing)
        if drafts and not guessing and isinstance(drafter, AdaptiveDrafter):
            drafter.observe(len(drafts), len(round_.tokens) - round_.committed)
        kept, stopped = _take(round_, first_generated, stop, tokens)
        ctx = round_.context(target, kept)
        if stopped:
            return _done(tokens, ctx, True, stats, start, len(forced))
        committed, drafts = [], []
    return _done(tokens, ctx, False, stats, start, len(forced))


def _first_drafts(
    drafter: Drafter | None, ctx: Context, first: int, guess: list[int], budget: int
) -> list[int]:
    """A pending guess that starts with the target's own token is the best draft; else ask the drafter."""
    if guess:
        return guess[1:] if guess[0] == first else []
    if drafter is None or budget <= 0:
        return []
    return drafter.propose(ctx, first, min(drafter.num_draft_tokens, budget))


def _take(round_: Round, first_generated: int, stop: StopRule, tokens: list[int]) -> tuple[int, bool]:
    """Move the round's tokens into `tokens` up to a stop: returns (round tokens kept, stopped).
    Tokens before `first_generated` were forced and never stop anything."""
    for i, token in enumerate(round_.tokens):
        generated = i >= first_generated
        if generated and i > 0 and stop.stops_before(token):
            return i, True
        tokens.append(token)
        if generated and stop.stops_after(tokens):
            return i + 1, True
    return len(round_.tokens), False


def _count(stats: DecodeStats, round_: Round, drafted: int, guessing: bool) -> None:
    accepted = len(round_.tokens) - round_.committed
    stats.calls += 1
    if guessing:
        stats.guessed += drafted
        stats.guess_accepted += accepted
    else:
        stats.drafted += drafted
        stats.accepted += accepted


def _done(
    tokens: list[int], ctx: Context, stopped: bool, stats: DecodeStats, start: float, forced: int
) -> Generation:
    stats.tokens = len(tokens) - forced
    stats.seconds = time.perf_counter() - start
    return Generation(tokens, ctx, stopped, stats)
