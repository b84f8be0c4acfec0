"""Training our small gemma4_unified speech model on the synthesized corpus (CPU or CUDA, resumable).

What one example is (export/tokenizer.py): the interleaved prompt, the utterance's raw frames in chunks
with each chunk's completed words after it and the response in the model turn when asked for one; or
(--format branch) the frames whole, then "{transcript}<turn|>" or "{transcript}\\n{response}<turn|>".
Levers from /work/shared/MODEL-NOTES.md: a training-only CTC head on the audio positions (never saved
into the HF checkpoint), a short-utterance curriculum, audio prefixes cut at random points whose target
is the words completed by the cut, AdamW with warmup and a cosine schedule, both cores. On CUDA (or with
--workers on a CPU with cores to spare) worker processes make the next batches while the model trains.
Knows the model only through export/model.py's API and saves through export/checkpoint.py.
"""

import argparse
import concurrent.futures
import functools
import json
import math
import multiprocessing
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export import augment, corpus, tokenizer
from export.dataset import Corpus, stamped
from export.metrics import edit_distance
from export.model import FULL, SLIDING, AudioConfig, Config, Gemma4Unified, TextConfig, count_parameters

IGNORE = -100


@dataclass(frozen=True)
class TrainSettings:
    # where
    data: str = "data/corpus"  # export.dataset output
    run: str = "runs/default"  # checkpoints, tokenizer.json, metrics.jsonl
    seed: int = 0
    # model (gemma4_unified, no vision)
    hidden: int = 256
    layers: int = 4  # all sliding but the last (full)
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    intermediate: int = 768
    sliding_window: int = 1024  # > 30 s of 40 ms frames plus the text
    frame: int = 640  # samples per audio soft token (audio_embed_dim); 640 = 40 ms
    format: str = "interleaved"  # prompt format (export/tokenizer.py): "interleaved" or "branch"
    chunk_frames: int = 8  # interleaved: audio frames per chunk (8 x 40 ms = 320 ms)
    init: str = ""  # a state.pt / best.pt whose weights a fresh run starts from (fresh optimizer);
    # a shallower one grows into this run's depth (see `grown`)
    grown_lr_scale: float = 1.0  # lr multiplier of the layers that growth added: they start as identities
    # whose zeroed post-norm scales Adam moves ~lr a step, so at a continuation's lr they stay nearly off
    # optimization
    batch: int = 48
    accumulate: int = 1  # batches per optimizer step: an effective batch of batch x accumulate where
    # memory (a CPU's) caps the batch; the GPU stage's 256 at lr 2e-3 learned far more per utterance
    lr: float = 2.5e-3
    warmup: int = 300
    steps: int = 30_000  # cosine horizon; stop any time, resume continues
    weight_decay: float = 0.01
    ctc_weight: float = 0.4
    ctc_units: str = "chars"  # the CTC head's alphabet: "chars" (a-z ' space) or "tokens" (the BPE vocab)
    threads: int = 2
    device: str = "auto"  # "cuda" when present, else "cpu"; or name one
    bf16: bool = False  # bf16 autocast of the forward (CUDA, AVX-512/AMX CPUs); weights, optimizer fp32
    compile: bool = False  # torch.compile each decoder layer: norms, rope, GeGLU fused around the matmuls
    workers: int = -1  # processes making batches ahead of the step; -1: none on the CPU, 8 on CUDA
    # data mix
    prefix_prob: float = 0.3  # cut the audio at a random frame; target = words completed by then
    respond_prob: float = 0.5  # ask for a response after the transcript
    skill_boost: float = 1.0  # draw weight of arithmetic and home-control utterances against the rest's 1
    arithmetic_boost: float = 1.0  # arithmetic's weight on top of that: skill_boost x arithmetic_boost
    words_boost: float = 1.0  # draw weight of random-word utterances: no language model to lean on, the
    # audio alone (a held-out word costs ~2x a held-out sentence's per token: the hearing is the limit)
    sentence_boost: float = 1.0  # draw weight of free-text sentences: 72% of the served model's
    # character errors, yet 24% of a skills-stage batch
    drill: int = 0  # text-only skill examples per step beside the batch (see Drill); 0 = none
    drill_home: float = 0.25  # the drill's share of home commands (the rest: arithmetic)
    augment_prob: float = 0.6  # utterances that get on-the-fly augmentation
    curriculum_steps: int = 3000  # max utterance length grows from 2.5 s to max_seconds over these
    bucket: int = 1024  # a batch is drawn from this many length-neighbours (less padding); 0 = anywhere
    max_seconds: float = 12.0
    # bookkeeping
    log_every: int = 25
    eval_every: int = 500
    eval_loss_count: int = 120  # held-out utterances per split for the teacher-forced loss
    eval_cer_count: int = 24  # greedy-decoded held-out utterances per split
    checkpoint_seconds: float = 300.0
    keep_evals: bool = False  # also keep each evaluation's weights as step-N.pt, to average the last few
    # of a stage (export.average) as blends of stages were
    seconds: float = 0.0  # > 0: a wall-clock budget; the cosine horizon (steps) is refitted to what fits


def model_config(s: TrainSettings, vocab_size: int) -> Config:
    ids = {
        k: v
        for k, v in tokenizer.config_token_ids().items()
        if k not in ("pad_token_id", "eos_token_id", "bos_token_id")
    }
    text = TextConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        global_head_dim=s.head_dim,
        num_global_key_value_heads=s.kv_heads,
        layer_types=tuple([SLIDING] * (s.layers - 1) + [FULL]),
        sliding_window=s.sliding_window,
        final_logit_softcapping=30.0,
        pad_token_id=tokenizer.PAD,
        max_position_embeddings=8192,
    )
    return Config(text=text, vision=None, audio=AudioConfig(audio_embed_dim=s.frame), **ids)


