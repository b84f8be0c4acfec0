"""Training the MTP drafter (gemma4_unified_assistant) after the target, on the target's own greedy outputs.

Three stages, each resumable under --run (default runs/drafter, git-ignored):
1. sequences: corpus utterances in the target's prompt format (export/tokenizer.py), decoded greedily by
   the frozen target (KV cache, fp32, left-padded batches) -> the prompt + what the target itself writes:
   the model turn (branch format), or each chunk's words and the response (interleaved format, chunk by
   chunk in lockstep as worker/interleaved.py streams it).
2. training: the worker's drafting convention (worker/decoding.py, worker/runtime.Drafter.propose), for
   every model-turn position p of a sequence x with the target's normed hidden states h and present KV:

       step 1:  assistant(embed(x[p]),      h[p - 1],  position p, the target KV of positions < p) -> x[p+1]
       step j:  assistant(embed(x[p+j-1]),  next_hidden of step j-1, position p, same KV)          -> x[p+j]

   All positions of a batch of sequences run in parallel, each query with its own mask (keys < p).
   Cross entropy against the target's greedy tokens, step j weighted STEP_DECAY ** (j - 1), while the
   target wrote x[p + 1] .. x[p + j] (a chunk's words end where the model asked for audio).
3. measurement: export target + assistant (export.exporter), then the worker's own speculative decoding
   (worker/decoding.generate through worker/runtime's ONNX sessions) against plain greedy.

Knows the target through export/model.py's API and the drafter through export/assistant.py's modules.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from export import tokenizer
from export.assistant import Assistant, AssistantConfig, shared_kv_from_present
from export.checkpoint import load_assistant, load_model, save_assistant
from export.dataset import Corpus, stamped
from export.exporter import TRAINER_FILE
from export.model import FULL, SLIDING, Gemma4Unified, TextConfig, _additive, count_parameters
from export.train import add_settings_arguments, frames_of, save_atomically, save_state, warmup_cosine

STEP_DECAY = 0.7  # loss weight of draft step j: STEP_DECAY ** (j - 1)
CHUNK_MAX_TOKENS = 24  # as worker/interleaved.py
STOPS = (tokenizer.TURN_END, tokenizer.EOS)


@dataclass(frozen=True)
class DrafterSettings:
    # where
    checkpoint: str = "checkpoints/default"  # the frozen target
    out: str = "checkpoints/default-assistant"  # the saved assistant (HF layout)
    data: str = "data/corpus"  # export.dataset output
    run: str = "runs/drafter"  # sequences.pt, state.pt, metrics.jsonl, the measurement's model dir
    init: str = ""  # an assistant (HF layout) a fresh run starts from: more data for a trained drafter
    seed: int = 0
    # the assistant (layers alternate sliding/full, the last full; heads of the target's head_dim)
    hidden: int = 256
    intermediate: int = 512
    layers: int = 2
    heads: int = 4
    # the target's outputs
    utterances: int = 3000  # training utterances decoded by the target
    eval_utterances: int = 64  # held-out (eval-heldout) utterances for the teacher-forced metrics
    gen_batch: int = 32
    max_tokens: int = 128  # per model turn (the worker's benchmark budget)
    respond_prob: float = 0.6  # ask for transcript + response, else transcript only
    prefix_prob: float = 0.15  # cut the audio at a random frame (the worker's partials)
    # optimization
    depth: int = 4  # draft steps trained (the exporter's num_draft_tokens)
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 100
    steps: int = 1200  # cosine horizon; stop any time, resume continues
    weight_decay: float = 0.01
    threads: int = 1
    # bookkeeping
    log_every: int = 25
    eval_every: int = 250  # also saves the assistant to --out
    checkpoint_seconds: float = 120.0
    measure: int = 50  # held-out utterances for the worker-decoding measurement at the end (0: skip)


def assistant_config(s: DrafterSettings, target: TextConfig) -> AssistantConfig:
    """Heads of the target's head_dim / kv heads: the drafter attends the target's KV as it is."""
    types = tuple(FULL if (i % 2 or i == s.layers - 1) else SLIDING for i in range(s.layers))
    text = TextConfig(
        vocab_size=target.vocab_size,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=target.num_key_value_heads,
        head_dim=target.head_dim,
        global_head_dim=target.global_head_dim,
        num_global_key_value_heads=target.num_global_key_value_heads,
        attention_k_eq_v=target.attention_k_eq_v,
        layer_types=types,
        sliding_window=target.sliding_window,
        rope_parameters=target.rope_parameters,
        rms_norm_eps=target.rms_norm_eps,
        pad_token_id=target.pad_token_id,
        max_position_embeddings=target.max_position_embeddings,
        final_logit_softcapping=None,
        num_kv_shared_layers=s.layers,
    )
    return AssistantConfig(text=text, backbone_hidden_size=target.hidden_size)


def build_assistant(cfg: AssistantConfig, target: Gemma4Unified, seed: int) -> Assistant:
    """A fresh assistant whose tied LM head starts as the target's (when the widths match)."""
    torch.manual_seed(seed)
    assistant = Assistant(cfg)
    head = target.language_model.embed_tokens.weight
    if head.shape == assistant.model.embed_tokens.weight.shape:
        with torch.no_grad():
            assistant.model.embed_tokens.weight.copy_(head)
    return assistant


