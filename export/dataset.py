"""The synthesized speech corpus on disk: parallel, resumable generation into shards, and a reader.

Layout under --out (default data/corpus):
  manifest.json            generation settings and the finished shards
  {split}-{k:05d}.npy      int16 16 kHz audio of shard k's utterances, concatenated
  {split}-{k:05d}.jsonl    one record per utterance: offset, samples, text, response, kind, voice, words
Splits: "train" (training voices, corpus.sample text), "eval-seen" (the committed evaluation sentences
in training voices) and "eval-heldout" (the same sentences in the held-out voice family).
A shard is finished once its .jsonl exists (written last, atomically); a restart skips finished shards.
Utterance i of a split is drawn from its own seeded generator, so the corpus does not depend on the
number of workers or on restarts. --seed draws the training split; the evaluation splits are always drawn
from EVAL_SEED, so that corpora made with other seeds (fresh training utterances) speak the evaluation set
with the same voices and every evaluation compares with every other.
"""

import argparse
import json
import multiprocessing
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from export import corpus, speech

FORMAT_VERSION = 1
MAX_SECONDS = 12.0  # utterances longer than this are redrawn
EVAL_SEED = 0  # the evaluation splits' voices, whatever --seed draws the training split


@dataclass(frozen=True)
class DataSettings:
    out: str = "data/corpus"  # where shards and manifest.json go
    seed: int = 0  # the training split is a function of this seed (the evaluation splits: EVAL_SEED)
    count: int = 100_000  # training utterances (rounded up to whole shards)
    shard_size: int = 500  # utterances per shard file
    workers: int = 2  # generator processes


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int
    size: int
    seed: int
    out: str


# ---- generation ------------------------------------------------------------------------------------


def draw(split: str, i: int, seed: int, eval_texts: frozenset[str]) -> tuple[corpus.Utterance, speech.Speech]:
    """Utterance i of split, synthesized; redrawn (deterministically) when it cannot be used."""
    for attempt in range(20):
        rng = random.Random(f"{seed}-{split}-{i}-{attempt}")
        if split == "train":
            utt = corpus.sample(rng)
            if utt.text in eval_texts:
                continue
        else:
            evals = corpus.eval_utterances()
            utt = evals[i % len(evals)]
        try:
            spoken = speech.synthesize(utt.text, speech.sample_voice(rng, held_out=split == "eval-heldout"))
        except ValueError:
            continue
        if 0 < len(spoken.audio) <= MAX_SECONDS * speech.SAMPLE_RATE:
            return utt, spoken
    raise RuntimeError(f"could not draw utterance {i} of {split}")


def record(utt: corpus.Utterance, spoken: speech.Speech, offset: int) -> dict:
    words = [[w.text, round(w.start, 4), round(w.end, 4)] for w in spoken.words]
    return {
        "offset": offset,
        "samples": len(spoken.audio),
        "text": utt.text,
        "response": utt.response,
        "kind": utt.kind,
        "voice": spoken.voice.label,
        "words": words,
    }


def make_shard(job: ShardJob) -> tuple[ShardJob, int, float]:
    """Synthesize one shard; returns (job, utterances, seconds of audio)."""
    eval_texts = frozenset(u.text for u in corpus.eval_utterances())
    drawn = [
        draw(job.split, i, job.seed, eval_texts)
        for i in range(job.index * job.size, (job.index + 1) * job.size)
    ]
    n, seconds = write_shard(Path(job.out) / f"{job.split}-{job.index:05d}", drawn)
    return job, n, seconds


def write_shard(base: Path, drawn: list[tuple[corpus.Utterance, speech.Speech]]) -> tuple[int, float]:
    """base.npy (int16 audio) then base.jsonl (records), each atomically; returns (count, seconds)."""
    audio, records, offset = [], [], 0
    for utt, spoken in drawn:
        pcm = np.clip(np.round(spoken.audio * 32767), -32768, 32767).astype(np.int16)
        records.append(record(utt, spoken, offset))
        audio.append(pcm)
        offset += len(pcm)
    np.save(f"{base}.tmp.npy", np.concatenate(audio))
    os.replace(f"{base}.tmp.npy", f"{base}.npy")
    Path(f"{base}.jsonl.tmp").write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(f"{base}.jsonl.tmp", f"{base}.jsonl")
    return len(records), offset / speech.SAMPLE_RATE


