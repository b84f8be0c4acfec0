"""Training on a real (tiny) synthesized corpus: examples, loss going down, resume, the saved checkpoint."""

import json
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
                           eval_loss_count=3, curriculum_steps=1, threads=1, format="branch")  # fmt: skip


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


def fresh_run(root, tmp_path):
    """A run with the shared tokenizer and nothing trained (the shared run has trained in other tests)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_text((root / "run" / "tokenizer.json").read_text())
    return run


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


def test_skill_boost_draws_skills_more_often(run_dirs):
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    data = dataset.Corpus(run_dirs / "data", "train")
    kinds = [r["kind"] for r in data.records]  # arithmetic, home, sentence

    def share_of(skills: tuple[str, ...], boost: float, arithmetic_boost: float = 1.0) -> float:
        s = settings(run_dirs, batch=50, skill_boost=boost, arithmetic_boost=arithmetic_boost)
        sampler = train.Sampler(data, tok, s)
        picks = [i for seed in range(20) for i in sampler.draw(np.arange(3), random.Random(seed))]
        return sum(kinds[i] in skills for i in picks) / len(picks)

    assert 0.6 < share_of(train.SKILL_KINDS, 1.0) < 0.73  # two of the three utterances are skills
    assert 0.83 < share_of(train.SKILL_KINDS, 4.0) < 0.95  # 8 / 9
    assert share_of(train.SKILL_KINDS, 0.0) == 0.0
    assert 0.53 < share_of(("arithmetic",), 1.0, 3.0) < 0.67  # 3 / 5
    assert 0.66 < share_of(("arithmetic",), 2.0, 3.0) < 0.8  # 6 / 8


@pytest.mark.parametrize("kind", ["words", "sentence"])
def test_kind_boost_draws_that_kind_more_often(run_dirs, kind):
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    data = dataset.Corpus(run_dirs / "data", "train")
    data.records[2] = {**data.records[2], "kind": kind}  # this copy's sentence, as that kind
    for boost, share in ((1.0, 1 / 3), (4.0, 4 / 6)):
        s = settings(run_dirs, batch=50, **{f"{kind}_boost": boost})
        sampler = train.Sampler(data, tok, s)
        picks = [i for seed in range(20) for i in sampler.draw(np.arange(3), random.Random(seed))]
        assert abs(picks.count(2) / len(picks) - share) < 0.07


OPS = {"+": "plus", "-": "minus", "×": "times"}


def test_training_never_draws_an_eval_problem(tmp_path, run_dirs):
    """However it is worded: the corpus leaves out only the eval set's exact texts."""
    asked = next(u for u in corpus.eval_utterances() if u.kind == "arithmetic")
    a, sym, b = train.problem(asked.response).split()
    spoken = f"compute {corpus.number_words(int(a))} {OPS[sym]} {corpus.number_words(int(b))}"
    reworded = corpus.Utterance(spoken, asked.response, "arithmetic")
    assert reworded.text not in {u.text for u in corpus.eval_utterances()}
    voice = Voice("espeak", "en-us+m3", 200, 50)
    drawn = [(u, speech.synthesize(u.text, voice)) for u in [*UTTERANCES, reworded]]
    dataset.write_shard(tmp_path / "train-00000", drawn)
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    s = replace(settings(run_dirs, batch=8, augment_prob=0.0), data=str(tmp_path))
    sampler = train.Sampler(dataset.Corpus(tmp_path, "train"), tok, s)
    assert sampler.trainable.tolist() == [True, True, True, False]
    for step in range(10):
        batch = sampler.batch(step)
        assert not any(asked.response in tok.decode(row.tolist()) for row in batch.ids)
    product = next(u for u in corpus.eval_utterances() if " × " in u.response)  # the times table is taught
    assert not train.held_out("compute " + product.text, product.response, train.eval_keys())


def test_prompt_format(run_dirs):
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    p = tokenizer.prompt(tok, 3, tokenizer.INSTRUCT_RESPOND, "two\n2 + 2 = 4")
    text = tok.decode(p.ids, skip_special_tokens=False)
    assert text == ("<bos><|turn>user\n" + tokenizer.INSTRUCT_RESPOND + "<|audio>" + "<|audio|>" * 3
                    + "<audio|><turn|>\n<|turn>model\ntwo\n2 + 2 = 4<turn|>")  # fmt: skip
    assert p.ids[p.audio_start : p.audio_start + 3] == [tokenizer.AUDIO] * 3


