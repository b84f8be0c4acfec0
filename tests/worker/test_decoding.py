"""Pure decoding logic on a numpy toy model: speculation is lossless, stops and budgets are exact."""

from __future__ import annotations

import numpy as np
import pytest

from tests.worker.toy import ScoredToyDrafter, ToyDrafter, ToyTarget
from worker.decoding import AdaptiveDrafter, RoundCosts, StopRule, agreeing_prefix, generate, prefill, verify


def plain_greedy(target: ToyTarget, prompt: list[int], stop: StopRule, max_tokens: int) -> list[int]:
    """The reference: one token at a time, straight from the logits."""
    seen, out = list(prompt), []
    while len(out) < max_tokens:
        token = int(target.row(seen).argmax())
        if token in stop.eos:
            break
        out.append(token)
        seen.append(token)
        if stop.stops_after(out):
            break
    return out


def test_agreeing_prefix() -> None:
    assert agreeing_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert agreeing_prefix([], [5]) == 0
    assert agreeing_prefix([9], [1]) == 0
    assert agreeing_prefix([1, 2], [1, 2]) == 2


def test_verify_keeps_committed_and_agreeing_drafts() -> None:
    target = ToyTarget()
    ctx = target.start([1, 2])
    truth = plain_greedy(target, [1, 2, 7], StopRule(frozenset()), 3)
    round_ = verify(target, ctx, [7], [truth[0], truth[1], (truth[2] + 1) % target.vocab])
    assert round_.tokens == [7, truth[0], truth[1]]
    after = round_.context(target, len(round_.tokens))
    assert after.length == ctx.length + 3
    assert after.next_token == truth[2]


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_equals_greedy(seed: int, k: int) -> None:
    target = ToyTarget(seed=seed)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, target.vocab, size=4).tolist()
    stop = StopRule(frozenset({int(rng.integers(0, target.vocab))}))
    reference = plain_greedy(target, prompt, stop, 40)
    drafter = ToyDrafter(target, num_draft_tokens=k, wrong_every=2 + seed % 4)
    plain = generate(target, target.start(prompt), stop, 40)
    fast = generate(target, target.start(prompt), stop, 40, drafter=drafter)
    assert plain.tokens == reference
    assert fast.tokens == reference
    adaptive = generate(target, target.start(prompt), stop, 40, drafter=AdaptiveDrafter(drafter))
    assert adaptive.tokens == reference
    assert fast.ctx.length == plain.ctx.length
    assert fast.ctx.next_token == plain.ctx.next_token
    assert fast.stats.calls <= plain.stats.calls


def test_drafter_speeds_up_and_counts() -> None:
    target = ToyTarget(seed=3)
    drafter = ToyDrafter(target, num_draft_tokens=4, wrong_every=1000)  # almost always right
    out = generate(target, target.start([1]), StopRule(frozenset()), 30, drafter=drafter)
    assert len(out.tokens) == 30
    assert out.stats.acceptance > 0.9
    assert out.stats.tokens_per_call > 3


def test_drafts_end_before_a_drafted_stop() -> None:
    """Short outputs (an interleaved chunk's words) end inside a round: the drafted stop and what follows
    it are never verified (the target's logits tell the stop for free), and the round is still one call."""
    checked = 0
    for seed in range(20):
        target = ToyTarget(seed=seed)
        prompt = [seed % target.vocab]
        truth = plain_greedy(target, prompt, StopRule(frozenset()), 3)
        stop = StopRule(frozenset({truth[2]}))  # the output is two tokens, then the stop
        if truth[2] in truth[:2]:
            continue
        drafter = ToyDrafter(target, num_draft_tokens=4, wrong_every=1000)
        out = generate(target, target.start(prompt), stop, 30, drafter=drafter)
        assert out.tokens == truth[:2]
        assert (out.stats.calls, out.stats.drafted, out.stats.accepted) == (1, 1, 1)
        assert out.stopped and out.ctx.next_token == truth[2]
        checked += 1
    assert checked >= 10