# ---- 1. the target's own outputs -------------------------------------------------------------------------


@dataclass
class Sequence:
    ids: list[int]  # prompt (AUDIO placeholders) + what the target wrote, a model turn's stop token included
    start: int  # first model-turn index
    frames: np.ndarray  # (N, frame) float32
    written: list[bool] | None = None  # per id: the target wrote it (None: every id from start on)
    respond: bool = False  # interleaved: the target writes a response after the turn closes

    def written_mask(self) -> list[bool]:
        if self.written is not None:
            return self.written
        return [i >= self.start for i in range(len(self.ids))]


@dataclass(frozen=True)
class StreamFormat:
    """How the target streams (its checkpoint's rawwave_runtime.json, else Gemma's branch format)."""

    interleaved: bool = False
    chunk_frames: int = 8

    @classmethod
    def of(cls, checkpoint: str | Path) -> StreamFormat:
        file = Path(checkpoint) / TRAINER_FILE
        streaming = json.loads(file.read_text()).get("streaming", {}) if file.is_file() else {}
        return cls(streaming.get("format") == "interleaved", streaming.get("chunk_frames", 8))


def utterance_prompt(
    tok, audio: np.ndarray, frame: int, s: DrafterSettings, rng: random.Random, interleaved: bool = False
) -> Sequence:
    """The open prompt for one utterance: respond or transcribe, sometimes an audio prefix only (branch
    format: the worker's partials). Interleaved: the user turn's start, the chunks come as it is written."""
    n = max(1, math.ceil(len(audio) / frame))
    respond = rng.random() < s.respond_prob
    instruction = tokenizer.INSTRUCT_RESPOND if respond else tokenizer.INSTRUCT_TRANSCRIBE
    if interleaved:
        user = tokenizer.user_turn_start(tok, instruction)
        return Sequence(user, 0, frames_of(audio, frame), None, respond)
    if rng.random() < s.prefix_prob:
        n, instruction = rng.randint(1, n), tokenizer.INSTRUCT_TRANSCRIBE
    padded = np.zeros(n * frame, np.float32)
    padded[: min(len(audio), n * frame)] = audio[: n * frame]
    p = tokenizer.prompt(tok, n, instruction, None)
    return Sequence(p.ids, p.target_start, padded.reshape(n, frame))


def prompts(
    s: DrafterSettings, tok, data: Corpus, count: int, frame: int, seed: str, interleaved: bool = False
) -> list[Sequence]:
    rng = random.Random(f"{s.seed}-{seed}")
    picks = rng.sample(range(len(data)), min(count, len(data)))
    return [utterance_prompt(tok, data[i][0], frame, s, rng, interleaved) for i in picks]


