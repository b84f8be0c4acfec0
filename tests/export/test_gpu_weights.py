import json
from dataclasses import asdict

import pytest
import torch

from export import gpu_weights, save_default, tokenizer, train

TINY = train.TrainSettings(hidden=32, layers=2, heads=2, kv_heads=1, head_dim=16, intermediate=64)


@pytest.fixture()
def state_pt(tmp_path):
    path = tmp_path / "run" / "state.pt"
    path.parent.mkdir()
    tokenizer.save(tokenizer.build(300, ["the cat sat on the mat", "2 + 3 = 5"]), tmp_path / "tokenizer.json")
    model, head = train.build_model(TINY, tokenizer.load(tmp_path / "tokenizer.json").get_vocab_size())
    torch.save({"model": model.state_dict(), "ctc_head": head.state_dict(), "optimizer": {"big": 1},
                "step": 7, "best": 1.0, "settings": asdict(TINY)}, path)  # fmt: skip
    return path


def test_split_parts_join_into_the_same_weights(state_pt, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_weights, "PART_BYTES", 64 * 1024)  # several parts from a tiny model
    parts = gpu_weights.split(state_pt, tmp_path / "out")
    assert len(parts) > 2 and all(p.stat().st_size < 2 * 64 * 1024 for p in parts)
    (tmp_path / "out" / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    (tmp_path / "out" / "metrics.jsonl").write_text(
        json.dumps({"eval": {"step": 7, "eval-seen/loss": 0.5}}) + "\n"
    )

    best = gpu_weights.join(tmp_path / "out", tmp_path / "joined")
    state, joined = torch.load(state_pt, weights_only=False), torch.load(best, weights_only=False)
    for name in ("model", "ctc_head"):
        assert joined[name].keys() == state[name].keys()
        assert all(torch.equal(joined[name][k], v) for k, v in state[name].items())
    assert "optimizer" not in joined and joined["step"] == 7 and joined["metrics"]["eval-seen/loss"] == 0.5
    assert (tmp_path / "joined" / "metrics.jsonl").exists()
    _, info, settings = save_default.load_run(tmp_path / "joined")  # what export.save_default reads
    assert info["step"] == 7 and settings.layers == TINY.layers


def test_join_refuses_a_missing_part(state_pt, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_weights, "PART_BYTES", 64 * 1024)
    parts = gpu_weights.split(state_pt, tmp_path / "out")
    parts[1].unlink()
    with pytest.raises(SystemExit, match=f"{len(parts) - 1} of {len(parts)} weight parts"):
        gpu_weights.join(tmp_path / "out", tmp_path / "joined")
