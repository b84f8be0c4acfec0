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
from collections import deque
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
    """Optionally also `propose_scored(ctx, token, count) -> (drafts, probabilities)`: the drafter's own
    probability of each guess, which AdaptiveDrafter's confidence gate reads (worker.runtime's has it)."""

    num_draft_tokens: int

    def propose(self, ctx: Context, token: int, count: int) -> list[int]:
        """Guess `count` tokens that follow `token`, the target's next token after ctx."""
        ...


class RoundCosts:
    """Seconds per decoding round by draft length (0..k): a property of the hardware and the graphs, not
    of the audio, so one table is shared by every session of a drafter. The median of the last WINDOW
    rounds, trusted from MIN_SAMPLES on: a moving average let one slow first call price a length for
    hundreds of rounds.

    A price expires STALE rounds (of any length) after its length was last measured, and is then measured
    afresh: a length priced high once (the first calls of a fresh process are slow) was never chosen
    again, so nothing corrected it, and how much the same evaluation drafted its responses varied
    2.5-fold between runs."""

    WINDOW = 32
    MIN_SAMPLES = 3
    STALE = 512  # re-measuring a length costs MIN_SAMPLES rounds of it: under 1% of rounds

    def __init__(self, num_draft_tokens: int) -> None:
        self.samples: list[deque[float]] = [deque(maxlen=self.WINDOW) for _ in range(num_draft_tokens + 1)]
        self.medians = [float("nan")] * (num_draft_tokens + 1)  # kept current: choosing is per round
        self.rounds = 0
        self.last_seen = [0] * (num_draft_tokens + 1)  # the round each length was last measured in

    def observe(self, drafted: int, seconds: float) -> None:
        self.rounds += 1
        window = self.samples[drafted]
        if self.stale(drafted):
            window.clear()
        window.append(seconds)
        self.last_seen[drafted] = self.rounds
        self.medians[drafted] = sorted(window)[len(window) // 2]

    def stale(self, drafted: int) -> bool:
        return self.rounds - self.last_seen[drafted] > self.STALE

    def unmeasured(self) -> list[int]:
        return [k for k, s in enumerate(self.samples) if len(s) < self.MIN_SAMPLES or self.stale(k)]

    def seconds(self, drafted: int) -> float:
        return self.medians[drafted]


@dataclass
class AcceptanceCounts:
    """Decayed counts behind P(a draft is accepted | the previous one was): drafts accepted, and rounds
    that rejected one. A runtime drafter keeps one per part of the output (transcripts, responses) for
    all its sessions, as it keeps one RoundCosts: how well it guesses is a property of the drafter and
    of what is being written, and a 30-token response is too short to learn it from scratch."""

    accepted: float = 0.0
    rejected: float = 0.0
    idle_rounds: int = 0  # rounds without drafts since counting began: probes are due every PROBE_EVERY


class AdaptiveDrafter:
    """Drafts as many tokens as maximise expected tokens per second, so speculation never costs speed.

    A round that asks the drafter for k tokens emits 1 + a + a^2 + .. + a^k tokens in expectation when
    each drafted position yields a kept token with probability a given the previous one did (estimated
    per part of the output, shared by sessions, with decay), and costs `costs.seconds(k)` (measured;
    shared). Each length is measured once before it is trusted; when no drafting pays, a one-token probe
    every PROBE_EVERY idle rounds of the part (over all the sessions that share its estimate: a response
    is shorter than that) keeps the estimate fresh.

    Within a round, drafts stop at the first one the drafter itself gives less than `confidence`
    probability (transformers' assistant_confidence_threshold): verifying a likely miss costs a wider
    decoder call and saves nothing. A chain that ends short of k counts against a whatever ended it (a
    rejection, an unconfident draft, a drafted stop, the output's end): each leaves the rest of the round
    paid for and unused, so the estimate prices what a round of k delivers, and a part whose outputs are a
    token or two (an interleaved chunk's words) learns that drafting it rarely pays. Only speed changes:
    verification keeps the output exact."""

    PROBE_EVERY = 32  # a probe costs about a round: ~3% when drafting does not pay
    DECAY = 0.95  # per round, on the acceptance counts: about the last 20 rounds
    # Drafting must promise this much more than plain rounds: round costs drift with the cache length and
    # the machine (a plain round's median moved 35% within 40 utterances), and a part that gains at most
    # a few percent (an interleaved chunk's words) lost 7-13% when noise made it look worth drafting.
    MARGIN = 1.1

    def __init__(
        self,
        inner: Drafter,
        costs: RoundCosts | None = None,
        part: str | None = None,
        confidence: float = 0.0,
    ) -> None:
        self.inner = inner
        self.num_draft_tokens = inner.num_draft_tokens
        self.confidence = confidence
        shared = getattr(inner, "round_costs", None)  # a runtime drafter carries one table for all sessions
        self.costs = costs or shared or RoundCosts(inner.num_draft_tokens)
        counts = getattr(inner, "acceptance_counts", None)  # and one estimate per part
        self.counts = (
            counts.setdefault(part, AcceptanceCounts()) if part and counts is not None else AcceptanceCounts()
        )
        self.asked = 0  # drafts asked of the inner drafter this round: what the round is priced as

    @property
    def acceptance(self) -> float:
        """P(a drafted position yields a kept token | the previous one did), with a uniform prior."""
        c = self.counts
        return (c.accepted + 1) / (c.accepted + c.rejected + 2)

    def choose(self, count: int) -> int:
        """The draft length for the next round, at most `count`."""
        unmeasured = [k for k in self.costs.unmeasured() if k <= count]
        if unmeasured:
            return unmeasured[-1]
        a = self.acceptance
        rates = [sum(a**i for i in range(k + 1)) / self.costs.seconds(k) for k in range(count + 1)]
        best = max(range(count + 1), key=rates.__getitem__)
        return best if rates[best] >= self.MARGIN * rates[0] else 0

    def propose(self, ctx: Context, token: int, count: int) -> list[int]:
        length = self.choose(min(count, self.num_draft_tokens))
        if length == 0:
            self.counts.idle_rounds += 1
            if self.counts.idle_rounds % self.PROBE_EVERY == 0:
                length = 1
        self.asked = length
        if not length:
            return []
        scored = getattr(self.inner, "propose_scored", None)
        if scored is None or self.confidence <= 0:
            return self.inner.propose(ctx, token, length)
        drafts, probabilities = scored(ctx, token, length)
        confident = next((i for i, p in enumerate(probabilities) if p < self.confidence), len(drafts))
        return drafts[:confident]

    def observe(self, accepted: int, seconds: float | None = None) -> None:
        """A finished round: `accepted` drafts kept, in `seconds`."""
        asked, self.asked = self.asked, 0
        if seconds is not None:
            self.costs.observe(asked, seconds)
        if asked:
            c = self.counts
            c.accepted = self.DECAY * c.accepted + accepted
            c.rejected = self.DECAY * c.rejected + (accepted < asked)


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
        round_start = time.perf_counter()
        if not committed:
            first = ctx.next_token
            if stop.stops_before(first):
                return _done(tokens, ctx, True, stats, start, len(forced))
            committed, first_generated = [first], 0
            drafts = _first_drafts(drafter, ctx, first, drafts, max_tokens - len(tokens) - 1, stop)
        drafts = drafts[: max(0, max_tokens - len(tokens) - len(committed))]
        round_ = verify(target, ctx, committed, drafts)
        guessing = bool(guess) and stats.calls == 0
        kept, stopped = _take(round_, first_generated, stop, tokens)
        accepted, counted = _accepted(round_, kept, stopped, stop, len(drafts))
        _count(stats, accepted, counted, guessing)
        ctx = round_.context(target, kept)
        if isinstance(drafter, AdaptiveDrafter) and not guessing and len(committed) == 1:
            seconds = time.perf_counter() - round_start  # a plain round: one committed token + drafts
            drafter.observe(accepted, seconds)
        if stopped:
            return _done(tokens, ctx, True, stats, start, len(forced))
        committed, drafts = [], []
    return _done(tokens, ctx, False, stats, start, len(forced))


def _first_drafts(
    drafter: Drafter | None, ctx: Context, first: int, guess: list[int], budget: int, stop: StopRule
) -> list[int]:
    """A pending guess that starts with the target's own token is the best draft; else ask the drafter.
    Drafts end before a drafted stop: the target's logits tell a stop for free, so verifying one saves
    no call (an interleaved chunk's words end in one: ~40% of transcript drafts)."""
    if guess:
        return guess[1:] if guess[0] == first else []
    if drafter is None or budget <= 0:
        return []
    drafts = drafter.propose(ctx, first, min(drafter.num_draft_tokens, budget))
    return next((drafts[:i] for i, t in enumerate(drafts) if stop.stops_before(t)), drafts)


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


def _accepted(round_: Round, kept: int, stopped: bool, stop: StopRule, drafted: int) -> tuple[int, int]:
    """(accepted, counted) drafts of a round. Drafts past the output's stop count for nothing, agreed or
    not; a guessed stop token the target agreed with is a right guess (it ends the output, it is no token;
    a drafter's drafts end before a stop, see _first_drafts)."""
    accepted = max(0, kept - round_.committed)
    if not stopped:
        return accepted, drafted
    hit = kept < len(round_.tokens) and stop.stops_before(round_.tokens[kept])
    return accepted + hit, accepted + hit


def _count(stats: DecodeStats, accepted: int, drafted: int, guessing: bool) -> None:
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