@torch.no_grad()
def greedy_batch(model: Gemma4Unified, seqs: list[Sequence], max_tokens: int) -> list[list[int]]:
    """The target's greedy model turns for prompts of different lengths: left-padded, masked, each row at
    its own positions; a row ends after its first stop token."""
    B, T = len(seqs), max(len(q.ids) for q in seqs)
    ids, mask = torch.full((B, T), tokenizer.PAD), torch.zeros(B, T, dtype=torch.long)
    for b, q in enumerate(seqs):
        ids[b, T - len(q.ids) :], mask[b, T - len(q.ids) :] = torch.tensor(q.ids), 1
    audio = model.embed_audio(torch.from_numpy(np.concatenate([q.frames for q in seqs]))[None])[
        0
    ]  # (sum N, H)
    embeds = model.embed_inputs(ids, audio_features=audio)  # (B, T, H)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T)
    logits, _, past = model.decode(embeds, positions, [], attention_mask=mask, num_logits_to_keep=1)
    out, done = [[] for _ in seqs], torch.zeros(B, dtype=torch.bool)
    for _ in range(max_tokens):
        token = logits[:, -1].argmax(-1)  # (B,)
        for b in range(B):
            if not done[b]:
                out[b].append(int(token[b]))
        done |= torch.isin(token, torch.tensor(STOPS))
        if done.all():
            break
        positions = positions[:, -1:] + 1  # (B, 1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
        logits, _, past = model.decode(
            model.embed_tokens(token[:, None]), positions, past, attention_mask=mask
        )
    return out


