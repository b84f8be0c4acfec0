"""`peer`: accuracy and speed against pocketsphinx (CMU Sphinx, its bundled en-us model) on the same
evaluation audio, same machine, same run: word error rate and real-time factor side by side.

Evaluation audio: the committed evaluation sentences spoken by the held-out voice family (flite's SLT,
never used in training; export/speech.py) and, for contrast, by training-family voices. rawwave runs
the worker's own `StreamingSession` offline (every partial decoded, as a live session would) and a
batch decode of the whole utterance; pocketsphinx decodes each utterance in one call. One thread each.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.models import bench_model
from bench.report import write_result
from bench.workload import SAMPLE_RATE, Utterance, finite, load, utterances, versions, wer
from rawwave.settings import Settings
from worker.decoding import Context, generate
from worker.interleaved import open_session
from worker.runtime import Runtime
from worker.session import Prompt, StreamingOptions

SEED = 4


def rawwave_streaming(runtime: Runtime, options: StreamingOptions, utt: Utterance) -> tuple[str, float]:
    started = time.perf_counter()
    session = open_session(runtime, options, "bench", False)
    session.feed(utt.pcm.tobytes())
    session.end()
    finals = []
    for _ in range(10_000):  # bounded: a session ends long before
        events = session.step()
        finals += [e.text for e in events if e.type == "final"]
        if not events:
            break
    return " ".join(finals), time.perf_counter() - started


def rawwave_batch(runtime: Runtime, prompt: Prompt, utt: Utterance) -> tuple[str, float]:
    started = time.perf_counter()
    frame = runtime.config.frame_samples
    pcm = np.concatenate([utt.pcm, np.zeros(-len(utt.pcm) % frame, np.int16)])
    start = runtime.start(prompt.prefix)
    embeds = runtime.embed_audio(pcm)
    _, _, cache = runtime.extend_embeds(start.cache, start.length, embeds, keep=1)
    ctx = Context(cache, start.length + len(embeds), start.logits, start.hidden)
    gen = generate(runtime, ctx, prompt.transcript_stop, len(prompt.suffix) + 128, None, prompt.suffix)
    tokens = gen.tokens[len(prompt.suffix) :]
    end = prompt.transcript_end
    tokens = tokens[: -len(end)] if tokens[-len(end) :] == end else tokens
    return runtime.decode(tokens), time.perf_counter() - started


def pocketsphinx_decoder() -> Any:
    from pocketsphinx import Decoder

    return Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")


def sphinx(decoder: Any, utt: Utterance) -> tuple[str, float]:
    started = time.perf_counter()
    decoder.start_utt()
    decoder.process_raw(utt.pcm.tobytes(), no_search=False, full_utt=True)
    decoder.end_utt()
    hyp = decoder.hyp()
    return (hyp.hypstr if hyp else ""), time.perf_counter() - started


def evaluate(spoken: list[Utterance], systems: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    audio = sum(u.seconds for u in spoken)
    for name, run in systems.items():
        rows = [(u, *run(u)) for u in spoken]
        out[name] = {
            "wer": wer([u.text for u, _, _ in rows], [h for _, h, _ in rows]),
            "rtf": sum(s for _, _, s in rows) / audio,
            "samples": [
                {"ref": u.text, "hyp": h, "seconds": round(s, 4), "voice": u.voice} for u, h, s in rows
            ],
        }
    return out


def main(quick: bool = False) -> int:
    count = 2 if quick else 30
    model = bench_model(quick)
    runtime = Runtime(model.directory, Settings(ort_intra_threads=1, mtp=False))
    options = StreamingOptions.of(runtime.config, Settings(mtp=False))
    prompt = Prompt.of(runtime, respond=False)
    decoder = pocketsphinx_decoder()
    systems = {"rawwave_streaming": lambda u: rawwave_streaming(runtime, options, u)}
    if options.format == "branch":  # an interleaved model decodes whole audio exactly as it streams it
        systems["rawwave_batch"] = lambda u: rawwave_batch(runtime, prompt, u)
    systems["pocketsphinx"] = lambda u: sphinx(decoder, u)
    load_before, started = load(), time.monotonic()
    splits = {
        "held_out_voice": evaluate(utterances(count, seed=SEED, held_out=True), systems),
        "training_voices": evaluate(utterances(max(1, count // 2), seed=SEED), systems),
    }
    held = splits["held_out_voice"]
    write_result(
        "peer",
        finite(
            {
                "quick": quick,
                "versions": versions(),
                "model": model.describe(),
                "peer": {
                    "name": "pocketsphinx",
                    "model": "bundled en-us (cmusphinx-en-us-5.2), default LM and dictionary",
                },
                "settings": {
                    "utterances_held_out": count,
                    "utterances_training_voices": max(1, count // 2),
                    "seed": SEED,
                    "held_out_family": "flite slt",
                    "threads": 1,
                    "mtp": False,
                    "eval_sentences": "export/eval_sentences.txt",
                },
                "load_before": load_before,
                "load_after": load(),
                "seconds": round(time.monotonic() - started, 1),
                "splits": splits,
                "headline": _headline(held),
            }
        ),
    )
    return 0


def _headline(held: dict[str, Any]) -> str:
    def cell(name: str) -> str:
        return f"{held[name]['wer']:.0%} / {held[name]['rtf']:.2f}"

    batch = f", {cell('rawwave_batch')} batch" if "rawwave_batch" in held else ""
    return (
        f"held-out voice, WER / RTF: rawwave {cell('rawwave_streaming')} streaming{batch}; "
        f"pocketsphinx {cell('pocketsphinx')}"
    )
