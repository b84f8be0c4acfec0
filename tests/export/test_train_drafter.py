"""export/train_drafter.py on a tiny random target: batched greedy equals one-by-one greedy, the parallel
training step is Assistant.step at each position (the worker's convention), a few steps lower the loss,
and the saved assistant loads."""

import random
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from export import tokenizer
from export import train_drafter as td
from export.checkpoint import load_assistant
from export.model import Gemma4Unified
from export.tiny import tiny_config

FRAME = 640


@pytest.fixture(scope="module")
def target() -> Gemma4Unified:
    torch.manual_seed(0)
    return Gemma4Unified(tiny_config(vision=False)).eval()


def sequences(target: Gemma4Unified, count: int = 6) -> list[td.Sequence]:
    rng, audio = random.Random(0), target.cfg.audio_token_id
    out = []
    for _ in range(count):
        n = rng.randint(1, 4)
        ids = [2, *(rng.randrange(20, 200) for _ in range(rng.randint(1, 5))), *[audio] * n, 7]
        frames = np.random.default_rng(rng.getrandbits(32)).standard_normal((n, FRAME)).astype(np.float32)
        out.append(td.Sequence(ids, len(ids), 0.1 * frames))
    return out


def settings(tmp_path) -> td.DrafterSettings:
    return td.DrafterSettings(hidden=32, intermediate=64, heads=2, max_tokens=12, gen_batch=4, depth=3,
                              run=str(tmp_path / "run"), out=str(tmp_path / "assistant"))  # fmt: skip


def test_batched_greedy_equals_one_at_a_time(target):
    seqs = sequences(target)
    batched = td.greedy_batch(target, seqs, 10)
    alone = [td.greedy_batch(target, [q], 10)[0] for q in seqs]
    assert batched == alone


def test_parallel_queries_follow_the_worker_convention(target, tmp_path):
    s = settings(tmp_path)
    assistant = td.build_assistant(td.assistant_config(s, target.cfg.text), target, 0).eval()
    seqs = td.decode_all(target, sequences(target), s, log=lambda _: None)
    f = td.target_features(target, seqs)[0]
    q = td.collate([f], s.depth)
    with torch.no_grad():
        masks = td.query_masks(assistant, q.positions, q.kv[0].shape[2])
        Q = q.positions.shape[1]
        assert q.positions[0].tolist() == list(range(seqs[0].start, len(seqs[0].ids) - 1))
        logits, hidden = td.step_queries(
            assistant, target.embed_tokens(q.ids[:, :, 0]), q.hidden, q.kv, q.positions, masks
        )
        for i in range(Q):
            p = int(q.positions[0, i])  # the context holds p positions; the drafter gets x[p] and h[p - 1]
            kv = tuple(t[None, :, :p] for t in f.kv)
            embeds, prev = target.embed_tokens(f.ids[p].view(1, 1)), f.hidden[p - 1].view(1, 1, -1)
            want, want_hidden = assistant.step(embeds, prev, kv, torch.tensor([[p]]))
            torch.testing.assert_close(logits[0, i], want[0, 0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(hidden[0, i], want_hidden[0, 0], atol=1e-4, rtol=1e-4)


def test_training_lowers_the_loss_and_the_assistant_loads(target, tmp_path):
    s = settings(tmp_path)
    torch.manual_seed(0)
    assistant = td.build_assistant(td.assistant_config(s, target.cfg.text), target, 0)
    seqs = td.decode_all(target, sequences(target), s, log=lambda _: None)
    batch = td.collate(td.target_features(target, seqs), s.depth)
    optimizer = torch.optim.AdamW(assistant.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, _ = td.draft_loss(assistant, target, batch, s.depth)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    td.save_assistant(assistant, s.out)
    loaded = load_assistant(s.out)
    for name, p in assistant.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], p)


@pytest.fixture(scope="module")
def interleaved_target() -> Gemma4Unified:
    """The tiny target with our vocabulary's audio ids (the lockstep writes export/tokenizer.py's)."""
    torch.manual_seed(0)
    ids = {"audio_token_id": tokenizer.AUDIO, "boa_token_id": tokenizer.BOA, "eoa_token_index": tokenizer.EOA}
    return Gemma4Unified(replace(tiny_config(vision=False), **ids)).eval()


def interleaved_sequences(count: int = 5) -> list[td.Sequence]:
    out = []
    for i in range(count):
        frames = np.random.default_rng(i).standard_normal((1 + 2 * i, FRAME)).astype(np.float32)
        out.append(td.Sequence([2, 4, 30 + i], 0, 0.1 * frames, None, respond=i % 2 == 0))
    return out


def test_lockstep_writes_each_sequence_as_alone(interleaved_target):
    target, tok = interleaved_target, tokenizer.build(300, ["one two three", "model", "user"])
    batched = interleaved_sequences()
    td.Lockstep(target, tok, batched).write(chunk=3, max_tokens=6)
    for i, q in enumerate(batched):
        alone = interleaved_sequences()[i]
        td.Lockstep(target, tok, [alone]).write(chunk=3, max_tokens=6)
        assert (q.ids, q.written, q.start) == (alone.ids, alone.written, alone.start)
        fed = [t for t, w in zip(q.ids, q.written, strict=True) if not w]  # a random target writes anything
        assert fed.count(tokenizer.AUDIO) == len(q.frames)
        assert fed.count(tokenizer.EOA) == -(-len(q.frames) // 3)  # a chunk per 3 frames
        turn = tokenizer.model_turn_start(tok)
        assert q.ids[q.start - len(turn) : q.start] == turn
    feats = td.target_features(target, batched)
    queries = td.collate(feats, 3)
    for b, f in enumerate(feats):  # a query's labels are what the target wrote
        for i, j in torch.nonzero(queries.valid[b]).tolist():
            assert f.written[queries.positions[b, i] + j]


def test_init_starts_a_run_from_a_saved_assistant(target, tmp_path):
    """--init: a fresh run's assistant takes a saved one's weights; another shape is refused."""
    s = settings(tmp_path)
    cfg = td.assistant_config(s, target.cfg.text)
    td.save_assistant(td.build_assistant(cfg, target, 1), s.out)
    run = SimpleNamespace(cfg=cfg, assistant=td.build_assistant(cfg, target, 2), log=lambda _: None)
    td.DrafterTrainer.start_from(run, s.out)  # type: ignore[arg-type]
    saved = load_assistant(s.out).state_dict()
    for name, p in run.assistant.state_dict().items():
        torch.testing.assert_close(saved[name], p)
    wider = td.assistant_config(replace(s, hidden=48), target.cfg.text)
    other = SimpleNamespace(cfg=wider, assistant=td.build_assistant(wider, target, 2), log=lambda _: None)
    with pytest.raises(ValueError, match="config differs"):
        td.DrafterTrainer.start_from(other, s.out)  # type: ignore[arg-type]
