"""Error rates shared by training, evaluation and the benchmarks (no torch, no model: plain sequences)."""

from __future__ import annotations

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
