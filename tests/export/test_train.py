"""Training on a real (tiny) synthesized corpus: examples, loss going down, resume, the saved checkpoint."""

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from export import checkpoint, corpus, dataset, save_default, speech, tokenizer, train
from export.speech import Voice

UTTERANCES = [
    corpus.Utterance("what is two plus three", "2 + 3 = 5", "arithmetic"),
    corpus.Utterance("turn on the kitchen lights", 'ok, kitchen lights on. {"intent":"set_light"}', "home"),
    corpus.Utterance("the cat sat on the mat", corpus.FALLBACK, "sentence"),
]
TINY = train.TrainSettings(hidden=32, layers=2, heads=2, kv_heads=1, head_dim=16, intermediate=64, batch=3,
                           lr=3e-3, warmup=1, steps=50, log_every=5, eval_every=1000, eval_cer_count=1,
                           eval_loss_count=3, curriculum_steps=1, threads=1)  # fmt: skip


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    torch.set_num_threads(TINY.threads)  # CI's two cores are shared; extra threads only spin
    drawn = [(u, speech.synthesize(u.text, Voice("espeak", "en-us+m3", 200, 50))) for u in UTTERANCES]
    (root / "data").mkdir()
    for split in ("train", "eval-seen", "eval-heldout"):
        dataset.write_shard(root / "data" / f"{split}-00000", drawn)
    (root / "run").mkdir()
    text = [u.text for u in UTTERANCES] + [u.response for u in UTTERANCES] + [tokenizer.INSTRUCT_RESPOND]
    tokenizer.save(tokenizer.build(300, text), root / "run" / "tokenizer.json")
    return root


def settings(root, **changes):
    return replace(TINY, data=str(root / "data"), run=str(root / "run"), **changes)


def test_prefix_target_is_the_completed_words(run_dirs):
    data = dataset.Corpus(run_dirs / "data", "train")
    audio, rec = data[2]
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    s = settings(run_dirs, prefix_prob=1.0, augment_prob=0.0)
    for seed in range(10):
        ex = train.make_example(audio, rec, tok, s, random.Random(seed), train=True)
        cut = ex.prompt.n_audio * s.frame / speech.SAMPLE_RATE
        done = [w for w, _, end in rec["words"] if end <= cut]
        assert "".join(train.CTC_ALPHABET[c - 1] for c in ex.ctc) == " ".join(done)
        assert tok.decode(ex.prompt.ids[ex.prompt.target_start : -1]) == " ".join(done)


def test_ctc_units_are_characters_or_the_decoder_tokens(run_dirs):
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    chars = train.ctc_targets(TINY, tok, "it's two")
    assert 0 not in chars  # 0 is the blank
    assert "".join(train.CTC_ALPHABET[c - 1] for c in chars) == "it's two"
    tokens = train.ctc_targets(replace(TINY, ctc_units="tokens"), tok, "it's two")
    assert tok.decode(tokens) == "it's two"
    assert train.ctc_classes(TINY, 300) == len(train.CTC_ALPHABET) + 1


def test_batches_draw_length_neighbours(run_dirs):
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    sampler = train.Sampler(dataset.Corpus(run_dirs / "data", "train"), tok, settings(run_dirs, bucket=1))
    sampler.seconds = np.array([1.0, 5.0, 1.1, 4.9, 1.2, 5.1])
    for seed in range(20):
        pool = sampler.neighbours(np.arange(6), random.Random(seed))
        assert len(pool) == 1
    sampler.s = settings(run_dirs, bucket=3)
    pools = {tuple(sorted(sampler.neighbours(np.arange(6), random.Random(seed))))
             for seed in range(40)}  # fmt: skip
    assert pools == {(0, 2, 4), (2, 3, 4), (1, 3, 4), (1, 3, 5)}  # runs of the length order


def test_prompt_format(run_dirs):
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    p = tokenizer.prompt(tok, 3, tokenizer.INSTRUCT_RESPOND, "two\n2 + 2 = 4")
    text = tok.decode(p.ids, skip_special_tokens=False)
    assert text == ("<bos><|turn>user\n" + tokenizer.INSTRUCT_RESPOND + "<|audio>" + "<|audio|>" * 3
                    + "<audio|><turn|>\n<|turn>model\ntwo\n2 + 2 = 4<turn|>")  # fmt: skip
    assert p.ids[p.audio_start : p.audio_start + 3] == [tokenizer.AUDIO] * 3


def test_a_few_steps_reduce_the_loss(run_dirs):
    s = settings(run_dirs, augment_prob=0.0, prefix_prob=0.0, respond_prob=1.0)
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    model, head = train.build_model(s, tok.get_vocab_size())
    data = dataset.Corpus(s.data, "train")
    batch = train.collate(
        [train.make_example(*data[i], tok, s, random.Random(i), train=True) for i in range(3)]
    )
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=3e-3)
    losses = []
    for _ in range(15):
        ce, ctc, _ = train.forward(model, head, batch)
        opt.zero_grad()
        (ce + 0.4 * ctc).backward()
        opt.step()
        losses.append(ce.item())
    assert losses[-1] < 0.7 * losses[0]


def test_resume_restores_state_and_saves_hf_checkpoint(run_dirs, tmp_path):
    s = settings(run_dirs)
    first = train.Trainer(s, log=lambda m: None)
    assert first.train(until=3) == 3
    second = train.Trainer(s, log=lambda m: None)
    assert second.state["step"] == 3
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert second.train(until=4) == 4
    other = train.Trainer(replace(s, ctc_units="tokens"), log=lambda m: None)  # a changed CTC alphabet
    assert other.state["step"] == 4 and other.ctc_head.out_features == 300
    assert other.train(until=5) == 5
    save_default.save_default(s.run, tmp_path / "default")
    loaded = checkpoint.load_model(tmp_path / "default")
    assert loaded.cfg.audio_token_id == tokenizer.AUDIO
    assert (tmp_path / "default" / "tokenizer.json").exists()


def test_training_audio_embedding_matches_the_model():
    model, _ = train.build_model(TINY, 300)
    frames = torch.randn(7, TINY.frame)
    fast = train.embed_audio_frames(model, frames)
    torch.testing.assert_close(fast, model.embed_audio(frames[None])[0], rtol=1e-5, atol=1e-5)