def decode_all(
    model: Gemma4Unified, seqs: list[Sequence], s: DrafterSettings, log, tok=None, stream=None
) -> list[Sequence]:
    """What the target writes for each prompt, in place. tok and stream: for an interleaved target."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].frames))  # similar lengths pad little
    t0 = time.time()
    for k in range(0, len(order), s.gen_batch):
        chunk = [seqs[i] for i in order[k : k + s.gen_batch]]
        if stream is not None and stream.interleaved:
            Lockstep(model, tok, chunk).write(stream.chunk_frames, s.max_tokens)
        else:
            for q, turn in zip(chunk, greedy_batch(model, chunk, s.max_tokens), strict=True):
                q.ids = q.ids + turn
        if (k // s.gen_batch) % 10 == 0:
            log(f"sequences: {k + len(chunk)}/{len(seqs)} decoded, {time.time() - t0:.0f} s")
    return seqs


class Lockstep:
    """Interleaved sequences written by the target, a batch at a time: every row's next chunk (or word)
    goes into one decoder call, rows of different lengths masked apart (each at its own positions).
    On entry a sequence's ids are its user turn's start (the instruction)."""

    def __init__(self, model: Gemma4Unified, tok, seqs: list[Sequence]) -> None:
        self.model, self.seqs = model, seqs
        self.turn = tokenizer.model_turn_start(tok)
        B = len(seqs)
        self.past: list = []
        self.mask = torch.zeros(B, 0, dtype=torch.long)
        self.length = torch.zeros(B, dtype=torch.long)  # real positions per row
        self.logits = torch.zeros(B, model.cfg.text.vocab_size)
        for q in seqs:
            q.written = [False] * len(q.ids)
        self.feed([model.embed_tokens(torch.tensor(q.ids)) for q in seqs])

    def feed(self, rows: list[torch.Tensor | None]) -> None:
        """Append each row's embeddings (n_b, H) (None: nothing), left-padded so that every row's last
        real position is the call's last column."""
        B, T = len(rows), max(0 if r is None else len(r) for r in rows)
        embeds = torch.zeros(B, T, self.model.cfg.text.hidden_size)
        new_mask = torch.zeros(B, T, dtype=torch.long)
        positions = self.length[:, None].expand(B, T).clone()
        for b, r in enumerate(rows):
            if r is not None and len(r):
                embeds[b, T - len(r) :], new_mask[b, T - len(r) :] = r, 1
                positions[b, T - len(r) :] = self.length[b] + torch.arange(len(r))
        self.mask = torch.cat([self.mask, new_mask], 1)
        logits, _, self.past = self.model.decode(
            embeds, positions, self.past, attention_mask=self.mask, num_logits_to_keep=1
        )
        fed = new_mask.sum(1)  # (B,)
        self.logits = torch.where((fed > 0)[:, None], logits[:, -1], self.logits)
        self.length += fed

    def write(self, chunk: int, max_tokens: int) -> None:
        n_chunks = max(-(-len(q.frames) // chunk) for q in self.seqs)
        for k in range(n_chunks):
            rows = [self.chunk(q, q.frames[k * chunk : (k + 1) * chunk]) for q in self.seqs]
            self.feed(rows)
            self.generate(
                [r is not None for r in rows], CHUNK_MAX_TOKENS, (tokenizer.BOA, *STOPS), (tokenizer.BOA,)
            )
        for (
            q
        ) in self.seqs:  # the turn closes after the last chunk's words: the worker never feeds that <|audio>
            if q.ids[-1] == tokenizer.BOA and q.written[-1]:
                q.ids.pop()
                q.written.pop()
            q.ids += self.turn
            q.written += [False] * len(self.turn)
            q.start = len(q.ids)
        self.feed([self.model.embed_tokens(torch.tensor(self.turn)) for _ in self.seqs])
        self.generate([q.respond for q in self.seqs], max_tokens, STOPS, STOPS)

    def chunk(self, q: Sequence, frames: np.ndarray) -> torch.Tensor | None:
        """A row's next chunk as ids (its <|audio> may be the target's own stop) and embeddings."""
        if not len(frames):
            return None
        if q.ids[-1] != tokenizer.BOA:
            q.ids.append(tokenizer.BOA)
            q.written.append(False)
        q.ids += [tokenizer.AUDIO] * len(frames) + [tokenizer.EOA]
        q.written += [False] * (len(frames) + 1)
        audio = self.model.embed_audio(torch.from_numpy(frames)[None])[0]  # (n, H)
        wrap = self.model.embed_tokens(torch.tensor([tokenizer.BOA, tokenizer.EOA]))  # (2, H)
        return torch.cat([wrap[:1], audio, wrap[1:]])

    def generate(
        self, active: list[bool], budget: int, stops: tuple[int, ...], kept: tuple[int, ...]
    ) -> None:
        """Greedy tokens for the active rows until each writes a stop or the budget ends. Stops in `kept`
        stay in the ids (a drafter may guess them): a chunk's <|audio> (the worker feeds it next anyway) and
        the end of the model turn; not an <eos> after a chunk's words (the worker never feeds it)."""
        active = list(active)
        for _ in range(budget):
            if not any(active):
                return
            tokens = self.logits.argmax(-1).tolist()  # (B,)
            rows: list[torch.Tensor | None] = []
            for b, q in enumerate(self.seqs):
                token, stop = tokens[b], tokens[b] in stops
                if active[b] and (not stop or token in kept):
                    q.ids.append(token)
                    q.written.append(True)
                rows.append(
                    self.model.embed_tokens(torch.tensor([token])) if active[b] and not stop else None
                )
                active[b] = active[b] and not stop
            if any(r is not None for r in rows):
                self.feed(rows)


# ---- the target's state along a sequence ---------------------------------------------------------------


@dataclass
class Features:
    """Teacher-forced target state of one sequence, what the worker's context holds at each position."""

    ids: torch.Tensor  # (L,) long
    written: torch.Tensor  # (L,) bool: the target wrote this token
    hidden: torch.Tensor  # (L, Hb) normed last hidden state
    kv: tuple[torch.Tensor, ...]  # (sliding_k, sliding_v, full_k, full_v), (kvh, L, hd) each


@torch.no_grad()
def target_features(model: Gemma4Unified, seqs: list[Sequence], batch: int = 16) -> list[Features]:
    """One right-padded forward per batch (causal: padding never reaches a real position)."""
    out = []
    for k in range(0, len(seqs), batch):
        chunk = seqs[k : k + batch]
        B, T = len(chunk), max(len(q.ids) for q in chunk)
        ids, mask = torch.full((B, T), tokenizer.PAD), torch.zeros(B, T, dtype=torch.long)
        for b, q in enumerate(chunk):
            ids[b, : len(q.ids)], mask[b, : len(q.ids)] = torch.tensor(q.ids), 1
        audio = model.embed_audio(torch.from_numpy(np.concatenate([q.frames for q in chunk]))[None])[0]
        embeds = model.embed_inputs(ids, audio_features=audio)  # (B, T, H)
        positions = torch.arange(T).expand(B, T)
        _, hidden, present = model.decode(embeds, positions, [], attention_mask=mask, num_logits_to_keep=1)
        shared = shared_kv_from_present(model.cfg.text, present)  # 4 x (B, kvh, T, hd)
        for b, q in enumerate(chunk):
            n = len(q.ids)
            kv = tuple(t[b, :, :n].clone() for t in shared)
            written = torch.tensor(q.written_mask(), dtype=torch.bool)
            out.append(Features(ids[b, :n].clone(), written, hidden[b, :n].clone(), kv))
    return out


# ---- 2. the drafter's loss -----------------------------------------------------------------------------


@dataclass
class Queries:
    """Every position p of a batch (B sequences, Q = the most of one) where the target wrote x[p] and
    x[p + 1], padded."""

    ids: torch.Tensor  # (B, Q, depth + 1) x[p], x[p+1], .. x[p+depth]
    valid: torch.Tensor  # (B, Q, depth + 1) bool: the target wrote x[p] .. x[p+j]
    hidden: torch.Tensor  # (B, Q, Hb) h[p - 1]
    positions: torch.Tensor  # (B, Q) p
    kv: tuple[torch.Tensor, ...]  # 4 x (B, kvh, S, hd), S the longest sequence, zero-padded


def query_positions(f: Features) -> torch.Tensor:
    written = f.written
    return torch.nonzero(written[1:-1] & written[2:]).flatten() + 1  # p >= 1 with x[p], x[p+1] written


def collate(feats: list[Features], depth: int) -> Queries:
    B, S = len(feats), max(len(f.ids) for f in feats)
    queries = [query_positions(f) for f in feats]
    Q = max(1, max(len(q) for q in queries))
    ids = torch.full((B, Q, depth + 1), tokenizer.PAD)
    valid = torch.zeros(B, Q, depth + 1, dtype=torch.bool)
    hidden = torch.zeros(B, Q, feats[0].hidden.shape[-1])
    positions = torch.ones(B, Q, dtype=torch.long)  # padding queries see one key: finite, and unused
    kv = [torch.zeros(B, t.shape[0], S, t.shape[2]) for t in feats[0].kv]
    for b, (f, qp) in enumerate(zip(feats, queries, strict=True)):
        n, L = len(qp), len(f.ids)
        at = qp[:, None] + torch.arange(depth + 1)[None]  # (n, depth + 1)
        inside = at < L
        at = at.clamp(max=L - 1)
        ids[b, :n] = f.ids[at]
        valid[b, :n] = (f.written[at] & inside).long().cumprod(-1).bool()
        hidden[b, :n] = f.hidden[qp - 1]
        positions[b, :n] = qp
        for dst, src in zip(kv, f.kv, strict=True):
            dst[b, :, : src.shape[1]] = src
    return Queries(ids, valid, hidden, positions, tuple(kv))


def query_masks(assistant: Assistant, positions: torch.Tensor, S: int) -> dict[str, torch.Tensor]:
    """Per query at position p, what Assistant.step sees with the cache of p positions: full layers every
    key < p, sliding layers the newest window + 1 of them. Additive, (B, 1, Q, S)."""
    k = torch.arange(S)[None, None, :]  # (1, 1, S)
    p = positions[..., None]  # (B, Q, 1)
    full = k < p
    sliding = full & (p - 1 - k <= assistant.cfg.window)
    return {FULL: _additive(full, torch.float32), SLIDING: _additive(sliding, torch.float32)}


def step_queries(
    assistant: Assistant, token_embeds, prev_hidden, kv: tuple, positions, masks: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assistant.step with one mask per query (many positions at once): logits (B, Q, V), next_hidden."""
    x = assistant.pre_projection(torch.cat([token_embeds, prev_hidden], dim=-1))  # (B, Q, Ha)
    shared = {SLIDING: (kv[0], kv[1]), FULL: (kv[2], kv[3])}
    ropes = assistant.model.ropes(positions, x.dtype)
    for layer in assistant.model.layers:
        t = layer.layer_type
        x, _ = layer(x, ropes[t], masks[t], shared[t])
    x = assistant.model.norm(x)  # (B, Q, Ha)
    return assistant.logits(x), assistant.post_projection(x)


def draft_loss(
    assistant: Assistant, target: Gemma4Unified, q: Queries, depth: int
) -> tuple[torch.Tensor, list[float]]:
    """Weighted cross entropy of the depth draft steps; also each step's accuracy where the previous
    drafts were right (the chance a round accepts step j given it accepted step j - 1)."""
    masks = query_masks(assistant, q.positions, q.kv[0].shape[2])
    hidden, total, weights, accs = q.hidden, 0.0, 0.0, []
    alive = torch.ones_like(q.positions, dtype=torch.bool)  # (B, Q) every earlier draft right
    with torch.no_grad():
        embeds = target.embed_tokens(q.ids)  # (B, Q, depth + 1, Hb)
    for j in range(1, depth + 1):
        valid = q.valid[:, :, j]  # (B, Q) the target wrote x[p + 1] .. x[p + j]
        if not valid.any():
            break
        logits, hidden = step_queries(assistant, embeds[:, :, j - 1], hidden, q.kv, q.positions, masks)
        labels = q.ids[:, :, j]  # (B, Q)
        w = STEP_DECAY ** (j - 1)
        total = total + w * F.cross_entropy(logits[valid], labels[valid])
        weights += w
        right = (logits.argmax(-1) == labels) & valid
        accs.append((right & alive).sum().item() / max(1, (alive & valid).sum().item()))
        alive = alive & right
    return total / weights, accs


def learning_rate(s: DrafterSettings, step: int) -> float:
    return warmup_cosine(s.lr, s.warmup, s.steps, step, floor=0.05)


@torch.no_grad()
def evaluate(assistant: Assistant, target: Gemma4Unified, feats: list[Features], depth: int) -> dict:
    assistant.eval()
    losses, accs = [], []
    for k in range(0, len(feats), 32):
        loss, acc = draft_loss(assistant, target, collate(feats[k : k + 32], depth), depth)
        losses.append(loss.item())
        accs.append(acc)
    assistant.train()
    acc = np.mean(np.array([a + [0.0] * (depth - len(a)) for a in accs]), axis=0)
    return {
        "loss": round(float(np.mean(losses)), 4),
        **{f"acc{j + 1}": round(float(a), 4) for j, a in enumerate(acc)},
    }


# ---- the loop ------------------------------------------------------------------------------------------


class DrafterTrainer:
    def __init__(self, s: DrafterSettings, log=print):
        self.s, self.log, self.run = s, log, Path(s.run)
        self.run.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(s.threads)
        self.target = load_model(s.checkpoint, dtype=torch.float32).eval()
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.tok = tokenizer.load(Path(s.checkpoint) / "tokenizer.json")
        self.stream = StreamFormat.of(s.checkpoint)
        self.cfg = assistant_config(s, self.target.cfg.text)
        self.assistant = build_assistant(self.cfg, self.target, s.seed)
        if s.init:
            self.start_from(s.init)
        self.optimizer = torch.optim.AdamW(
            self.assistant.parameters(), lr=s.lr, betas=(0.9, 0.98), weight_decay=s.weight_decay
        )
        self.state = self.load_state()
        self.train_feats = target_features(self.target, self.sequences("train", s.utterances))
        self.eval_feats = target_features(self.target, self.sequences("eval-heldout", s.eval_utterances))
        (self.run / "settings.json").write_text(json.dumps(asdict(s), indent=1))

    def sequences(self, split: str, count: int) -> list[Sequence]:
        """The target's decoded sequences of a split, cached in the run (decoding is the slow part)."""
        path = self.run / f"sequences-{split}.pt"
        if path.exists():
            cached = torch.load(path, weights_only=False)
            if len(cached) >= count:
                return cached[:count]
        frame = self.target.cfg.audio.audio_embed_dim
        interleaved = self.stream.interleaved
        seqs = prompts(self.s, self.tok, Corpus(self.s.data, split), count, frame, split, interleaved)
        seqs = decode_all(self.target, seqs, self.s, self.log, self.tok, self.stream)
        save_atomically(seqs, path)
        written = [sum(q.written_mask()) for q in seqs]
        self.log(f"sequences {split}: {len(seqs)}, the target wrote {np.mean(written):.1f} tokens each")
        return seqs

    def start_from(self, path: str) -> None:
        """A saved assistant's weights (a state.pt of this run, when there is one, replaces them)."""
        saved = load_assistant(path, dtype=torch.float32)
        if saved.cfg != self.cfg:
            raise ValueError(f"--init {path}: its config differs from this run's (--hidden/--layers/--heads)")
        self.assistant.load_state_dict(saved.state_dict())
        self.log(f"drafter: starting from {path}")

    def load_state(self) -> dict:
        path = self.run / "state.pt"
        if not path.exists():
            return {"step": 0}
        state = torch.load(path, weights_only=False)
        self.assistant.load_state_dict(state["assistant"])
        self.optimizer.load_state_dict(state["optimizer"])
        return {"step": state["step"]}

    def checkpoint(self, step: int) -> None:
        save_state(self.run / "state.pt", assistant=self.assistant.state_dict(),
                   optimizer=self.optimizer.state_dict(), step=step, settings=asdict(self.s))  # fmt: skip

    def step(self, step: int) -> dict:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.s, step)
        rng = random.Random(f"{self.s.seed}-batch-{step}")
        feats = [self.train_feats[rng.randrange(len(self.train_feats))] for _ in range(self.s.batch)]
        t0 = time.time()
        loss, accs = draft_loss(self.assistant, self.target, collate(feats, self.s.depth), self.s.depth)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.assistant.parameters(), 1.0)
        self.optimizer.step()
        return {"loss": loss.item(), "acc1": accs[0], "step_s": time.time() - t0}

    def train(self, until: int) -> int:
        s, step = self.s, self.state["step"]
        params = count_parameters(self.assistant) / 1e6
        self.log(f"drafter: {params:.2f}M params, {len(self.train_feats)} sequences, from step {step}")
        last_save, window = time.time(), []
        while step < until:
            window.append(self.step(step))
            step += 1
            if step % s.log_every == 0:
                mean = {k: round(float(np.mean([w[k] for w in window])), 4) for k in window[0]}
                self.log("step " + json.dumps({"step": step, "lr": round(learning_rate(s, step), 6), **mean}))
                self.append_metrics({"train": {"step": step, **mean}})
                window = []
            if step % s.eval_every == 0 or step == until:
                self.evaluate_and_save(step)
            if time.time() - last_save > s.checkpoint_seconds or step == until:
                self.checkpoint(step)
                last_save = time.time()
        return step

    def evaluate_and_save(self, step: int) -> dict:
        metrics = {"step": step, **evaluate(self.assistant, self.target, self.eval_feats, self.s.depth)}
        self.log("eval " + json.dumps(metrics))
        self.append_metrics({"eval": metrics})
        save_assistant(self.assistant, self.s.out)
        return metrics

    def append_metrics(self, record: dict) -> None:
        with open(self.run / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")


# ---- 3. acceptance through the worker's own decoding -----------------------------------------------------


def measure(s: DrafterSettings, log=print) -> dict:
    """Export target + assistant, then decode held-out utterances (transcript, then response, as the
    session does with respond=True) with no drafter, the drafter at its full k and the worker's adaptive
    drafter. Returns the summary (also written to <run>/acceptance.json)."""
    from export.exporter import export_model
    from rawwave.settings import Settings
    from worker.decoding import AdaptiveDrafter, DecodeStats
    from worker.runtime import Runtime
    from worker.session import Prompt

    model_dir = Path(s.run) / "model"
    export_model(Path(s.checkpoint), model_dir, Path(s.out))
    runtime = Runtime(model_dir, Settings(ort_intra_threads=s.threads, ort_inter_threads=1))
    assert runtime.drafter is not None, "the export has no drafter"
    prompt, data = Prompt.of(runtime, respond=True), Corpus(s.data, "eval-heldout")

    def adaptive() -> AdaptiveDrafter:  # as a session's: shared estimates, drafts gated as served
        return AdaptiveDrafter(runtime.drafter, part="transcript", confidence=Settings().mtp_confidence)

    modes = {"off": lambda: None, "fixed": lambda: runtime.drafter, "adaptive": adaptive}
    stats = {m: {part: DecodeStats() for part in ("transcript", "response")} for m in modes}
    decode = _decode_streamed if runtime.config.streaming.format == "interleaved" else _decode_both
    identical = True
    for i in range(min(s.measure, len(data))):
        pcm = np.round(data[i][0] * 32768).clip(-32768, 32767).astype(np.int16)
        outputs = {m: decode(runtime, prompt, pcm, make(), stats[m]) for m, make in modes.items()}
        identical &= all(out == outputs["off"] for out in outputs.values())
    summary = {"utterances": min(s.measure, len(data)), "identical": identical,
               "num_draft_tokens": runtime.drafter.num_draft_tokens}  # fmt: skip
    for m, parts in stats.items():
        for part, st in parts.items():
            summary[f"{m}/{part}"] = {"tokens": st.tokens, "calls": st.calls, "drafted": st.drafted,
                                      "accepted": st.accepted, "acceptance": round(st.acceptance, 4),
                                      "tokens_per_call": round(st.tokens_per_call, 3),
                                      "tokens_per_s": round(st.tokens_per_s, 1)}  # fmt: skip
    (Path(s.run) / "acceptance.json").write_text(json.dumps(summary, indent=1))
    log("acceptance " + json.dumps(summary))
    return summary


def _decode_both(runtime, prompt, pcm: np.ndarray, drafter, stats: dict) -> tuple[list[int], list[int]]:
    from worker.decoding import Context, generate, prefill

    frame = runtime.config.frame_samples
    pcm = np.concatenate([pcm, np.zeros(-len(pcm) % frame, np.int16)])
    start = runtime.start(prompt.prefix)
    embeds = runtime.embed_audio(pcm)  # (N, H)
    _, _, cache = runtime.extend_embeds(start.cache, start.length, embeds, keep=1)
    ctx = Context(cache, start.length + len(embeds), start.logits, start.hidden)
    budget = len(prompt.suffix) + 128
    transcript = generate(runtime, ctx, prompt.transcript_stop, budget, drafter, prompt.suffix)
    text, end = transcript.tokens[len(prompt.suffix) :], prompt.transcript_end
    after = transcript.ctx if text[-len(end) :] == end else prefill(runtime, transcript.ctx, end)
    response = generate(runtime, after, prompt.response_stop, 128, _response_drafter(drafter))
    stats["transcript"].add(transcript.stats)
    stats["response"].add(response.stats)
    return transcript.tokens, response.tokens


def _decode_streamed(runtime, prompt, pcm: np.ndarray, drafter, stats: dict) -> tuple[list[str], list[str]]:
    """A respond session of the worker's own (interleaved: each chunk's words, then the response) with
    this drafter; its finals and responses."""
    from export.evaluate import decode
    from rawwave.settings import Settings
    from worker.session import StreamingOptions

    options = StreamingOptions.of(runtime.config, Settings(mtp=False))
    out = decode(runtime, options, pcm.tobytes(), True, drafters=(drafter, _response_drafter(drafter)))
    stats["transcript"].add(out.transcript_stats)
    stats["response"].add(out.response_stats)
    return out.finals, out.responses


def _response_drafter(drafter):
    """The response's drafter: an adaptive one gets the response's own shared estimate, as in the worker."""
    from worker.decoding import AdaptiveDrafter

    if not isinstance(drafter, AdaptiveDrafter):
        return drafter
    return AdaptiveDrafter(drafter.inner, part="response", confidence=drafter.confidence)


# ---- command line --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, DrafterSettings)
    parser.add_argument("--until", type=int, default=None, help="stop at this step (default: --steps)")
    parser.add_argument("--measure-only", action="store_true", help="only measure the saved assistant")


def run(args: argparse.Namespace, settings=None) -> int:
    """`rawwave train-drafter`: train (or resume) the drafter, then measure it. settings: unused here."""
    s = DrafterSettings(**{f.name: getattr(args, f.name) for f in fields(DrafterSettings)})
    if not args.measure_only:
        DrafterTrainer(s, log=stamped).train(args.until or s.steps)
    if s.measure:
        torch.set_num_threads(s.threads)
        measure(s, log=stamped)
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m export.train_drafter", description=__doc__.split("\n")[0])
    add_arguments(cli)
    sys.exit(run(cli.parse_args()))
