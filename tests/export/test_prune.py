"""Dropping a run's bottom layers: the inverse of growing, written as a run save_default takes."""

from dataclasses import asdict, replace

import pytest
import torch

from export import prune, save_default, tokenizer, train

TINY = train.TrainSettings(hidden=32, layers=2, heads=2, kv_heads=1, head_dim=16, intermediate=64,
                           format="interleaved")  # fmt: skip


def test_dropping_the_layers_growth_added_gives_back_the_shallow_weights():
    shallow, _ = train.build_model(TINY, 300)
    deep, _ = train.build_model(replace(TINY, layers=4, seed=1), 300)
    grown = train.grown(shallow.state_dict(), deep.state_dict())
    back = prune.without_bottom_layers(grown, 2)
    assert back.keys() == shallow.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in shallow.state_dict().items())
    assert prune.bottom_layer_scales(grown, 2) == [0.0, 0.0]  # growth starts them as identities
    with pytest.raises(ValueError, match="can drop 1 to 3 of 4"):
        prune.without_bottom_layers(grown, 4)


def test_a_pruned_run_exports_as_a_default_model(tmp_path):
    (tmp_path / "deep").mkdir()
    tok = tokenizer.build(300, ["what is two plus three", "2 + 3 = 5", tokenizer.INSTRUCT_RESPOND])
    tokenizer.save(tok, tmp_path / "deep" / "tokenizer.json")
    s = replace(TINY, layers=3)
    model, head = train.build_model(s, tok.get_vocab_size())
    state = {"model": model.state_dict(), "ctc_head": head.state_dict(), "step": 7, "metrics": {},
             "settings": asdict(s)}  # fmt: skip
    train.save_atomically(state, tmp_path / "deep" / "best.pt")
    pruned = prune.prune_checkpoint(tmp_path / "deep" / "best.pt", 1, tmp_path / "pruned")
    assert pruned["settings"]["layers"] == 2 and pruned["step"] == 7
    assert pruned["pruned"]["scales"][0] == pytest.approx(1.0)  # freshly built layers: scales at one
    save_default.save_default(str(tmp_path / "pruned"), tmp_path / "default", "best")
    config = (tmp_path / "default" / "config.json").read_text()
    assert '"num_hidden_layers": 2' in config