def test_drill_prompt_trains_the_response_from_the_written_words(run_dirs):
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    texts = tokenizer.word_chunks(["what", "is", "two", "plus", "three"], [0, 2, 0, 1, 2])
    assert texts == ["", "what is", "", " two", " plus three"]
    p = tokenizer.drill_prompt(tok, texts, "2 + 3 = 5")
    text = tok.decode(p.ids, skip_special_tokens=False)
    assert text == ("<bos><|turn>user\n" + tokenizer.INSTRUCT_RESPOND + "<|audio><audio|>"
                    + "<|audio><audio|>what is<|audio><audio|><|audio><audio|> two<|audio><audio|> plus three"
                    + "<turn|>\n<|turn>model\n2 + 3 = 5<turn|>")  # fmt: skip
    assert p.n_audio == 0 and p.audio_index() == []
    assert tok.decode([p.ids[i] for i in p.trained_index()], skip_special_tokens=False) == "2 + 3 = 5<turn|>"


def test_drill_batches_leave_the_eval_problems_out(run_dirs):
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    drill = train.Drill(tok, settings(run_dirs, drill=64))
    evals = corpus.eval_utterances()
    sums = [u.response for u in evals if u.kind == "arithmetic" and " × " not in u.response]
    eval_problems = {train.problem(r) for r in sums}
    assert len(eval_problems) > 30  # sums and differences; products are taught (train.eval_keys)
    drill.held_out |= {f"{a} + {b}" for a in range(30) for b in range(30)}  # most small sums
    responses = []
    for step in range(20):
        batch = drill.batch(step)
        assert batch.frames.shape == (0, TINY.frame) and batch.audio_index.shape == (64, 0)
        for labels in batch.labels:
            trained = labels[labels != train.IGNORE]
            assert trained[-1] == tokenizer.TURN_END  # the response and its end, nothing before
            responses.append(tok.decode(trained.tolist()))
    assert torch.equal(drill.batch(3).ids, drill.batch(3).ids)  # a function of the step
    problems = {train.problem(r) for r in responses}
    assert not problems & eval_problems and not problems & drill.held_out
    arithmetic = sum(" = " in r for r in responses) / len(responses)
    assert 0.6 < arithmetic < 0.9  # three in four by default; the rest are home commands
    assert all(r.startswith("ok, ") for r in responses if " = " not in r)
    only = train.Drill(tok, settings(run_dirs, drill=64, drill_home=0.0)).batch(0)
    assert all(" = " in tok.decode(labels[labels != train.IGNORE].tolist()) for labels in only.labels)
    for seed in range(50):
        sizes = train.Drill.chunk_sizes(5, random.Random(seed))
        assert sum(sizes) == 5 and set(sizes) <= {0, 1, 2}


def test_training_with_a_drill_logs_its_loss(run_dirs, tmp_path):
    s = settings(run_dirs, drill=4, log_every=2)
    trainer = train.Trainer(replace(s, run=str(fresh_run(run_dirs, tmp_path))), log=lambda m: None)
    assert trainer.train(until=2) == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    drilled = [x["train"]["drill"] for x in lines if "train" in x]
    assert drilled and all(0 < d < 20 for d in drilled)
    evals = [x["eval"] for x in lines if "eval" in x]  # the drilled skills, written and heard
    skills = {f"{how}/{kind}" for how in ("drill", "respond") for kind in train.SKILL_KINDS}
    assert evals and skills <= set(evals[-1]) and all(0 <= evals[-1][k] <= 1 for k in skills)
    assert 0 < evals[-1]["train/loss"] < 20  # the loss on utterances it trains on, beside the held-out


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


def test_keep_evals_saves_each_evaluations_weights_to_average(run_dirs, tmp_path):
    run = fresh_run(run_dirs, tmp_path)
    s = replace(settings(run_dirs, eval_every=2, keep_evals=True), run=str(run))
    trainer = train.Trainer(s, log=lambda m: None)
    assert trainer.train(until=4) == 4
    assert sorted(p.name for p in run.glob("step-*.pt")) == ["step-2.pt", "step-4.pt"]
    last = torch.load(run / "step-4.pt", weights_only=False)
    assert last["step"] == 4 and "eval-seen/loss" in last["metrics"]
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(last["model"][name], value.cpu())


