"""Weight soups of related runs: the weighted mean of every tensor, written as a run save_default takes."""

from dataclasses import asdict, replace

import pytest
import torch

from export import average, checkpoint, save_default, tokenizer, train

TINY = train.TrainSettings(hidden=32, layers=2, heads=2, kv_heads=1, head_dim=16, intermediate=64,
                           format="interleaved")  # fmt: skip


def write_run(root, seed: int, step: int):
    """A run directory holding a best.pt of freshly initialised weights (seeded) and a tokenizer."""
    root.mkdir()
    tok = tokenizer.build(300, ["what is two plus three", "2 + 3 = 5", tokenizer.INSTRUCT_RESPOND])
    tokenizer.save(tok, root / "tokenizer.json")
    s = replace(TINY, seed=seed)
    model, head = train.build_model(s, tok.get_vocab_size())
    state = {"model": model.state_dict(), "ctc_head": head.state_dict(), "step": step, "metrics": {},
             "settings": asdict(s)}  # fmt: skip
    train.save_atomically(state, root / "best.pt")
    return state


def test_the_soup_is_the_weighted_mean_and_exports_as_a_default_model(tmp_path):
    a = write_run(tmp_path / "a", seed=1, step=10)
    b = write_run(tmp_path / "b", seed=2, step=20)
    soup = average.average_checkpoints(
        [tmp_path / "a/best.pt", tmp_path / "b/best.pt"], [3, 1], tmp_path / "soup"
    )
    assert [p["weight"] for p in soup["averaged"]] == [0.75, 0.25]
    for name, tensor in soup["model"].items():
        torch.testing.assert_close(tensor, 0.75 * a["model"][name] + 0.25 * b["model"][name])
    torch.testing.assert_close(
        soup["ctc_head"]["weight"], 0.75 * a["ctc_head"]["weight"] + 0.25 * b["ctc_head"]["weight"]
    )

    info = save_default.save_default(tmp_path / "soup", tmp_path / "default")
    assert info["step"] == 10 and [p["step"] for p in info["averaged"]] == [10, 20]
    loaded = checkpoint.load_model(tmp_path / "default").state_dict()
    for name, tensor in soup["model"].items():
        torch.testing.assert_close(loaded[name], tensor)


def test_a_soup_of_one_weight_is_that_checkpoint(tmp_path):
    a = write_run(tmp_path / "a", seed=1, step=10)
    write_run(tmp_path / "b", seed=2, step=20)
    soup = average.average_checkpoints(
        [tmp_path / "a/best.pt", tmp_path / "b/best.pt"], [1, 0], tmp_path / "soup"
    )
    for name, tensor in soup["model"].items():
        assert torch.equal(tensor, a["model"][name])


def test_unrelated_shapes_and_bad_weights_are_refused(tmp_path):
    write_run(tmp_path / "a", seed=1, step=10)
    wide = tmp_path / "wide"
    wide.mkdir()
    model, head = train.build_model(replace(TINY, hidden=64), 300)
    train.save_atomically({"model": model.state_dict(), "ctc_head": head.state_dict(), "step": 1,
                           "settings": asdict(TINY)}, wide / "best.pt")  # fmt: skip
    with pytest.raises(ValueError, match="shapes"):
        average.average_checkpoints([tmp_path / "a/best.pt", wide / "best.pt"], [], tmp_path / "soup")
    with pytest.raises(ValueError, match="non-negative weights"):
        average.average_checkpoints([tmp_path / "a/best.pt", tmp_path / "a/best.pt"], [1, -1], tmp_path / "s")
    with pytest.raises(ValueError, match="need 2"):
        average.average_checkpoints([tmp_path / "a/best.pt", tmp_path / "a/best.pt"], [1], tmp_path / "s")
