"""MTP speculative decoding on the real exported model: token-for-token the same as plain greedy."""

from __future__ import annotations

import numpy as np

from worker.decoding import Context, DecodeStats, StopRule, generate
from worker.runtime import Runtime


def audio_context(runtime: Runtime, seed: int, frames: int) -> Context:
    """A respond prompt around random audio (one chunk of it for an interleaved model): what follows the
    forced audio suffix is a transcript and a response, or a response."""
    config = runtime.config
    prefix = runtime.start(runtime.encode(config.prompt.respond_prefix))
    pcm = (np.random.default_rng(seed).normal(size=frames * config.frame_samples) * 3000).astype(np.int16)
    embeds = runtime.embed_audio(pcm)  # (frames, H)
    if config.streaming.format == "interleaved":
        wrap = runtime.embed_tokens([config.tokens.boa, config.tokens.eoa])
        embeds = np.concatenate([wrap[:1], embeds, wrap[1:]])
    logits, hidden, cache = runtime.extend_embeds(prefix.cache, prefix.length, embeds, keep=1)
    return Context(cache, prefix.length + len(embeds), logits[-1], hidden[-1])


def test_mtp_on_and_off_give_identical_tokens(drafter_runtime: Runtime) -> None:
    runtime = drafter_runtime
    suffix = runtime.encode(runtime.config.prompt.audio_suffix)
    stop = StopRule(frozenset(runtime.config.tokens.eos))
    plain, fast = DecodeStats(), DecodeStats()
    for seed in range(16):
        ctx = audio_context(runtime, seed, frames=5 + 7 * seed)
        off = generate(runtime, ctx, stop, 48, None, forced=suffix)
        on = generate(runtime, ctx, stop, 48, runtime.drafter, forced=suffix)
        assert on.tokens == off.tokens, f"seed {seed}"
        assert on.ctx.length == off.ctx.length
        plain.add(off.stats)
        fast.add(on.stats)
    assert fast.drafted > 0
    print(f"\nplain greedy {plain.tokens_per_s:.0f} tok/s; MTP {fast.tokens_per_s:.0f} tok/s, "
          f"acceptance {fast.acceptance:.2f}, {fast.tokens_per_call:.2f} tokens/call")  # fmt: skip


def test_one_call_drafts_equal_one_step_at_a_time(drafter_runtime: Runtime) -> None:
    """drafter_steps (a whole round per call) proposes exactly what the step graph proposes call by call."""
    drafter = drafter_runtime.drafter
    assert drafter is not None and drafter.steps is not None
    k = drafter.num_draft_tokens
    for seed in range(12):
        ctx = audio_context(drafter_runtime, seed, frames=4 + 9 * seed)
        for token in (ctx.next_token, (seed * 37) % drafter_runtime.config.vocab_size):
            stepped, stepped_p = _step_graph_drafts(drafter, ctx, token, k)
            assert drafter.propose(ctx, token, k) == stepped, f"seed {seed}, token {token}"
            drafts, probabilities = drafter.propose_scored(ctx, token, k)
            assert drafts == stepped
            assert np.allclose(probabilities, stepped_p, atol=1e-4)
            assert all(1 / drafter_runtime.config.vocab_size <= p <= 1 for p in probabilities)


def _step_graph_drafts(drafter, ctx: Context, token: int, count: int) -> tuple[list[int], list[float]]:
    steps, drafter.steps = drafter.steps, None
    try:
        assert drafter.propose(ctx, token, count) == drafter.propose_scored(ctx, token, count)[0]
        return drafter.propose_scored(ctx, token, count)
    finally:
        drafter.steps = steps


def test_one_token_at_a_time_reference(runtime: Runtime) -> None:
    """generate() equals the most literal greedy loop: argmax, feed, repeat."""
    ctx = audio_context(runtime, 99, frames=12)
    suffix = runtime.encode(runtime.config.prompt.audio_suffix)
    logits, _, cache = runtime.extend(ctx.cache, ctx.length, suffix, keep=1)
    length, row, literal = ctx.length + len(suffix), logits[-1], []
    for _ in range(24):
        token = int(row.argmax())
        literal.append(token)
        logits, _, cache = runtime.extend(cache, length, [token], keep=1)
        length, row = length + 1, logits[-1]
    out = generate(runtime, ctx, StopRule(frozenset()), 24 + len(suffix), runtime.drafter, forced=suffix)
    assert out.tokens[len(suffix) :] == literal