def test_guess_is_verified_with_forced_tokens_in_one_call() -> None:
    target = ToyTarget(seed=5)
    ctx = target.start([3, 4])
    stop = StopRule(frozenset())
    full = generate(target, ctx, stop, 12, forced=[9, 9])
    target.calls = 0
    again = generate(target, ctx, stop, 12, forced=[9, 9], guess=full.tokens[2:])
    assert again.tokens == full.tokens
    assert target.calls == 1
    assert again.stats.guess_accepted == 10


def test_wrong_guess_changes_nothing() -> None:
    target = ToyTarget(seed=6)
    ctx = target.start([3])
    stop = StopRule(frozenset())
    full = generate(target, ctx, stop, 10, forced=[1])
    wrong = [(t + 1) % target.vocab for t in full.tokens[1:]]
    assert generate(target, ctx, stop, 10, forced=[1], guess=wrong).tokens == full.tokens


def test_end_sequence_is_kept_and_stops() -> None:
    target = ToyTarget(seed=7)
    reference = plain_greedy(target, [2], StopRule(frozenset()), 20)
    end = reference[5]
    stop = StopRule(frozenset(), end=(end,))
    out = generate(target, target.start([2]), stop, 20, drafter=ToyDrafter(target, 4, 1000))
    assert out.tokens == reference[: reference.index(end) + 1]
    assert out.stopped
    assert out.ctx.length == 1 + len(out.tokens)


def test_forced_tokens_never_stop() -> None:
    target = ToyTarget(seed=8)
    stop = StopRule(frozenset({5}), end=(6,))
    out = generate(target, target.start([1]), stop, 10, forced=[5, 6])
    assert out.tokens[:2] == [5, 6]


def test_eos_draft_is_cut_and_context_stays_before_it() -> None:
    target = ToyTarget(seed=9)
    reference = plain_greedy(target, [4], StopRule(frozenset()), 20)
    eos = reference[3]
    stop = StopRule(frozenset({eos}))
    out = generate(target, target.start([4]), stop, 20, drafter=ToyDrafter(target, 5, 1000))
    assert out.tokens == reference[: reference.index(eos)]
    assert out.ctx.next_token == eos
    assert out.ctx.length == 1 + len(out.tokens)


def test_budget_is_exact() -> None:
    target = ToyTarget(seed=10)
    out = generate(target, target.start([1]), StopRule(frozenset()), 7, drafter=ToyDrafter(target, 5, 1000))
    assert len(out.tokens) == 7
    assert not out.stopped


def test_prefill_matches_token_by_token() -> None:
    target = ToyTarget(seed=11)
    ctx = prefill(target, target.start([1]), [2, 3, 4])
    assert ctx.length == 4
    assert np.array_equal(ctx.logits, target.row([1, 2, 3, 4]))


class FixedCosts(RoundCosts):
    """Round costs as given, whatever the clock says: the policy's choices become deterministic."""

    def __init__(self, seconds: list[float]) -> None:
        super().__init__(len(seconds) - 1)
        self.given = list(seconds)

    def observe(self, drafted: int, seconds: float) -> None:
        pass

    def unmeasured(self) -> list[int]:
        return []

    def seconds(self, drafted: int) -> float:
        return self.given[drafted]


CHEAP_DRAFTS = [1.0, 1.1, 1.2, 1.3, 1.4]  # a round's cost by draft length 0..4


def test_adaptive_drafter_backs_off_a_useless_drafter_and_probes() -> None:
    target = ToyTarget(seed=12)
    useless = ToyDrafter(target, num_draft_tokens=4, wrong_every=1)  # always wrong
    adaptive = AdaptiveDrafter(useless, FixedCosts(CHEAP_DRAFTS))
    out = generate(target, target.start([1]), StopRule(frozenset()), 60, drafter=adaptive)
    assert out.tokens == plain_greedy(target, [1], StopRule(frozenset()), 60)
    assert adaptive.choose(4) == 0
    assert 0 < out.stats.drafted < 16 + 60 // AdaptiveDrafter.PROBE_EVERY  # a few rounds, then probes


