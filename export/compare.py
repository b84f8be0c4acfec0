"""`rawwave compare BASE.json NEW.json`: two `rawwave eval` reports on the same corpus side by side, each
skill compared utterance by utterance.

Two stages trained the same way land several answers apart on a skill's few dozen utterances, so a
difference in exact-match alone does not say which model is better. Paired on the same utterances, only
those the two models answered differently count: the sign test over them says how often a split at
least that uneven comes from two equally good models.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from export.dataset import stamped
from export.metrics import paired_sign_p
from rawwave.errors import RawwaveError
from rawwave.settings import Settings

MEASURES = ("wer", "cer")


def load_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RawwaveError(f"{path}: not a readable rawwave eval report ({e})") from e
    if "skills" not in report or any("items" not in v for v in report["skills"].values()):
        raise RawwaveError(f"{path}: no per-utterance skill items; re-run rawwave eval to write them")
    return report


def compare_skill(name: str, base: dict, new: dict) -> dict:
    """Which utterances the new model answers right that the base missed (fixed), and the reverse."""
    if base["items"] != new["items"]:
        raise RawwaveError(f"skill {name}: the reports asked different utterances (other corpus or --limit)")
    base_wrong = {m["utterance"] for m in base["misses"]}
    new_wrong = {m["utterance"] for m in new["misses"]}
    fixed, broken = sorted(base_wrong - new_wrong), sorted(new_wrong - base_wrong)
    return {
        "utterances": base["utterances"],
        "base": base["exact"],
        "new": new["exact"],
        "fixed": fixed,
        "broken": broken,
        "p": round(paired_sign_p(len(fixed), len(broken)), 4),
    }


def compare_asr(base: dict, new: dict) -> dict:
    """Every split, group and condition both reports measured: (base, new) WER and CER."""
    return {
        split: {
            group: {
                condition: {m: (by[m], new[split][group][condition][m]) for m in MEASURES}
                for condition, by in conditions.items()
            }
            for group, conditions in groups.items()
            if group in new.get(split, {})
        }
        for split, groups in base.items()
    }


def compare(base: dict, new: dict) -> dict:
    """Skills paired; WER/CER per voice family ("asr") and, where both reports have them, per utterance
    kind ("asr_by_kind": which kinds a change in the overall CER came from)."""
    shared = sorted(set(base["skills"]) & set(new["skills"]))
    return {
        "skills": {k: compare_skill(k, base["skills"][k], new["skills"][k]) for k in shared},
        "asr": compare_asr(base["asr"], new["asr"]),
        "asr_by_kind": compare_asr(base.get("asr_by_kind", {}), new.get("asr_by_kind", {})),
    }


def table(comparison: dict) -> str:
    lines = [f"{'skill':<12} {'n':>4}  {'base':>6} {'new':>6}  {'fixed':>5} {'broken':>6}  {'p':>6}"]
    for k, c in comparison["skills"].items():
        lines.append(
            f"{k:<12} {c['utterances']:>4}  {c['base']:>6.3f} {c['new']:>6.3f}"
            f"  {len(c['fixed']):>5} {len(c['broken']):>6}  {c['p']:>6.3f}"
        )
    lines.append(f"{'split':<13} {'group':<15} {'condition':<9} {'base WER/CER':>15} {'new WER/CER':>15}")
    for split, groups in comparison["asr"].items():
        lines += [asr_row(split, group, c, m) for group, cs in groups.items() for c, m in cs.items()]
    for split, kinds in comparison["asr_by_kind"].items():  # "all" is the voice families' "all" again
        rows = [(kind, c, m) for kind, cs in kinds.items() if kind != "all" for c, m in cs.items()]
        lines += [asr_row(split, f"kind:{kind}", c, m) for kind, c, m in rows]
    return "\n".join(lines)


def asr_row(split: str, group: str, condition: str, m: dict) -> str:
    (base_wer, new_wer), (base_cer, new_cer) = m["wer"], m["cer"]
    rates = f"{base_wer:>7.3f}/{base_cer:<7.3f} {new_wer:>7.3f}/{new_cer:<7.3f}"
    return f"{split:<13} {group:<15} {condition:<9} {rates}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", type=Path, help="the report to compare against (e.g. the served model's)")
    parser.add_argument("new", type=Path, help="the candidate's report")
    parser.add_argument("--out", type=Path, default=None, help="also write the comparison as JSON")


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    comparison = compare(load_report(args.base), load_report(args.new))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(comparison, indent=2) + "\n")
        stamped(f"compare: written to {args.out}")
    print(table(comparison))  # noqa: T201
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m export.compare", description=__doc__.split("\n")[0])
    add_arguments(cli)
    sys.exit(run(cli.parse_args()))