def build_model(s: TrainSettings, vocab_size: int) -> tuple[Gemma4Unified, nn.Linear]:
    """The model (embedding initialised so logits start near unit scale) and the training-only CTC head."""
    torch.manual_seed(s.seed)
    model = Gemma4Unified(model_config(s, vocab_size))
    nn.init.normal_(model.language_model.embed_tokens.weight, std=s.hidden**-0.5)
    return model, nn.Linear(s.hidden, ctc_classes(s, vocab_size))


# Character CTC aligns sooner than CTC over a 1024-token BPE (MODEL-NOTES' plateau broke with
# character units); the head is training-only, so its alphabet is free to differ from the decoder's.
CTC_ALPHABET = " 'abcdefghijklmnopqrstuvwxyz"  # class 0 is the blank


def ctc_classes(s: TrainSettings, vocab_size: int) -> int:
    return len(CTC_ALPHABET) + 1 if s.ctc_units == "chars" else vocab_size


def ctc_targets(s: TrainSettings, tok, transcript: str) -> list[int]:
    if not transcript:
        return []
    if s.ctc_units == "chars":
        return [CTC_ALPHABET.index(c) + 1 for c in transcript if c in CTC_ALPHABET]
    return tok.encode(transcript).ids


# ---- examples and batches ------------------------------------------------------------------------------


@dataclass
class Example:
    frames: np.ndarray  # (N, frame) float32
    prompt: tokenizer.Prompt
    ctc: list[int]  # transcript token ids (possibly empty)


def completed_words(words: list, seconds: float) -> str:
    return " ".join(w for w, _, end in words if end <= seconds)


def make_example(
    audio: np.ndarray, rec: dict, tok, s: TrainSettings, rng: random.Random, train: bool
) -> Example:
    scale = 1.0
    if train and rng.random() < s.augment_prob:
        audio, scale = augment.augment(audio, np.random.default_rng(rng.getrandbits(32)))
    n = max(1, math.ceil(len(audio) / s.frame))
    transcript, response = rec["text"], rec["response"]
    instruction = (
        tokenizer.INSTRUCT_RESPOND if rng.random() < s.respond_prob else tokenizer.INSTRUCT_TRANSCRIBE
    )
    if s.format == "interleaved":
        return interleaved_example(audio, rec, scale, tok, s, rng)
    if train and rng.random() < s.prefix_prob:
        n = rng.randint(1, n)
        transcript = completed_words(
            [(w, a * scale, b * scale) for w, a, b in rec["words"]], n * s.frame / 16000
        )
        instruction = tokenizer.INSTRUCT_TRANSCRIBE
    frames = np.zeros(n * s.frame, np.float32)
    frames[: min(len(audio), n * s.frame)] = audio[: n * s.frame]
    with_response = response if instruction == tokenizer.INSTRUCT_RESPOND else None
    prompt = tokenizer.prompt(tok, n, instruction, tokenizer.model_turn(transcript, with_response))
    return Example(frames.reshape(n, s.frame), prompt, ctc_targets(s, tok, transcript))


def interleaved_example(
    audio: np.ndarray, rec: dict, scale: float, tok, s: TrainSettings, rng: random.Random
) -> Example:
    """The whole utterance in chunks, each chunk's completed words after it; the model turn holds the
    response when asked for one. (No prefix cuts: every chunk boundary already is one.)"""
    n = max(1, math.ceil(len(audio) / s.frame))
    sizes = [min(s.chunk_frames, n - k) for k in range(0, n, s.chunk_frames)]
    words = [(w, b * scale) for w, _, b in rec["words"]]
    texts = tokenizer.chunk_texts(words, s.chunk_frames * s.frame / 16000, len(sizes))
    respond = rng.random() < s.respond_prob
    instruction = tokenizer.INSTRUCT_RESPOND if respond else tokenizer.INSTRUCT_TRANSCRIBE
    prompt = tokenizer.interleaved_prompt(tok, sizes, texts, instruction, rec["response"] if respond else "")
    transcript = "".join(texts)
    return Example(frames_of(audio, s.frame), prompt, ctc_targets(s, tok, transcript))


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) long, PAD-padded on the right
    mask: torch.Tensor  # (B, T) 1 = real token
    labels: torch.Tensor  # (B, T) next-token targets, IGNORE outside the model turn
    frames: torch.Tensor  # (sum N, frame) every example's frames, in order
    audio_index: torch.Tensor  # (B, N_max) position of each audio frame in ids, 0 where padded
    audio_lengths: torch.Tensor  # (B,)
    ctc_targets: torch.Tensor  # (sum L,)
    ctc_lengths: torch.Tensor  # (B,)

    def to(self, device: torch.device) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def collate(examples: list[Example]) -> Batch:
    B, T = len(examples), max(len(e.prompt.ids) for e in examples)
    n_max = max(e.prompt.n_audio for e in examples)
    ids, mask = torch.full((B, T), tokenizer.PAD), torch.zeros(B, T, dtype=torch.long)
    labels, audio_index = torch.full((B, T), IGNORE), torch.zeros(B, n_max, dtype=torch.long)
    for b, e in enumerate(examples):
        p = e.prompt
        ids[b, : len(p.ids)], mask[b, : len(p.ids)] = torch.tensor(p.ids), 1
        trained = torch.tensor(p.trained_index(), dtype=torch.long)
        labels[b, trained - 1] = torch.tensor(p.ids)[trained]
        audio_index[b, : p.n_audio] = torch.tensor(p.audio_index())
    return Batch(
        ids,
        mask,
        labels,
        torch.from_numpy(np.concatenate([e.frames for e in examples])),
        audio_index,
        torch.tensor([e.prompt.n_audio for e in examples]),
        torch.tensor([t for e in examples for t in e.ctc], dtype=torch.long),
        torch.tensor([len(e.ctc) for e in examples]),
    )