def test_accumulated_batches_add_up_to_the_mean_of_their_gradients(run_dirs):
    s = settings(run_dirs, accumulate=2, augment_prob=0.0)
    trainer = train.Trainer(s, log=lambda m: None)
    separate = []
    for index in (6, 7):  # step 3's two batches
        batch = trainer.train_data.batch(index)
        ce, ctc, _ = train.forward(trainer.model, trainer.ctc_head, batch)
        trainer.model.zero_grad()
        (ce + s.ctc_weight * ctc).backward()
        separate.append([p.grad.clone() for p in trainer.model.parameters()])
    trainer.optimizer.zero_grad(set_to_none=True)
    logged = [trainer.accumulate_gradients(index) for index in (6, 7)]
    for p, a, b in zip(trainer.model.parameters(), *separate, strict=True):
        torch.testing.assert_close(p.grad, (a + b) / 2, rtol=1e-4, atol=1e-6)
    assert all(part["ce"] > 0 for part in logged)
    parts = [trainer.accumulate_gradients(index) for index in (0, 1)]
    assert trainer.step(0)["ce"] == pytest.approx((parts[0]["ce"] + parts[1]["ce"]) / 2)  # batches 0, 1


def test_the_curriculum_follows_optimizer_steps_not_accumulated_batches(run_dirs):
    s = settings(run_dirs, accumulate=4, curriculum_steps=10, max_seconds=12.0)
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    sampler = train.Sampler(dataset.Corpus(s.data, "train"), tok, s)
    asked, max_seconds = [], sampler.max_seconds
    sampler.max_seconds = lambda step: asked.append(step) or max_seconds(step)  # type: ignore[method-assign]
    for index in range(8):
        sampler.batch(index)
    assert asked == [0, 0, 0, 0, 1, 1, 1, 1]


def test_training_audio_embedding_matches_the_model():
    model, _ = train.build_model(TINY, 300)
    frames = torch.randn(7, TINY.frame)
    fast = train.embed_audio_frames(model, frames)
    torch.testing.assert_close(fast, model.embed_audio(frames[None])[0], rtol=1e-5, atol=1e-5)


def test_chunk_texts_put_each_word_after_the_chunk_it_ends_in():
    words = [("turn", 0.30), ("on", 0.33), ("the", 0.70), ("lights", 1.50)]
    assert tokenizer.chunk_texts(words, 0.32, 3) == ["turn", " on", " the lights"]  # the last takes the rest
    assert tokenizer.chunk_texts(words, 0.32, 6) == ["turn", " on", " the", "", " lights", ""]
    assert "".join(tokenizer.chunk_texts(words, 0.32, 6)) == "turn on the lights"


def test_interleaved_prompt_trains_the_words_and_the_request_for_audio(run_dirs):
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    p = tokenizer.interleaved_prompt(tok, [2, 1], ["two", " plus"], tokenizer.INSTRUCT_RESPOND, "2 + 2 = 4")
    text = tok.decode(p.ids, skip_special_tokens=False)
    chunks = "<|audio><|audio|><|audio|><audio|>two<|audio><|audio|><audio|> plus"
    turns = "<turn|>\n<|turn>model\n2 + 2 = 4<turn|>"
    assert text == "<bos><|turn>user\n" + tokenizer.INSTRUCT_RESPOND + chunks + turns
    assert [p.ids[i] for i in p.audio_index()] == [tokenizer.AUDIO] * 3
    trained = tok.decode([p.ids[i] for i in p.trained_index()], skip_special_tokens=False)
    assert trained == "two<|audio> plus2 + 2 = 4<turn|>"  # not the <turn|> that ends the audio
    silent = tokenizer.interleaved_prompt(tok, [2, 2], ["", ""], tokenizer.INSTRUCT_TRANSCRIBE, "")
    assert [silent.ids[i] for i in silent.trained_index()] == [tokenizer.BOA, tokenizer.TURN_END]


