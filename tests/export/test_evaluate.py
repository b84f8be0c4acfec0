"""`rawwave eval`: the metric functions on known answers, and a whole run on a tiny synthetic corpus."""

import argparse
import json
from pathlib import Path

import pytest

from export import evaluate, metrics
from export.corpus import FALLBACK, Utterance
from export.dataset import write_shard
from export.speech import Voice, synthesize
from tests.models import runtime_settings

SEEN = [
    (
        Utterance("what is two plus two", "two plus two is four.", "arithmetic"),
        Voice("espeak", "en-us+m3", 175, 50),
    ),
    (Utterance("the cat sat on the mat", FALLBACK, "sentence"), Voice("flite", "awb", 1.0, 0)),
]
HELD_OUT = [(Utterance("turn on the kitchen lights", "ok.", "home"), Voice("flite", "slt", 1.0, 0))]


def test_perfect_hypothesis_scores_zero():
    refs = ["what is two plus two", "the cat sat"]
    assert metrics.word_error_rate(refs, refs) == 0.0
    assert metrics.char_error_rate(refs, [" WHAT is  two plus two ", "the cat sat"]) == 0.0


def test_error_rates_count_edits():
    assert metrics.edit_distance("kitten", "sitting") == 3
    assert metrics.word_error_rate(["a b c d"], ["a x c"]) == 0.5  # one substitution, one deletion
    assert metrics.word_error_rate(["a b"], [""]) == 1.0
    assert metrics.char_error_rate(["ab"], ["abcd"]) == 1.0


def test_matched_words_follow_the_alignment():
    ref = ["set", "a", "timer", "for", "ten", "minutes"]
    assert evaluate.matched_words(ref, ["set", "a", "timer"]) == {0, 1, 2}
    assert evaluate.matched_words(ref, ["set", "the", "timer", "for"]) == {0, 2, 3}
    assert evaluate.matched_words(ref, []) == set()


def test_voice_families():
    assert evaluate.voice_family("espeak:en-us+m3:180:50") == "espeak"
    assert evaluate.voice_family("flite:awb:1.1:0") == "flite:awb"
    assert evaluate.voice_family("flite:slt:0.9:0") == "flite:slt"


def test_noise_is_seeded_and_opus_keeps_length():
    audio = synthesize("hello there", Voice("espeak", "en-us+m3", 175, 50)).audio
    assert (evaluate.degrade(audio, "noise", 3) == evaluate.degrade(audio, "noise", 3)).all()
    assert (evaluate.degrade(audio, "noise", 3) != evaluate.degrade(audio, "noise", 4)).any()
    assert len(evaluate.degrade(audio, "opus", 0)) == len(audio)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for split, items in (("eval-seen", SEEN), ("eval-heldout", HELD_OUT)):
        write_shard(root / f"{split}-00000", [(u, synthesize(u.text, v)) for u, v in items])
    return root


def test_report_structure(model_dir: Path, corpus: Path, tmp_path: Path):
    out = tmp_path / "report.json"
    args = argparse.Namespace(model_dir=model_dir, data=corpus, limit=2, out=out, threads=1, no_mtp=False)
    assert evaluate.run(args, runtime_settings()) == 0
    report = json.loads(out.read_text())
    seen, held = report["asr"]["eval-seen"], report["asr"]["eval-heldout"]
    assert set(seen) == {"all", "espeak", "flite:awb"} and set(held) == {"all", "flite:slt"}
    for by in (*seen.values(), *held.values()):
        assert set(by) == set(evaluate.CONDITIONS)
        assert all({"utterances", "wer", "cer"} <= set(v) for v in by.values())
    assert seen["all"]["clean"]["utterances"] == 2
    by_kind = report["asr_by_kind"]["eval-seen"]  # the same transcripts, grouped by what was said
    assert set(by_kind) == {"all", "arithmetic", "sentence"} and by_kind["all"] == seen["all"]
    assert set(report["asr_by_kind"]["eval-heldout"]) == {"all", "home"}
    assert set(report["skills"]) == {"arithmetic", "fallback"}
    for skill in report["skills"].values():  # the tiny model misses some: each miss says what it answered
        assert len(skill["misses"]) == round(skill["utterances"] * (1 - skill["exact"]))
        assert all({"said", "heard", "expected", "answered"} <= set(m) for m in skill["misses"])
        low, high = skill["interval"]
        assert 0 <= low <= skill["exact"] <= high <= 1 and len(skill["items"]) == skill["utterances"]
    assert report["skills"]["arithmetic"]["items"] == [0] and report["skills"]["fallback"]["items"] == [1]
    assert report["mtp"]["identical_to_no_mtp"] is True
    assert {"acceptance", "tokens_per_call"} <= set(report["mtp"]["transcripts"])
    delay = report["delay"]
    assert delay["chunk_ms"] == 200 and delay["words"] == 11 and 0 <= delay["appeared"] <= 1
