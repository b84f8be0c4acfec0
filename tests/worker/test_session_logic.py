"""Pure streaming logic: stable prefix, segment cuts, levels (no model)."""

from __future__ import annotations

import numpy as np

from worker.session import best_cut, common_prefix, frame_dbfs, stable_text


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([7], [7]) == 1


def test_stable_text_grows_with_agreement() -> None:
    assert stable_text("", "hello world", "hello") == "hello"
    assert stable_text("hello", "hello world", "hello wor") == "hello wor"


def test_stable_text_never_shrinks() -> None:
    assert stable_text("hello wor", "hello world", "hello") == "hello wor"
    assert stable_text("hello wor", "hello world", "") == "hello wor"


def test_stable_text_trims_an_incomplete_character() -> None:
    assert stable_text("", "caf\ufffd", "caf\ufffd") == "caf"
    assert stable_text("", "café", "caf\ufffd") == "caf"


def test_stable_text_is_always_a_prefix_of_text() -> None:
    rng = np.random.default_rng(0)
    alphabet = list("ab \ufffd")
    previous = ""
    for _ in range(300):
        text = previous + "".join(rng.choice(alphabet, size=int(rng.integers(0, 4))))
        candidate = text[: int(rng.integers(0, len(text) + 1))]
        stable = stable_text(previous, text, candidate)
        assert text.startswith(stable)
        assert stable.startswith(previous)
        assert not stable.endswith("\ufffd") or stable == previous
        previous = stable


def test_best_cut_picks_the_quietest_stretch_of_the_second_half() -> None:
    levels = [-20.0] * 100
    levels[30:40] = [-90.0] * 10  # first half: never chosen
    levels[70:76] = [-80.0] * 6
    keep = best_cut(levels, window=4)
    assert 70 < keep <= 76


def test_best_cut_without_silence_keeps_a_late_cut() -> None:
    keep = best_cut([-20.0] * 50, window=5)
    assert 25 <= keep <= 50


def test_best_cut_prefers_the_latest_of_equal_silences() -> None:
    levels = [-20.0] * 100
    levels[60:65] = [-80.0] * 5
    levels[90:95] = [-80.0] * 5
    assert 90 < best_cut(levels, window=5) <= 95


def test_frame_dbfs() -> None:
    assert frame_dbfs(np.zeros(640, np.int16)) < -150
    full = np.full(640, 32767, np.int16)
    assert abs(frame_dbfs(full)) < 0.01
    assert abs(frame_dbfs((full // 10).astype(np.int16)) + 20) < 0.1