def test_interleaved_examples_carry_every_word_once(run_dirs):
    data = dataset.Corpus(run_dirs / "data", "train")
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    s = settings(run_dirs, format="interleaved", chunk_frames=4, augment_prob=0.0)
    for i in range(3):
        audio, rec = data[i]
        ex = train.make_example(audio, rec, tok, s, random.Random(i), train=True)
        p = ex.prompt
        assert p.n_audio == ex.frames.shape[0] == -(-len(audio) // s.frame)
        user_audio = p.ids[p.ids.index(tokenizer.BOA) : p.target_start - len(tokenizer.model_turn_start(tok))]
        words = [t for t in user_audio if t not in tokenizer.SPECIAL_IDS]
        assert tok.decode(words) == rec["text"]
        assert "".join(train.CTC_ALPHABET[c - 1] for c in ex.ctc) == rec["text"]
    batch = train.collate(
        [train.make_example(*data[i], tok, s, random.Random(i), train=True) for i in range(3)]
    )
    at_audio = batch.ids.gather(1, batch.audio_index) == tokenizer.AUDIO  # (B, N_max)
    assert (at_audio.sum(1) == batch.audio_lengths).all()


def test_interleaved_run_trains_and_decodes_chunk_by_chunk(run_dirs, tmp_path):
    s = replace(settings(run_dirs, format="interleaved", eval_every=2), run=str(tmp_path / "run"))
    for run in ("run", "warm"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "tokenizer.json").write_bytes((run_dirs / "run" / "tokenizer.json").read_bytes())
    trainer = train.Trainer(s, log=lambda m: None)
    assert trainer.train(until=2) == 2
    tok, model = trainer.tok, trainer.model.eval()
    audio, _ = dataset.Corpus(s.data, "eval-seen")[0]
    assert isinstance(train.greedy_interleaved(model, tok, train.frames_of(audio, s.frame), 8), str)
    transcript, response = train.greedy_respond(model, tok, train.frames_of(audio, s.frame), 8)
    assert isinstance(transcript, str) and isinstance(response, str)
    warm = train.Trainer(replace(s, run=str(tmp_path / "warm"), init=str(tmp_path / "run" / "state.pt")),
                         log=lambda m: None)  # fmt: skip
    assert warm.state["step"] == 0
    for a, b in zip(trainer.model.state_dict().values(), warm.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    save_default.save_default(s.run, tmp_path / "default", "state")
    overrides = (tmp_path / "default" / "rawwave_runtime.json").read_text()
    assert '"interleaved"' in overrides and '"chunk_frames": 8' in overrides


def test_a_deeper_run_starts_from_a_shallower_one_computing_the_same(run_dirs):
    s = settings(run_dirs, augment_prob=0.0, respond_prob=1.0)
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    shallow, head = train.build_model(s, tok.get_vocab_size())
    deep, _ = train.build_model(replace(s, layers=s.layers + 2, seed=1), tok.get_vocab_size())
    deep.load_state_dict(train.grown(shallow.state_dict(), deep.state_dict()))
    data = dataset.Corpus(s.data, "train")
    batch = train.collate(
        [train.make_example(*data[i], tok, s, random.Random(i), train=False) for i in range(3)]
    )
    with torch.no_grad():
        ce_shallow, ctc_shallow, _ = train.forward(shallow, head, batch)
        ce_deep, ctc_deep, _ = train.forward(deep, head, batch)
    torch.testing.assert_close(ce_deep, ce_shallow)
    torch.testing.assert_close(ctc_deep, ctc_shallow)
    with pytest.raises(ValueError, match="more than this run's"):
        train.grown(deep.state_dict(), shallow.state_dict())


def test_the_layers_growth_added_train_at_their_own_scaled_lr(run_dirs, tmp_path):
    s = settings(run_dirs, augment_prob=0.0, respond_prob=1.0)
    shallow, head = train.build_model(s, tokenizer.load(run_dirs / "run" / "tokenizer.json").get_vocab_size())
    torch.save({"model": shallow.state_dict(), "ctc_head": head.state_dict()}, tmp_path / "shallow.pt")
    deep = replace(s, run=str(tmp_path / "deep"), layers=s.layers + 2, init=str(tmp_path / "shallow.pt"))
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "tokenizer.json").write_bytes((run_dirs / "run" / "tokenizer.json").read_bytes())
    assert train.added_layers(deep) == 2 and train.added_layers(replace(deep, init="")) == 0
    trainer = train.Trainer(replace(deep, grown_lr_scale=4.0), log=lambda m: None)
    post_norm = "language_model.layers.0.post_feedforward_layernorm.weight"
    assert not trainer.model.state_dict()[post_norm].any()
    trainer.step(0)
    rest, grown_layers = trainer.optimizer.param_groups
    assert rest["lr"] == pytest.approx(s.lr) and grown_layers["lr"] == pytest.approx(4 * s.lr)
    assert len(grown_layers["params"]) == 2 * len(list(trainer.model.language_model.layers[0].parameters()))
    assert trainer.model.state_dict()[post_norm].any()  # the added layers leave the identity


def test_compiled_layers_compute_the_same_loss_and_gradients(run_dirs):
    s = settings(run_dirs, augment_prob=0.0, respond_prob=1.0)
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    data = dataset.Corpus(s.data, "train")
    examples = [train.make_example(*data[i], tok, s, random.Random(i), train=False) for i in range(3)]
    results = []
    for compiled in (False, True):
        model, head = train.build_model(s, tok.get_vocab_size())  # same seed, same weights
        if compiled:
            train.compile_layers(model)
        for batch in (train.collate(examples), train.collate(examples[:2])):  # two batch shapes
            ce, ctc, _ = train.forward(model, head, batch)
            model.zero_grad()
            (ce + 0.4 * ctc).backward()
            grads = [p.grad.clone() for p in model.language_model.layers.parameters()]
            results.append((ce.detach(), ctc.detach(), grads))
    for plain, fused in zip(results[:2], results[2:], strict=True):
        torch.testing.assert_close(fused[:2], plain[:2], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused[2], plain[2], rtol=1e-3, atol=1e-5)
    assert train.build_model(s, 300)[0].state_dict().keys() == model.state_dict().keys()


def test_batch_workers_make_the_batches_made_in_line(run_dirs):
    s = settings(run_dirs)
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    inline = train.Prefetcher(train.Sampler(dataset.Corpus(s.data, "train"), tok, s), workers=0)
    ahead = train.Prefetcher(train.Sampler(dataset.Corpus(s.data, "train"), tok, s), workers=2)
    try:
        for step in [0, 1, 2, 5, 3]:  # a step back (a resume) too
            want, got = inline.batch(step), ahead.batch(step)
            for name in ("ids", "mask", "labels", "frames", "ctc_targets"):
                assert torch.equal(getattr(want, name), getattr(got, name)), (step, name)
    finally:
        ahead.close()


def test_batch_workers_pick_up_shards_written_while_they_run(run_dirs, tmp_path):
    """Training while the corpus is generated: later batches draw from the new shards too."""
    data = tmp_path / "data"
    data.mkdir()
    for suffix in (".npy", ".jsonl"):
        (data / f"train-00000{suffix}").write_bytes((run_dirs / "data" / f"train-00000{suffix}").read_bytes())
    s = replace(settings(run_dirs), data=str(data), bucket=0)
    tok = tokenizer.load(run_dirs / "run" / "tokenizer.json")
    ahead = train.Prefetcher(train.Sampler(dataset.Corpus(s.data, "train"), tok, s), workers=1)
    try:
        ahead.batch(0)
        for suffix in (".npy", ".jsonl"):  # the generator's order: audio first, records last
            (data / f"train-00001{suffix}").write_bytes((data / f"train-00000{suffix}").read_bytes())
        ahead.refresh()
        assert ahead.pool is not None  # still running
        both = train.Sampler(dataset.Corpus(s.data, "train"), tok, s)
        assert len(both.data) == 2 * len(UTTERANCES)
        for step in (10, 11):  # not yet asked for when the shard arrived
            want, got = both.batch(step), ahead.batch(step)
            assert torch.equal(want.ids, got.ids) and torch.equal(want.frames, got.frames), step
    finally:
        ahead.close()


def test_a_bf16_run_with_batch_workers_trains_and_says_on_what(run_dirs, tmp_path):
    lines = []
    s = replace(settings(run_dirs), run=str(tmp_path / "run"), bf16=True, workers=1, device="cpu")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tokenizer.json").write_bytes((run_dirs / "run" / "tokenizer.json").read_bytes())
    trainer = train.Trainer(s, log=lines.append)
    assert trainer.train(until=5) == 5
    emulated = f" emulated on this {torch.backends.cpu.get_cpu_capability()} CPU: slower than fp32"
    precision = "bf16 autocast" + (emulated if train.cpu_emulates_bf16() else "")
    assert f"train: on cpu (1 threads, {precision}, 1 batch workers)" in lines
    assert trainer.train_data.pool is None  # closed when training stopped
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_a_time_budget_refits_the_schedule_to_the_measured_pace(run_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "FIT_FROM", 2)
    monkeypatch.setattr(train, "FIT_AT", 6)
    lines = []
    s = replace(settings(run_dirs), run=str(tmp_path / "run"), steps=10**6, seconds=20.0, eval_every=10**6)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tokenizer.json").write_bytes((run_dirs / "run" / "tokenizer.json").read_bytes())
    trainer = train.Trainer(s, log=lines.append)
    last = trainer.train(until=s.steps)
    fitted = [line for line in lines if "schedule ends at step" in line]
    assert len(fitted) == 1 and fitted[0].endswith(f"step {last}")
    assert 6 < last < 10**6 and trainer.s.steps == last
    assert json.loads((tmp_path / "run" / "settings.json").read_text())["steps"] == last
    assert train.learning_rate(trainer.s, last) == pytest.approx(0.1 * s.lr)  # the cosine ran its course


def test_flags_parse_booleans_and_refuse_a_missing_cuda():
    import argparse

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    assert parser.parse_args(["--bf16"]).bf16 and not parser.parse_args(["--no-bf16"]).bf16
    assert not parser.parse_args([]).bf16 and parser.parse_args([]).device == "auto"
    if not torch.cuda.is_available():
        assert train.training_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="no CUDA device"):
            train.training_device("cuda")