def problem(response: str) -> str:
    """An arithmetic response's question ("17 + 25 = 42" -> "17 + 25"); whatever else, itself."""
    return response.partition(" = ")[0]


@functools.cache
def eval_keys() -> frozenset[str]:
    """The committed eval set's texts and its sums' and differences' problems: training draws neither.
    The corpus leaves out only the exact texts, and "calculate seven minus fifty" asks the eval's "what
    is seven minus fifty" again (a 200k corpus held 379 such utterances, 1% of its arithmetic). Products
    stay in: the times table has 169 entries, each in ~0.1% of the corpus; knowing it is the skill, and
    the eval's products are asked in words it never trained on."""
    evals = corpus.eval_utterances()
    problems = {problem(u.response) for u in evals if u.kind == "arithmetic" and " × " not in u.response}
    return frozenset(u.text for u in evals) | problems


def held_out(text: str, response: str, keys: frozenset[str]) -> bool:
    return text in keys or problem(response) in keys


# A skills stage draws these kinds more often: their answers hinge on a few number and room words.
SKILL_KINDS = ("arithmetic", "home")


class Sampler:
    """Draws training batches: seeded per step, short utterances first (the curriculum)."""

    def __init__(self, data: Corpus, tok, s: TrainSettings):
        self.data, self.tok, self.s = data, tok, s
        self.index_records()

    def index_records(self) -> None:
        records = self.data.records
        self.seconds = np.array([r["samples"] / 16000 for r in records])
        self.weights = np.array([self.draw_weight(r["kind"]) for r in records])
        self.uniform = bool((self.weights == 1.0).all())  # no kind boosted: draw as before the boosts
        keys = eval_keys()
        self.trainable = np.array([not held_out(r["text"], r["response"], keys) for r in records], dtype=bool)

    def draw_weight(self, kind: str) -> float:
        if kind == "arithmetic":
            return self.s.skill_boost * self.s.arithmetic_boost
        if kind == "words":
            return self.s.words_boost
        if kind == "sentence":
            return self.s.sentence_boost
        return self.s.skill_boost if kind in SKILL_KINDS else 1.0

    def refresh(self) -> None:
        if self.data.refresh():
            self.index_records()

    def max_seconds(self, step: int) -> float:
        s = self.s
        return min(s.max_seconds, 2.5 + (s.max_seconds - 2.5) * step / max(1, s.curriculum_steps))

    def batch(self, index: int) -> Batch:
        """Batch `index` (the step's own, or one of its `accumulate` batches: index // accumulate is the
        optimizer step, which the curriculum follows)."""
        rng = random.Random(f"{self.s.seed}-batch-{index}")
        max_seconds = self.max_seconds(index // self.s.accumulate)
        eligible = np.nonzero((self.seconds <= max_seconds) & self.trainable)[0]
        picks = self.draw(self.neighbours(eligible, rng), rng)
        return collate([make_example(*self.data[i], self.tok, self.s, rng, train=True) for i in picks])

    def draw(self, pool: np.ndarray, rng: random.Random) -> list[int]:
        """A batch's utterances from `pool`, with replacement; skills weighted by `draw_weight`."""
        if self.uniform:
            return [int(pool[rng.randrange(len(pool))]) for _ in range(self.s.batch)]
        return [int(i) for i in rng.choices(list(pool), weights=list(self.weights[pool]), k=self.s.batch)]

    def neighbours(self, eligible: np.ndarray, rng: random.Random) -> np.ndarray:
        """A random run of `bucket` utterances of similar length: padding a batch to its longest
        member wasted about half of every step when batches mixed lengths."""
        if self.s.bucket <= 0 or len(eligible) <= self.s.bucket:
            return eligible
        by_length = eligible[np.argsort(self.seconds[eligible], kind="stable")]
        start = rng.randrange(len(by_length) - self.s.bucket + 1)
        return by_length[start : start + self.s.bucket]


class Drill:
    """Text-only skill examples (tokenizer.drill_prompt): arithmetic and home commands with the
    transcript written out and no audio, trained on the response alone: the eval's arithmetic misses
    mostly heard both numbers and computed wrong. Measured on 2 CPU threads, 32 of them cost about half
    a batch of 48 audio examples (the empty chunks' markers make the prompts ~70 tokens); the model card
    has what they taught. Problems in the committed eval set are never drawn, so the eval still measures
    arithmetic the model has not been drilled on."""

    def __init__(self, tok, s: TrainSettings):
        self.tok, self.s = tok, s
        self.held_out = eval_keys()

    def batch(self, step: int) -> Batch:
        rng = random.Random(f"{self.s.seed}-drill-{step}")
        examples: list[Example] = []
        while len(examples) < self.s.drill:
            utt = corpus.home_command(rng) if rng.random() < self.s.drill_home else corpus.arithmetic(rng)
            if held_out(utt.text, utt.response, self.held_out):
                continue
            words = utt.text.split()
            texts = tokenizer.word_chunks(words, self.chunk_sizes(len(words), rng))
            prompt = tokenizer.drill_prompt(self.tok, texts, utt.response)
            examples.append(Example(np.zeros((0, self.s.frame), np.float32), prompt, []))
        return collate(examples)

    @staticmethod
    def chunk_sizes(words: int, rng: random.Random) -> list[int]:
        """Words per 320 ms chunk as speech spreads them: leading silence, mostly one word a chunk,
        sometimes two or a pause, and a chunk of trailing silence now and then."""
        sizes = [0] * rng.randint(0, 2)
        while sum(sizes) < words:
            sizes.append(min(words - sum(sizes), rng.choices((0, 1, 2), weights=(0.15, 0.6, 0.25))[0]))
        return sizes + [0] * rng.randint(0, 1)


# ---- the loss ------------------------------------------------------------------------------------------


def forward(
    model: Gemma4Unified, ctc_head: nn.Linear, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (next-token loss, CTC loss, hidden)."""
    audio = embed_audio_frames(model, batch.frames)  # (sum N, H)
    hidden = decode_hidden(model, model.embed_inputs(batch.ids, audio_features=audio), batch)
    return next_token_loss(model, hidden, batch), ctc_loss(ctc_head, hidden, batch), hidden


def drill_loss(model: Gemma4Unified, batch: Batch) -> torch.Tensor:
    """The next-token loss of a text-only (Drill) batch."""
    return next_token_loss(model, decode_hidden(model, model.embed_inputs(batch.ids), batch), batch)


def decode_hidden(model: Gemma4Unified, embeds: torch.Tensor, batch: Batch) -> torch.Tensor:
    positions = torch.arange(batch.ids.shape[1], device=batch.ids.device).expand_as(batch.ids)
    _, hidden, _ = model.decode(embeds, positions, [], attention_mask=batch.mask, num_logits_to_keep=1)
    return hidden


def next_token_loss(model: Gemma4Unified, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    rows = batch.labels != IGNORE
    return F.cross_entropy(model.logits(hidden[rows]).float(), batch.labels[rows])


def embed_audio_frames(model: Gemma4Unified, frames: torch.Tensor) -> torch.Tensor:
    """The audio embedder's own weights as one GEMM over all frames (N, F) -> (N, H). model.embed_audio
    multiplies frame by frame (bit-identical chunked streaming), whose backward expands the weight per
    frame: ~20% of a training step. Same math; only the summation order differs."""
    embedder = model.embed_audio
    return embedder.embedding_projection(embedder.embedding_pre_projection_norm(frames))


def ctc_loss(head: nn.Linear, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    idx = batch.audio_index[..., None].expand(-1, -1, hidden.shape[-1])  # (B, N, H)
    logp = head(torch.gather(hidden, 1, idx)).float().log_softmax(-1)  # (B, N, V)
    return F.ctc_loss(logp.transpose(0, 1), batch.ctc_targets, batch.audio_lengths, batch.ctc_lengths,
                      blank=0, zero_infinity=True)  # fmt: skip


def learning_rate(s: TrainSettings, step: int) -> float:
    return warmup_cosine(s.lr, s.warmup, s.steps, step, floor=0.1)


def warmup_cosine(peak: float, warmup: int, steps: int, step: int, floor: float) -> float:
    """Linear warm-up to `peak`, then a cosine down to `floor * peak` at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- evaluation ----------------------------------------------------------------------------------------

# Bounds that end a runaway greedy decode: the most tokens after one chunk of audio (an interleaved
# chunk holds a word or two), and in one model turn (the longest response is ~40 tokens).
CHUNK_TOKENS = 24
TURN_TOKENS = 80


@torch.no_grad()
def greedy(
    model: Gemma4Unified, tok, frames: np.ndarray, instruction: str, max_tokens: int = TURN_TOKENS
) -> str:
    """Decode the model turn for one utterance's frames (N, frame) with the KV cache."""
    p, decoder = tokenizer.prompt(tok, len(frames), instruction, None), IncrementalDecoder(model)
    audio = model.embed_audio(torch.from_numpy(frames).to(decoder.dev)[None])[0]
    logits = decoder.extend(
        model.embed_inputs(torch.tensor([p.ids], device=decoder.dev), audio_features=audio)
    )
    return tok.decode(greedy_tokens(model, logits, decoder.past, decoder.length, max_tokens))


def greedy_tokens(
    model: Gemma4Unified, logits: torch.Tensor, past: list, length: int, max_tokens: int
) -> list:
    """Greedy tokens from a prefilled prompt (its last logits, KV cache and length) to the end of turn."""
    dev, out = device_of(model), []
    for t in range(max_tokens):
        token = int(logits[0, -1].argmax())
        if token in (tokenizer.TURN_END, tokenizer.EOS):
            break
        out.append(token)
        pos = torch.tensor([[length + t]], device=dev)
        logits, _, past = model.decode(
            model.embed_tokens(torch.tensor([[token]], device=dev)), pos, past, num_logits_to_keep=1
        )
    return out


@torch.no_grad()
def greedy_interleaved(
    model: Gemma4Unified,
    tok,
    frames: np.ndarray,
    chunk: int,
    max_words: int = CHUNK_TOKENS,
    prefix: list[int] | None = None,
    stops: tuple[int, ...] | None = None,
) -> str:
    """The interleaved transcript of one utterance's frames (N, frame): append a chunk, decode its words
    until the model asks for more audio (`<|audio>`), repeat; as worker/interleaved.py streams it.
    prefix: the user turn's start (default: ours, transcribe); stops: what else ends a chunk's words
    (default: the end of the turn and a newline, which ends a transcript)."""
    if prefix is None:
        prefix = tokenizer.user_turn_start(tok, tokenizer.INSTRUCT_TRANSCRIBE)
    return tok.decode(IncrementalDecoder(model).transcribe(prefix, frames, chunk, max_words, stops, tok))


@torch.no_grad()
def greedy_respond(model: Gemma4Unified, tok, frames: np.ndarray, chunk: int) -> tuple[str, str]:
    """(transcript, response) of one utterance as the worker answers it: the interleaved transcript of
    a respond prompt, then the model turn decoded greedily once the audio has ended."""
    decoder = IncrementalDecoder(model)
    prefix = tokenizer.user_turn_start(tok, tokenizer.INSTRUCT_RESPOND)
    words = decoder.transcribe(prefix, frames, chunk, CHUNK_TOKENS, None, tok)
    logits = decoder.extend(
        model.embed_tokens(torch.tensor([tokenizer.model_turn_start(tok)], device=decoder.dev))
    )
    response = greedy_tokens(model, logits, decoder.past, decoder.length, TURN_TOKENS)
    return tok.decode(words), tok.decode(response)


class IncrementalDecoder:
    """One sequence's KV cache, extended by embeddings."""

    def __init__(self, model: Gemma4Unified):
        self.model, self.dev = model, device_of(model)
        self.past: list = []
        self.length = 0

    def extend(self, embeds: torch.Tensor) -> torch.Tensor:
        """Appends (1, T, H); returns the last position's logits (1, 1, V)."""
        pos = torch.arange(self.length, self.length + embeds.shape[1], device=self.dev)[None]
        logits, _, self.past = self.model.decode(embeds, pos, self.past, num_logits_to_keep=1)
        self.length += embeds.shape[1]
        return logits

    def transcribe(
        self, prefix: list[int], frames: np.ndarray, chunk: int, max_words: int, stops: tuple | None, tok
    ) -> list[int]:
        """The interleaved loop (see greedy_interleaved); returns the transcript's tokens."""
        model, cfg, dev = self.model, self.model.cfg, self.dev
        if stops is None:
            stops = (tokenizer.TURN_END, tokenizer.EOS, *tok.encode("\n").ids)
        out: list[int] = []
        self.extend(model.embed_tokens(torch.tensor([prefix], device=dev)))
        for k in range(0, len(frames), chunk):
            audio = model.embed_audio(torch.from_numpy(frames[k : k + chunk]).to(dev)[None])  # (1, C, H)
            wrap = model.embed_tokens(torch.tensor([[cfg.boa_token_id, cfg.eoa_token_index]], device=dev))
            token = int(self.extend(torch.cat([wrap[:, :1], audio, wrap[:, 1:]], 1))[0, -1].argmax())
            for _ in range(max_words):
                if token == cfg.boa_token_id or token in stops:
                    break
                out.append(token)
                token = int(
                    self.extend(model.embed_tokens(torch.tensor([[token]], device=dev)))[0, -1].argmax()
                )
        return out


@torch.no_grad()
def drill_exact(model: Gemma4Unified, tok) -> dict:
    """Exact-match responses to the eval set's skill utterances from their written words (the drill's
    own format, no audio): whether the skill itself is learned, apart from hearing it."""

    def answer(utt: corpus.Utterance) -> str:
        words = utt.text.split()
        prompt = tokenizer.drill_prompt(tok, tokenizer.word_chunks(words, [0] + [1] * len(words)), None)
        return greedy_text(model, tok, prompt.ids)

    skills = [(u.kind, u.response, u) for u in corpus.eval_utterances() if u.kind in SKILL_KINDS]
    return exact_by_skill(model, "drill", skills, answer)


@torch.no_grad()
def greedy_text(model: Gemma4Unified, tok, ids: list[int], max_tokens: int = TURN_TOKENS) -> str:
    """Greedy continuation of a text-only prompt up to the end of the turn."""
    decoder = IncrementalDecoder(model)
    logits = decoder.extend(model.embed_tokens(torch.tensor([ids], device=decoder.dev)))
    return tok.decode(greedy_tokens(model, logits, decoder.past, decoder.length, max_tokens))


@torch.no_grad()
def respond_exact(model: Gemma4Unified, tok, data: Corpus, s: TrainSettings) -> dict:
    """Exact-match responses per skill over a split's skill utterances, heard from their audio."""

    def answer(i: int) -> str:
        audio, _ = data[i]
        return greedy_respond(model, tok, frames_of(audio, s.frame), s.chunk_frames)[1].strip()

    skills = [(r["kind"], r["response"], i) for i, r in enumerate(data.records) if r["kind"] in SKILL_KINDS]
    return exact_by_skill(model, "respond", skills, answer)


def exact_by_skill(model: Gemma4Unified, name: str, skills: list, answer) -> dict:
    """{name/kind: exact-match rate} over (kind, expected response, what answer() takes), in eval mode."""
    model.eval()
    hits: dict[str, list[bool]] = {kind: [] for kind in SKILL_KINDS}
    for kind, expected, item in skills:
        hits[kind].append(answer(item) == expected)
    model.train()
    return {f"{name}/{kind}": sum(h) / max(1, len(h)) for kind, h in hits.items()}


def cpu_emulates_bf16() -> bool:
    """oneDNN emulates bf16 on a CPU without AVX-512 or AMX: on a 2-core AVX2 EPYC a training step took
    over 12 s that way against 7 s in fp32."""
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def cer(hyp: str, ref: str) -> float:
    return edit_distance(hyp, ref) / max(1, len(ref))


def frames_of(audio: np.ndarray, frame: int) -> np.ndarray:
    n = max(1, math.ceil(len(audio) / frame))
    return np.pad(audio, (0, n * frame - len(audio))).reshape(n, frame)


@torch.no_grad()
def evaluate(model, ctc_head, tok, data: Corpus, s: TrainSettings) -> dict:
    """Teacher-forced loss over the whole split (clean audio, respond prompt) and greedy CER on a few."""
    model.eval()
    rng = random.Random(0)
    held = s.__class__(**{**asdict(s), "respond_prob": 1.0})
    ces, count = [], min(len(data), s.eval_loss_count)
    for start in range(0, count, 32):
        examples = [
            make_example(*data[i], tok, held, rng, train=False) for i in range(start, min(count, start + 32))
        ]
        ces.append(forward(model, ctc_head, collate(examples).to(device_of(model)))[0].item() * len(examples))
    errors = []
    for i in range(min(s.eval_cer_count, len(data))):
        audio, rec = data[i]
        frames = frames_of(audio, s.frame)
        if s.format == "interleaved":
            hyp = greedy_interleaved(model, tok, frames, s.chunk_frames).strip()
        else:
            hyp = tokenizer.split_turn(greedy(model, tok, frames, tokenizer.INSTRUCT_TRANSCRIBE))[0]
        errors.append((edit_distance(hyp, rec["text"]), len(rec["text"])))
    model.train()
    return {"loss": sum(ces) / count, "cer": sum(e for e, _ in errors) / max(1, sum(n for _, n in errors))}


# ---- checkpoints ---------------------------------------------------------------------------------------


def save_state(path: Path, **state) -> None:
    save_atomically(state, path)


def save_atomically(obj: object, path: Path) -> None:
    """torch.save through a temp file, so a run killed mid-write never leaves a torn checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_state(run: Path, s: TrainSettings, model, ctc_head, optimizer) -> dict:
    """Restore the latest state.pt of a run, if any; returns its bookkeeping (step, best)."""
    path = run / "state.pt"
    if not path.exists():
        if s.init:  # a new run from another run's weights: its own schedule and optimizer
            start = torch.load(s.init, weights_only=False, map_location="cpu")
            model.load_state_dict(grown(start["model"], model.state_dict()))
            if start["ctc_head"]["weight"].shape == ctc_head.weight.shape:
                ctc_head.load_state_dict(start["ctc_head"])
        return {"step": 0, "best": float("inf")}
    state = torch.load(path, weights_only=False, map_location="cpu")  # load_state_dict moves to the device
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state["ctc_head"]["weight"].shape == ctc_head.weight.shape:
        ctc_head.load_state_dict(state["ctc_head"])
    else:  # the run changed its CTC alphabet: a fresh head, and no stale Adam moments for it
        for p in ctc_head.parameters():
            optimizer.state.pop(p, None)
    return {"step": state["step"], "best": state["best"]}


# --seconds measures the pace between these steps of a run (after the batch workers and the device warm
# up) and keeps this share of the time left for steps.
FIT_FROM, FIT_AT, FIT_MARGIN = 50, 150, 0.9

LAYER_PREFIX = "language_model.layers."
# the scales of what a decoder layer adds to the residual stream: zero, and the layer is an identity
POST_NORMS = ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")


def layer_depth(state: dict) -> int:
    """How many decoder layers a model's state dict holds."""
    return 1 + max(int(k[len(LAYER_PREFIX) :].split(".")[0]) for k in state if k.startswith(LAYER_PREFIX))


def renumbered(weights: dict, shift: int) -> dict:
    """`weights` with each decoder layer's index moved by `shift`; layers moved below 0 are left out."""
    out = {}
    for key, value in weights.items():
        if key.startswith(LAYER_PREFIX):
            index, rest = key[len(LAYER_PREFIX) :].split(".", 1)
            if int(index) + shift < 0:
                continue
            key = f"{LAYER_PREFIX}{int(index) + shift}.{rest}"
        out[key] = value
    return out


def grown(weights: dict, fresh: dict) -> dict:
    """`weights` of a shallower run, fitted to a deeper model whose freshly initialised state is `fresh`.

    The old layers become the top ones; the extra layers go at the bottom, where the raw frames need
    depth before the layers that already read them, and start as identities (their post-norm scales at
    zero: a layer adds nothing to the residual stream), so the deeper model first computes exactly what
    the shallower one did. Same depth: the weights as they are."""

    extra = layer_depth(fresh) - layer_depth(weights)
    if extra < 0:
        raise ValueError(
            f"--init has {layer_depth(weights)} layers, more than this run's {layer_depth(fresh)}"
        )
    out = renumbered(weights, extra)
    new_layers = tuple(f"{LAYER_PREFIX}{i}." for i in range(extra))
    for key, value in fresh.items():
        if key.startswith(new_layers):
            out[key] = torch.zeros_like(value) if key.endswith(POST_NORMS) else value
    return out


def added_layers(s: TrainSettings) -> int:
    """How many bottom layers `grown` adds to --init's weights (0 without --init)."""
    if not s.init:
        return 0
    return max(0, s.layers - layer_depth(torch.load(s.init, weights_only=False, map_location="cpu")["model"]))


def parameter_groups(model: nn.Module, ctc_head: nn.Module, added: int, scale: float) -> list[dict]:
    """The optimizer's groups: the layers growth added (the bottom `added`) at `scale` times the lr, the
    rest at the lr. A group's lr_scale survives in the optimizer state, so a resumed run keeps it."""
    new = tuple(f"{LAYER_PREFIX}{i}." for i in range(added))
    named = list(model.named_parameters())
    grown_params = [p for name, p in named if name.startswith(new)]
    rest = [p for name, p in named if not name.startswith(new)] + list(ctc_head.parameters())
    groups = [{"params": rest, "lr_scale": 1.0}]
    if grown_params:
        groups.append({"params": grown_params, "lr_scale": scale})
    return groups


def run_tokenizer(run: Path) -> object:
    """The run's vocabulary: trained once on first start, then always reloaded (ids must not move)."""
    path = run / "tokenizer.json"
    if not path.exists():
        tokenizer.save(tokenizer.build(), path)
    return tokenizer.load(path)


# ---- the loop ------------------------------------------------------------------------------------------


def training_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch sees no CUDA device")
    return torch.device(name)


_SAMPLER: Sampler | None = None  # a batch worker's copy (forked from the trainer)


def _worker_batch(step: int) -> Batch:
    assert _SAMPLER is not None
    _SAMPLER.refresh()  # the corpus may still be growing: each worker picks up new shards itself
    return _SAMPLER.batch(step)


def _worker_start() -> None:
    torch.set_num_threads(1)


class Prefetcher:
    """The sampler's batches, made `workers` steps ahead in forked processes while the model trains
    (on a GPU the step is too short to wait for them). A batch is a function of its step alone, so the
    batches are the same with any number of workers; 0 makes each one in line."""

    def __init__(self, sampler: Sampler, workers: int) -> None:
        self.sampler, self.workers = sampler, workers
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.ahead: dict[int, concurrent.futures.Future] = {}

    def batch(self, step: int) -> Batch:
        if self.workers == 0:
            return self.sampler.batch(step)
        if self.pool is None:
            self.start()
        assert self.pool is not None
        for k in range(step, step + 2 * self.workers):
            if k not in self.ahead:
                self.ahead[k] = self.pool.submit(_worker_batch, k)
        for k in [k for k in self.ahead if k < step]:  # a resumed or restarted step
            self.ahead.pop(k).cancel()
        return self.ahead.pop(step).result()

    def refresh(self) -> None:
        """Pick up new shards, in line. Batch workers refresh their own copies before each batch instead
        (restarting the pool whenever shards arrived, every few steps on a GPU training while its corpus
        is generated, cost more than the steps), so the trainer's copy is left alone then: reading every
        new shard's records a second time in the process that drives the GPU would serve nothing."""
        if self.workers == 0:
            self.sampler.refresh()

    def start(self) -> None:
        global _SAMPLER
        _SAMPLER = self.sampler  # what the forked workers inherit
        context = multiprocessing.get_context("fork")
        self.pool = concurrent.futures.ProcessPoolExecutor(self.workers, context, initializer=_worker_start)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool, self.ahead = None, {}


def compile_layers(model: Gemma4Unified) -> None:
    """Compiles each decoder layer in place (its forward and backward; state_dict keys unchanged). On 2
    AVX2 EPYC threads half of an fp32 step was elementwise ops around the matmuls (RMSNorm, rope, GeGLU,
    layer scaling); fused, the same batches trained 1.23x faster after a ~1 minute first step. Dynamic
    shapes, because every bucketed batch has its own length."""
    for layer in model.language_model.layers:
        layer.compile(dynamic=True)


class Trainer:
    def __init__(self, s: TrainSettings, log=print):
        self.s, self.log, self.run = s, log, Path(s.run)
        self.run.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(s.threads)
        self.device = training_device(s.device)
        self.tok = run_tokenizer(self.run)
        self.model, self.ctc_head = build_model(s, self.tok.get_vocab_size())
        self.model.to(self.device)
        self.ctc_head.to(self.device)
        if s.compile:
            compile_layers(self.model)
        groups = parameter_groups(self.model, self.ctc_head, added_layers(s), s.grown_lr_scale)
        self.optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.98), weight_decay=s.weight_decay)
        self.state = load_state(self.run, s, self.model, self.ctc_head, self.optimizer)
        workers = s.workers if s.workers >= 0 else (8 if self.device.type == "cuda" else 0)
        self.train_data = Prefetcher(Sampler(Corpus(s.data, "train"), self.tok, s), workers)
        self.drill = Drill(self.tok, s) if s.drill > 0 else None
        self.evals = {split: Corpus(s.data, split) for split in ("eval-seen", "eval-heldout")}
        self.write_settings()

    def step(self, step: int) -> dict:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.s, step) * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        parts = [self.accumulate_gradients(step * self.s.accumulate + k) for k in range(self.s.accumulate)]
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return {k: sum(part[k] for part in parts) / len(parts) for k in parts[0]}

    def accumulate_gradients(self, index: int) -> dict:
        """Backward of batch `index`, scaled so that a step's batches add up to their mean's gradient
        (with accumulate 1, batch `index` is the step's own: runs keep their batches)."""
        t0 = time.time()
        batch = self.train_data.batch(index).to(self.device)
        drill = self.drill.batch(index).to(self.device) if self.drill else None
        t1 = time.time()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.s.bf16):
            ce, ctc, _ = forward(self.model, self.ctc_head, batch)
            drilled = drill_loss(self.model, drill) if drill else None
        loss = ce + self.s.ctc_weight * ctc + (drilled if drilled is not None else 0.0)
        (loss / self.s.accumulate).backward()
        out = {"ce": ce.item(), "ctc": ctc.item(), "data_s": t1 - t0, "step_s": time.time() - t1}
        return out | ({"drill": drilled.item()} if drilled is not None else {})

    def evaluate(self, step: int) -> dict:
        out = {"step": step}
        for split, data in self.evals.items():
            for k, v in evaluate(self.model, self.ctc_head, self.tok, data, self.s).items():
                out[f"{split}/{k}"] = round(v, 4)
        out["train/loss"] = round(self.memorized_loss(), 4)
        if self.drill:  # the drilled skills, written and heard (clean audio, seen voices)
            out |= {k: round(v, 4) for k, v in drill_exact(self.model, self.tok).items()}
            skills = respond_exact(self.model, self.tok, self.evals["eval-seen"], self.s)
            out |= {k: round(v, 4) for k, v in skills.items()}
        return out

    def memorized_loss(self) -> float:
        """The same loss on the first training utterances: how far below eval-seen/loss it lies is what
        the model learned of the utterances it trains on and not of others (measured at 0.22 against
        0.33 after ~20 stages over the same 200k utterances; utterances of a fresh corpus: 0.32)."""
        loss_only = replace(self.s, eval_cer_count=0)
        trained_on = self.train_data.sampler.data  # the sampler's own corpus: its first utterances never move
        return evaluate(self.model, self.ctc_head, self.tok, trained_on, loss_only)["loss"]

    def checkpoint(self, step: int) -> None:
        save_state(self.run / "state.pt", **self.weights(), optimizer=self.optimizer.state_dict(), step=step,
                   best=self.state["best"], settings=asdict(self.s))  # fmt: skip

    def weights(self) -> dict:
        """On the CPU, so that a CUDA run's checkpoints load anywhere."""
        cpu = lambda m: {k: v.cpu() for k, v in m.state_dict().items()}  # noqa: E731
        return {"model": cpu(self.model), "ctc_head": cpu(self.ctc_head)}

    def keep_best(self, metrics: dict, step: int) -> None:
        loss = metrics.get("eval-seen/loss", float("inf"))
        if loss < self.state["best"]:
            self.state["best"] = loss
            self.save_evaluated(self.run / "best.pt", metrics, step)

    def save_evaluated(self, path: Path, metrics: dict, step: int) -> None:
        """Weights with what their evaluation measured: what export.save_default and export.average read."""
        save_state(path, **self.weights(), step=step, metrics=metrics, settings=asdict(self.s))

    def train(self, until: int) -> int:
        step = self.state["step"]
        params, utts = count_parameters(self.model) / 1e6, len(self.train_data.sampler.data)
        self.log(f"train: {params:.2f}M params, {utts} utterances, from step {step}")
        self.log(f"train: on {self.describe_device()}")
        try:
            return self.train_steps(step, until)
        finally:
            self.train_data.close()

    def train_steps(self, step: int, until: int) -> int:
        s, last_save, window = self.s, time.time(), []
        first, started, clock = step, time.time(), {}
        while step < until:
            window.append(self.step(step))
            step += 1
            if s.seconds > 0 and step - first in (FIT_FROM, FIT_AT):
                clock[step - first] = time.time()
                if step - first == FIT_AT:
                    pace = (FIT_AT - FIT_FROM) / (clock[FIT_AT] - clock[FIT_FROM])
                    until, s = self.fit_schedule(step, pace, started), self.s
            if step % s.log_every == 0:
                self.log_window(step, window)
                window = []
                self.train_data.refresh()
            if step % s.eval_every == 0 or step == until:
                metrics = self.evaluate(step)
                self.keep_best(metrics, step)
                if s.keep_evals:
                    self.save_evaluated(self.run / f"step-{step}.pt", metrics, step)
                self.log("eval " + json.dumps(metrics))
                self.append_metrics({"eval": metrics})
            if time.time() - last_save > s.checkpoint_seconds or step == until:
                self.checkpoint(step)
                last_save = time.time()
        return step

    def write_settings(self) -> None:
        (self.run / "settings.json").write_text(json.dumps(asdict(self.s), indent=1))

    def fit_schedule(self, step: int, steps_per_second: float, started: float) -> int:
        """--seconds: the steps left at the measured pace (less a margin for evaluations and the last
        checkpoint) become the cosine horizon and the last step: on a lent machine the time is fixed and
        the pace is not known until it runs."""
        left = self.s.seconds - (time.time() - started)
        last = max(step + 1, step + int(FIT_MARGIN * left * steps_per_second))
        self.s = replace(self.s, steps=last)
        self.write_settings()
        self.log(f"train: {steps_per_second:.2f} steps/s, {left:.0f} s left: schedule ends at step {last}")
        return last

    def describe_device(self) -> str:
        precision = "bf16 autocast" if self.s.bf16 else "fp32"
        if self.s.bf16 and self.device.type == "cpu" and cpu_emulates_bf16():
            precision += f" emulated on this {torch.backends.cpu.get_cpu_capability()} CPU: slower than fp32"
        if self.s.compile:
            precision += ", compiled layers"
        workers = f"{self.train_data.workers} batch workers"
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)}, {precision}, {workers})"
        return f"cpu ({torch.get_num_threads()} threads, {precision}, {workers})"

    def log_window(self, step: int, window: list[dict]) -> None:
        mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
        rate = self.s.batch / (mean["data_s"] + mean["step_s"])
        line = {"step": step, "lr": round(learning_rate(self.s, step), 6), "utt_per_s": round(rate, 1)}
        line.update({k: round(v, 4) for k, v in mean.items()})
        line["max_seconds"] = round(self.train_data.sampler.max_seconds(step), 1)
        self.log("step " + json.dumps(line))
        self.append_metrics({"train": line})

    def append_metrics(self, record: dict) -> None:
        with open(self.run / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")


# ---- command line --------------------------------------------------------------------------------------


def add_settings_arguments(parser: argparse.ArgumentParser, settings: type) -> None:
    """A flag per settings field; booleans as --x / --no-x (type=bool read "False" as True)."""
    for f in fields(settings):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, TrainSettings)
    parser.add_argument("--until", type=int, default=None, help="stop at this step (default: --steps)")


def run(args: argparse.Namespace, settings=None) -> int:
    """`rawwave train`: train (or resume) a run. settings: the CLI's, unused here."""
    s = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings)})
    trainer = Trainer(s, log=stamped)
    trainer.train(args.until or s.steps)
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m export.train", description=__doc__.split("\n")[0])
    add_arguments(cli)
    sys.exit(run(cli.parse_args()))