def test_adaptive_drafter_keeps_a_good_drafter_at_full_length() -> None:
    target = ToyTarget(seed=13)
    adaptive = AdaptiveDrafter(
        ToyDrafter(target, num_draft_tokens=4, wrong_every=1000), FixedCosts(CHEAP_DRAFTS)
    )
    generate(target, target.start([1]), StopRule(frozenset()), 40, drafter=adaptive)
    assert adaptive.choose(4) == 4


def test_adaptive_drafter_stops_drafting_when_drafts_cost_more_than_they_save() -> None:
    target = ToyTarget(seed=14)
    adaptive = AdaptiveDrafter(ToyDrafter(target, num_draft_tokens=4, wrong_every=1000),
                               FixedCosts([1.0, 2.5, 4.0, 5.5, 7.0]))  # fmt: skip
    out = generate(target, target.start([1]), StopRule(frozenset()), 40, drafter=adaptive)
    assert out.stats.drafted <= 40 // AdaptiveDrafter.PROBE_EVERY  # probes only
    assert out.stats.accepted == out.stats.drafted
    assert adaptive.choose(4) == 0  # 1 token per 1.0 s beats at most k + 1 tokens per (1 + 1.5 k) s


def test_round_costs_are_measured_before_they_are_trusted() -> None:
    target = ToyTarget(seed=15)
    costs = RoundCosts(4)
    adaptive = AdaptiveDrafter(ToyDrafter(target, num_draft_tokens=4, wrong_every=3), costs)
    out = generate(target, target.start([1]), StopRule(frozenset()), 30, drafter=adaptive)
    assert out.tokens == plain_greedy(target, [1], StopRule(frozenset()), 30)
    assert costs.unmeasured() == []
    assert all(costs.seconds(k) > 0 for k in range(5))


def test_a_stale_price_is_measured_afresh() -> None:
    """Lengths priced high once (slow first calls) and never chosen since become unmeasured after STALE
    rounds, and their old samples no longer count once they are measured again."""
    costs = RoundCosts(2)
    for drafted, seconds in ((0, 1.0), (1, 50.0), (2, 50.0)):
        for _ in range(RoundCosts.MIN_SAMPLES):
            costs.observe(drafted, seconds)
    assert costs.unmeasured() == [] and costs.seconds(2) == 50.0
    for _ in range(RoundCosts.STALE + 1):
        costs.observe(0, 1.0)
    assert costs.unmeasured() == [1, 2]
    for _ in range(RoundCosts.MIN_SAMPLES):
        assert 2 in costs.unmeasured()
        costs.observe(2, 1.2)
    assert costs.seconds(2) == 1.2 and costs.unmeasured() == [1]
    assert costs.seconds(0) == 1.0  # measured all along: never stale


def test_sessions_share_what_a_drafter_is_worth_per_part() -> None:
    """A new session's response drafting starts from what earlier sessions' responses taught, and a
    part that has taught nothing yet (or drafts badly) keeps its own estimate."""
    target = ToyTarget(seed=16)
    good = ToyDrafter(target, num_draft_tokens=4, wrong_every=1000)
    good.acceptance_counts = {}  # type: ignore[attr-defined]  # as a runtime drafter carries them
    first = AdaptiveDrafter(good, FixedCosts(CHEAP_DRAFTS), part="response")
    generate(target, target.start([1]), StopRule(frozenset()), 40, drafter=first)
    costly = [1.0, 1.5, 2.0, 2.5, 3.0]  # pays only for a drafter known to be good
    later = AdaptiveDrafter(good, FixedCosts(costly), part="response")
    assert later.acceptance == first.acceptance > 0.9 and later.choose(4) == 4
    fresh = AdaptiveDrafter(good, FixedCosts(costly), part="transcript")
    assert fresh.acceptance == 0.5 and fresh.choose(4) == 0


