"""`rawwave compare`: skills paired utterance by utterance, and the statistics it quotes."""

import argparse
import json
from pathlib import Path

import pytest

from export import compare, metrics
from rawwave.errors import RawwaveError


def skill(items: list[int], wrong: list[int]) -> dict:
    misses = [{"utterance": i, "said": "", "heard": "", "expected": "", "answered": ""} for i in wrong]
    exact = round(1 - len(wrong) / len(items), 4)
    return {"utterances": len(items), "exact": exact, "interval": [0, 1], "items": items, "misses": misses}


def report(wrong: list[int], cer: float) -> dict:
    rates = {c: {"utterances": 10, "wer": 2 * cer, "cer": cer} for c in ("clean", "opus")}
    by_kind = {"all": rates, "sentence": {"clean": {"utterances": 4, "wer": 0.9, "cer": 2 * cer}}}
    return {
        "skills": {"arithmetic": skill(list(range(10)), wrong)},
        "asr": {"eval-seen": {"all": rates}},
        "asr_by_kind": {"eval-seen": by_kind},
    }


def test_wilson_interval_brackets_the_rate():
    low, high = metrics.wilson_interval(39, 43)
    assert 0.78 < low < 39 / 43 < high < 0.97
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)
    assert metrics.wilson_interval(10, 10)[1] == 1.0


def test_sign_test_on_known_splits():
    assert metrics.paired_sign_p(5, 0) == pytest.approx(2 / 32)  # all five one way: 2 x 0.5^5
    assert metrics.paired_sign_p(0, 0) == 1.0 and metrics.paired_sign_p(3, 3) == 1.0
    assert metrics.paired_sign_p(9, 1) == metrics.paired_sign_p(1, 9) == pytest.approx(22 / 1024)


def test_skills_pair_by_utterance():
    c = compare.compare(report([1, 2, 3], 0.3), report([3, 4], 0.2))
    arith = c["skills"]["arithmetic"]
    assert arith["fixed"] == [1, 2] and arith["broken"] == [4]  # 3 is missed by both: it does not count
    assert arith["p"] == pytest.approx(1.0)
    assert c["asr"]["eval-seen"]["all"]["clean"]["cer"] == (0.3, 0.2)
    assert c["asr_by_kind"]["eval-seen"]["sentence"]["clean"]["cer"] == (0.6, 0.4)


def test_reports_on_other_utterances_refuse(tmp_path: Path):
    other = report([], 0.2)
    other["skills"]["arithmetic"]["items"] = list(range(1, 11))
    with pytest.raises(RawwaveError, match="different utterances"):
        compare.compare(report([], 0.3), other)
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({"skills": {"arithmetic": {"exact": 1.0, "misses": []}}}))
    with pytest.raises(RawwaveError, match="re-run rawwave eval"):
        compare.load_report(stale)


def test_run_writes_the_comparison(tmp_path: Path, capsys: pytest.CaptureFixture):
    base, new, out = tmp_path / "base.json", tmp_path / "new.json", tmp_path / "cmp.json"
    base.write_text(json.dumps(report([0, 1, 2, 3, 4, 5], 0.3)))
    new.write_text(json.dumps(report([], 0.2)))
    assert compare.run(argparse.Namespace(base=base, new=new, out=out)) == 0
    assert json.loads(out.read_text())["skills"]["arithmetic"]["fixed"] == [0, 1, 2, 3, 4, 5]
    printed = capsys.readouterr().out
    assert "0.031" in printed  # 6 fixed, none broken: p = 2 / 64
    assert "kind:sentence" in printed and "kind:all" not in printed
