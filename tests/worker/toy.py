"""A numpy toy target model and drafter for the pure decoding tests (no ONNX Runtime).

The "KV cache" is the tuple of tokens seen; logits depend on the last two tokens through fixed random
tables, so greedy decoding is deterministic and varied.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from worker.decoding import Context


class ToyTarget:
    def __init__(self, vocab: int = 32, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.w1 = rng.normal(size=(vocab, vocab)).astype(np.float32)
        self.w2 = rng.normal(size=(vocab, vocab)).astype(np.float32)
        self.calls = 0

    def row(self, seen: Sequence[int]) -> np.ndarray:
        last = seen[-1] if seen else 0
        before = seen[-2] if len(seen) > 1 else 0
        return self.w1[last] + 0.5 * self.w2[before]  # (V,)

    def extend(self, cache: tuple[int, ...], length: int, token_ids: Sequence[int], keep: int = 0):
        assert len(cache) == length
        self.calls += 1
        seen = list(cache)
        rows = []
        for token in token_ids:
            seen.append(int(token))
            rows.append(self.row(seen))
        logits = np.stack(rows)  # (T, V)
        return logits[-keep:] if keep else logits, logits.copy(), tuple(seen)

    def truncate(self, cache: tuple[int, ...], length: int) -> tuple[int, ...]:
        return cache[:length]

    def start(self, prompt: Sequence[int]) -> Context:
        logits, hidden, cache = self.extend((), 0, prompt)
        return Context(cache, len(cache), logits[-1], hidden[-1])


class ToyDrafter:
    """Proposes the target's true next tokens, but is wrong at a fixed pseudo-random fraction of steps."""

    def __init__(self, target: ToyTarget, num_draft_tokens: int = 3, wrong_every: int = 3) -> None:
        self.target = target
        self.num_draft_tokens = num_draft_tokens
        self.wrong_every = wrong_every

    def propose(self, ctx: Context, token: int, count: int) -> list[int]:
        return self.guesses(ctx, token, count)[0]

    def guesses(self, ctx: Context, token: int, count: int) -> tuple[list[int], list[bool]]:
        """The drafts, and which of them are the deliberate mistakes."""
        seen = [*ctx.cache, token]
        out, wrong = [], []
        for _ in range(count):
            guess = int(self.target.row(seen).argmax())
            wrong.append((sum(seen) + len(seen)) % self.wrong_every == 0)
            if wrong[-1]:
                guess = (guess + 1) % self.target.vocab
            out.append(guess)
            seen.append(guess)
        return out, wrong


class ScoredToyDrafter(ToyDrafter):
    """A ToyDrafter that knows when it guesses: probability `sure` for a right draft, `unsure` for a
    deliberate mistake (a calibrated drafter); unsure == sure: confidence says nothing."""

    def __init__(self, target: ToyTarget, num_draft_tokens: int = 3, wrong_every: int = 3,
                 sure: float = 0.9, unsure: float = 0.2) -> None:  # fmt: skip
        super().__init__(target, num_draft_tokens, wrong_every)
        self.sure, self.unsure = sure, unsure

    def propose_scored(self, ctx: Context, token: int, count: int) -> tuple[list[int], list[float]]:
        drafts, wrong = self.guesses(ctx, token, count)
        return drafts, [self.unsure if w else self.sure for w in wrong]