def test_short_sessions_probe_their_shared_estimate() -> None:
    """Where no draft pays at the prior, the probes that would show a good drafter come every PROBE_EVERY
    idle rounds of the part, not of one session: 10-token responses would never reach one."""
    target = ToyTarget(seed=17)
    good = ToyDrafter(target, num_draft_tokens=4, wrong_every=1000)
    good.acceptance_counts = {}  # type: ignore[attr-defined]  # as a runtime drafter carries them
    costs = FixedCosts([1.0, 1.6, 1.9, 2.2, 2.5])  # at the prior (0.5) no draft pays; at 0.9 four do
    assert AdaptiveDrafter(good, costs, part="response").choose(4) == 0
    for session in range(2 * AdaptiveDrafter.PROBE_EVERY // 10):
        adaptive = AdaptiveDrafter(good, costs, part="response")
        generate(target, target.start([1 + session]), StopRule(frozenset()), 10, drafter=adaptive)
    assert adaptive.acceptance > 0.6 and adaptive.choose(4) == 4


def test_unconfident_drafts_are_not_verified() -> None:
    """A round stops at the first draft the drafter doubts: a calibrated drafter's misses go unverified,
    so what is verified is mostly accepted, and the output is the same."""
    target = ToyTarget(seed=18)
    reference = plain_greedy(target, [1], StopRule(frozenset()), 60)
    outs = {}
    for confidence in (0.0, 0.5):
        drafter = ScoredToyDrafter(target, num_draft_tokens=4, wrong_every=3)
        adaptive = AdaptiveDrafter(drafter, FixedCosts(CHEAP_DRAFTS), confidence=confidence)
        outs[confidence] = generate(target, target.start([1]), StopRule(frozenset()), 60, drafter=adaptive)
        assert outs[confidence].tokens == reference
    ungated, gated = outs[0.0].stats, outs[0.5].stats
    assert gated.acceptance == 1.0 > ungated.acceptance
    assert gated.drafted < ungated.drafted


def test_a_chain_cut_by_doubt_counts_against_drafting() -> None:
    """The estimate prices what a round of k delivers: a drafter that doubts every draft yields nothing
    however right it is, and the policy stops asking it."""
    target = ToyTarget(seed=19)
    doubtful = ScoredToyDrafter(target, num_draft_tokens=4, wrong_every=1000, sure=0.1, unsure=0.1)
    adaptive = AdaptiveDrafter(doubtful, FixedCosts(CHEAP_DRAFTS), confidence=0.5)
    out = generate(target, target.start([1]), StopRule(frozenset()), 60, drafter=adaptive)
    assert out.stats.drafted == 0
    assert adaptive.acceptance < 0.2 and adaptive.choose(4) == 0


def test_drafts_past_the_output_end_count_as_misses() -> None:
    """Two-token outputs end every round after one kept draft, however right the drafter: the rest of
    the round is paid for and unused, so the estimate halves and the policy asks for fewer drafts."""
    target = ToyTarget(seed=20)
    drafter = ScoredToyDrafter(target, num_draft_tokens=4, wrong_every=1000)
    adaptive = AdaptiveDrafter(drafter, FixedCosts(CHEAP_DRAFTS), confidence=0.5)
    for seed in range(30):
        prompt = [seed % target.vocab]
        truth = plain_greedy(target, prompt, StopRule(frozenset()), 3)
        if truth[2] in truth[:2]:
            continue
        out = generate(target, target.start(prompt), StopRule(frozenset({truth[2]})), 30, drafter=adaptive)
        assert out.tokens == truth[:2]
        assert out.stats.acceptance == 1.0
    assert 0.4 < adaptive.acceptance < 0.6
    assert adaptive.choose(4) == 2  # CHEAP_DRAFTS at a = 0.5: 1.75 tokens per 1.2 beats 1.94 per 1.4
