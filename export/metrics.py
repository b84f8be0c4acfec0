"""Error rates shared by training, evaluation and the benchmarks (no torch, no model: plain sequences)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def words_of(text: str) -> list[str]:
    return text.lower().split()


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance between two sequences (characters or words)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1]


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    errors = sum(edit_distance(words_of(r), words_of(h)) for r, h in zip(refs, hyps, strict=True))
    return errors / max(1, sum(len(words_of(r)) for r in refs))


def char_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    errors = sum(
        edit_distance(" ".join(words_of(r)), " ".join(words_of(h))) for r, h in zip(refs, hyps, strict=True)
    )
    return errors / max(1, sum(len(" ".join(words_of(r))) for r in refs))


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% score interval of a rate hits / n. With a skill's few dozen evaluation utterances the
    interval is wide (39 of 43 right reads 0.78-0.96), and a point rate alone hides that."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = hits / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, center - half), min(1.0, center + half)


def paired_sign_p(only_a: int, only_b: int) -> float:
    """Two-sided exact sign (McNemar) test over the items that two models answered differently: the
    chance of a split at least this uneven if either model were as likely to be the one right."""
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)