def plan(settings: DataSettings) -> list[ShardJob]:
    """Every shard of every split; evaluation shards first (they are small and needed early)."""
    n_eval = len(corpus.eval_utterances())
    sizes = {"eval-seen": n_eval, "eval-heldout": n_eval}
    jobs = [ShardJob(split, 0, size, EVAL_SEED, settings.out) for split, size in sizes.items()]
    n_train = -(-settings.count // settings.shard_size)
    jobs += [ShardJob("train", k, settings.shard_size, settings.seed, settings.out) for k in range(n_train)]
    return jobs


def check_manifest(settings: DataSettings) -> dict:
    """Load (or start) the manifest; refuse to mix shards made with different settings."""
    path = Path(settings.out) / "manifest.json"
    fixed = {"version": FORMAT_VERSION, "seed": settings.seed, "shard_size": settings.shard_size}
    manifest = json.loads(path.read_text()) if path.exists() else {**fixed, "shards": {}}
    mismatch = {k: (manifest.get(k), v) for k, v in fixed.items() if manifest.get(k) != v}
    if mismatch:
        raise SystemExit(f"{path} was made with other settings {mismatch}; use another --out")
    return manifest


def write_manifest(settings: DataSettings, manifest: dict) -> None:
    path = Path(settings.out) / "manifest.json"
    manifest["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.with_suffix(".tmp").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(path.with_suffix(".tmp"), path)


def generate(settings: DataSettings, log=print) -> int:
    Path(settings.out).mkdir(parents=True, exist_ok=True)
    manifest = check_manifest(settings)
    todo = [j for j in plan(settings) if not Path(settings.out, f"{j.split}-{j.index:05d}.jsonl").exists()]
    log(f"data: {len(todo)} shards to make, settings {asdict(settings)}")
    t0, done_utts, done_sec = time.time(), 0, 0.0
    with multiprocessing.get_context("fork").Pool(settings.workers) as pool:
        for job, n, sec in pool.imap_unordered(make_shard, todo):
            done_utts, done_sec = done_utts + n, done_sec + sec
            manifest["shards"][f"{job.split}-{job.index:05d}"] = {"utterances": n, "seconds": round(sec, 1)}
            write_manifest(settings, manifest)
            elapsed = time.time() - t0
            log(
                f"shard {job.split}-{job.index:05d}: {n} utts {sec / 60:.1f} min audio | "
                f"{done_utts / elapsed:.1f} utt/s, {done_sec / elapsed:.1f}x real time"
            )
    shards = manifest["shards"].values()
    total, hours = sum(s["utterances"] for s in shards), sum(s["seconds"] for s in shards) / 3600
    log(f"data: done, {total} utterances, {hours:.1f} h")
    return 0


# ---- reading -----------------------------------------------------------------------------------------


class Corpus:
    """Utterances of one split: (float32 audio, record) by index; refresh() picks up new shards."""

    def __init__(self, root: str | Path, split: str) -> None:
        self.root, self.split = Path(root), split
        self.records: list[dict] = []
        self._audio: list[np.ndarray] = []
        self._where: list[tuple[int, int]] = []  # (shard slot, record index within shard)
        self._shards: set[str] = set()
        self.refresh()

    def refresh(self) -> int:
        """Load shards finished since the last call; returns how many were added."""
        new = sorted(p for p in self.root.glob(f"{self.split}-*.jsonl") if p.stem not in self._shards)
        for path in new:
            records = [json.loads(line) for line in path.read_text().splitlines()]
            slot = len(self._audio)
            self._audio.append(np.load(path.with_suffix(".npy"), mmap_mode="r"))
            self._where += [(slot, i) for i in range(len(records))]
            self.records += records
            self._shards.add(path.stem)
        return len(new)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict]:
        rec = self.records[i]
        pcm = self._audio[self._where[i][0]][rec["offset"] : rec["offset"] + rec["samples"]]
        return pcm.astype(np.float32) / 32768.0, rec


# ---- command line ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DataSettings()
    parser.add_argument("--out", default=d.out, help="output directory for shards and manifest.json")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--count", type=int, default=d.count, help="training utterances")
    parser.add_argument("--shard-size", type=int, default=d.shard_size)
    parser.add_argument("--workers", type=int, default=d.workers)


def run(args: argparse.Namespace, settings=None) -> int:
    """`rawwave data`: generate (or finish generating) the corpus. settings: the CLI's, unused here."""
    data = DataSettings(args.out, args.seed, args.count, args.shard_size, args.workers)
    return generate(data, log=stamped)


def stamped(message: str) -> None:
    """The command-line log line: time, then the message; flushed (the log is often a nohup file)."""
    sys.stdout.write(f"{time.strftime('%H:%M:%S')} {message}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m export.dataset", description=__doc__.split("\n")[0])
    add_arguments(cli)
    sys.exit(run(cli.parse_args()))
