"""export/model.py, assistant.py and checkpoint.py against the reference: transformers' gemma4_unified.

Tiny random models are built with transformers, saved in its layout, loaded with ours, and compared in fp32.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Gemma4UnifiedAssistantConfig,
    Gemma4UnifiedAssistantForCausalLM,
    Gemma4UnifiedConfig,
    Gemma4UnifiedForConditionalGeneration,
)

from export.assistant import draft, shared_kv_from_present
from export.checkpoint import CheckpointError, load_assistant, load_model, save_assistant, save_model
from export.model import FULL, SLIDING, Config, Gemma4Unified, image_groups_from_ids

torch.set_num_threads(1)
TOL = 1e-4
S, F = SLIDING, FULL
TOKENS = dict(
    image_token_id=500,
    audio_token_id=501,
    video_token_id=502,
    boi_token_id=503,
    eoi_token_id=504,
    boa_token_id=505,
    eoa_token_index=506,
)
TEXT = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=8,
    final_logit_softcapping=30.0,
)
VISION = dict(patch_size=2, mm_embed_dim=32, mm_posemb_size=16, output_proj_dims=32)

# Each variant changes what the others hold fixed.
VARIANTS = {
    # vision + audio, K = V on full layers with 1 global kv head, wider global heads
    "kv_shared_proj": dict(
        text=dict(
            TEXT,
            num_hidden_layers=4,
            layer_types=[S, S, F, F],
            attention_k_eq_v=True,
            global_head_dim=32,
            num_global_key_value_heads=1,
        ),
        vision=VISION,
    ),
    # no vision, separate V, default 5:1 layer pattern, other head dims, partial rotary 0.5
    "plain": dict(
        text=dict(
            TEXT,
            num_hidden_layers=6,
            head_dim=8,
            global_head_dim=16,
            final_logit_softcapping=50.0,
            rope_parameters={
                S: {"rope_type": "default", "rope_theta": 10_000.0},
                F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1_000_000.0},
            },
        ),
        vision=None,
    ),
    # the last two layers reuse earlier KV and have a double-wide MLP
    "kv_sharing": dict(
        text=dict(
            TEXT,
            num_hidden_layers=6,
            layer_types=[S, F, S, S, S, F],
            num_kv_shared_layers=2,
            use_double_wide_mlp=True,
            global_head_dim=16,
        ),
        vision=VISION,
    ),
}


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights far from their init (norm weights, layer scalars, position tables too), so that a
    mistake in any of them shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or "inv_freq" in name or "embed_scale" in name:
                continue
            noise = torch.randn(t.shape, generator=gen)
            if t.dim() == 1:  # norm weights, biases, layer scalars
                t.copy_(1.0 + 0.3 * noise)
            elif "embed_tokens" in name or "pos_embedding" in name:
                t.copy_(noise)
            else:
                t.copy_(noise * 0.15)


def hf_config(variant: str) -> Gemma4UnifiedConfig:
    spec = VARIANTS[variant]
    return Gemma4UnifiedConfig(
        text_config=dict(spec["text"]), vision_config=spec["vision"], audio_config={}, **TOKENS
    )


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(reference model, our model loaded from the reference's save_pretrained, checkpoint dir)."""
    ref = Gemma4UnifiedForConditionalGeneration(hf_config(request.param)).eval()
    ref.config._attn_implementation = "eager"
    randomize(ref, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref, load_model(path), path


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to float32 rounding, relative to the values' scale: summation order differs by CPU (an AVX2
    EPYC measured 1.05e-4 on logits that an AMX Xeon matched within 1e-4)."""
    assert a.shape == b.shape
    diff, scale = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
    assert diff <= TOL * scale, f"max abs diff {diff} at scale {scale}"


def positions(batch: int, length: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + length).expand(batch, length)


# ------------------------------------------------------------------------------------------ decoder


def test_text_logits(pair):
    ref, ours, _ = pair
    ids = torch.randint(0, 500, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        logits, hidden, present = ours.decode(ours.embed_tokens(ids), positions(2, 21), [])
    close(logits, expected)
    assert hidden.shape == (2, 21, 64)
    assert len(present) == ours.cfg.text.first_kv_shared_layer
    assert present[0][0].shape[2] == 21  # never truncated to the window


def test_logits_softcapped_and_last_k_only(pair):
    _, ours, _ = pair
    ids = torch.randint(0, 500, (1, 12))
    with torch.no_grad():
        full = ours.decode(ours.embed_tokens(ids), positions(1, 12), [])[0]
        last = ours.decode(ours.embed_tokens(ids), positions(1, 12), [], num_logits_to_keep=3)[0]
    close(last, full[:, -3:])
    assert full.abs().max() < ours.cfg.text.final_logit_softcapping


def test_left_padding(pair):
    ref, ours, _ = pair
    ids = torch.randint(0, 500, (2, 14), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :4] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        logits = ours.decode(ours.embed_tokens(ids), pos, [], attention_mask=mask)[0]
    close(logits[mask.bool()], expected[mask.bool()])


def test_incremental_decode_equals_prefill_past_the_window(pair):
    _, ours, _ = pair
    ids = torch.randint(0, 500, (2, 23), generator=torch.Generator().manual_seed(3))
    embeds = ours.embed_tokens(ids)
    with torch.no_grad():
        whole = ours.decode(embeds, positions(2, 23), [])[0]
        past, steps = ours.empty_past(2), []
        for start, end in [(0, 6), (6, 7), (7, 15), *[(t, t + 1) for t in range(15, 23)]]:
            logits, _, past = ours.decode(embeds[:, start:end], positions(2, end - start, start), past)
            steps.append(logits)
    close(torch.cat(steps, dim=1), whole)
    assert past[0][0].shape[2] == 23 > ours.cfg.text.sliding_window


# ---------------------------------------------------------------------------------------- multimodal


def test_audio_and_text_logits(pair):
    ref, ours, _ = pair
    n = 5
    ids = torch.tensor([[2, 7, 505] + [501] * n + [506, 9, 11]])
    frames = torch.randn(1, n, 640, generator=torch.Generator().manual_seed(4)) * 0.3
    with torch.no_grad():
        expected = ref(
            input_ids=ids, input_features=frames, input_features_mask=torch.ones(1, n, dtype=torch.bool)
        ).logits
        embeds = ours.embed_inputs(ids, audio_features=ours.embed_audio(frames))
        logits = ours.decode(embeds, positions(1, ids.shape[1]), [])[0]
    close(logits, expected)


def test_chunked_audio_embedding_equals_unchunked(pair):
    _, ours, _ = pair
    frames = torch.randn(2, 25, 640, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = ours.embed_audio(frames)
        chunks = torch.cat([ours.embed_audio(frames[:, i : i + 8]) for i in range(0, 25, 8)], dim=1)
    assert torch.equal(chunks, whole)


def image_inputs(ours: Gemma4Unified):
    """One 4x3-patch image (12 soft tokens, more than the sliding window) plus 2 padding patches."""
    xy = torch.tensor([[x, y] for y in range(3) for x in range(4)] + [[-1, -1]] * 2)[None]  # (1, 14, 2)
    patches = torch.rand(1, 14, ours.cfg.vision.patch_dim, generator=torch.Generator().manual_seed(6))
    ids = torch.tensor([[2, 7, 503] + [500] * 12 + [504, 9, 11, 12]])
    return ids, patches, xy


def test_image_and_text_logits(pair):
    ref, ours, _ = pair
    if ours.cfg.vision is None:
        pytest.skip("variant without vision")
    ids, patches, xy = image_inputs(ours)
    types = (ids == 500).long()  # mm_token_type_ids: 1 = image
    pos = positions(1, ids.shape[1])
    with torch.no_grad():
        # The reference's image masks (full layers causal, sliding layers bidirectional within the image,
        # windowed) as its generate() builds them; its plain forward() differs, see the report.
        masks = ref.create_masks_for_generate(
            ref.config, torch.empty(1, ids.shape[1], 0), None, None, pos, mm_token_type_ids=types
        )
        expected = ref(
            input_ids=ids, pixel_values=patches, image_position_ids=xy, attention_mask=masks
        ).logits
        image = ours.embed_vision(patches, xy)[0, :12]  # drop the padding patches
        embeds = ours.embed_inputs(ids, image_features=image)
        logits = ours.decode(embeds, pos, [], image_groups=image_groups_from_ids(ids, (500, 502)))[0]
        causal_only = ours.decode(embeds, pos, [])[0]
    close(logits, expected)
    assert (causal_only - expected).abs().max() > 1e-3  # the bidirectional part matters


def test_image_groups_from_ids():
    ids = torch.tensor([[1, 500, 500, 2, 500, 3, 502, 502]])
    assert image_groups_from_ids(ids, (500, 502)).tolist() == [[-1, 0, 0, -1, 1, -1, 2, 2]]


# ----------------------------------------------------------------------------------------- assistant


def hf_assistant(variant: str, ordered: bool) -> Gemma4UnifiedAssistantForCausalLM:
    target_text = VARIANTS[variant]["text"]
    same_kv = "num_key_value_heads head_dim global_head_dim num_global_key_value_heads attention_k_eq_v"
    text = {k: target_text[k] for k in same_kv.split() if k in target_text}
    text.update(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        layer_types=[S, F, F],
        sliding_window=5,
        use_double_wide_mlp=True,
    )
    cfg = Gemma4UnifiedAssistantConfig(
        text_config=dict(text, model_type="gemma4_unified_text"),
        backbone_hidden_size=64,
        use_ordered_embeddings=ordered,
        num_centroids=16,
        centroid_intermediate_top_k=4,
    )
    model = Gemma4UnifiedAssistantForCausalLM(cfg).eval()
    model.config.get_text_config()._attn_implementation = "eager"
    randomize(model, seed=7)
    if ordered:
        model.masked_embedding.token_ordering.copy_(torch.randperm(512, generator=torch.Generator()))
    return model


@pytest.mark.parametrize("ordered", [False, True])
def test_assistant_draft_logits(pair, ordered, tmp_path):
    _, target, path = pair
    variant = path.name.rstrip("0123456789")
    ref = hf_assistant(variant, ordered)
    ref.save_pretrained(tmp_path)
    ours = load_assistant(tmp_path)
    ids = torch.randint(0, 500, (2, 13), generator=torch.Generator().manual_seed(8))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        _, hidden, present = target.decode(
            target.embed_tokens(ids), positions(2, 13), [], attention_mask=mask
        )
        kv = shared_kv_from_present(target.cfg.text, present)
        pos = torch.full((2, 1), 12)
        tokens, logits = draft(ours, target, ids[:, -1:], hidden[:, -1:], kv, pos, 3, kv_mask=mask)
        token, h = ids[:, -1:], hidden[:, -1:]
        for i in range(3):
            out = ref(
                inputs_embeds=torch.cat([target.embed_tokens(token), h], dim=-1),
                position_ids=pos,
                attention_mask=mask,
                shared_kv_states={S: kv[:2], F: kv[2:]},
            )
            close(logits[:, i : i + 1], out.logits)
            token, h = tokens[:, i : i + 1], out.last_hidden_state
            assert torch.equal(out.logits.argmax(-1), token)


# ---------------------------------------------------------------------------------------- checkpoints


def test_saved_checkpoint_loads_in_transformers(pair, tmp_path):
    _, ours, _ = pair
    save_model(ours, tmp_path, max_shard_bytes=200_000)  # forces an index with several shards
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ref = Gemma4UnifiedForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 500, (1, 10))
    with torch.no_grad():
        close(ref(input_ids=ids).logits, ours(ids))
    assert Config.from_hf(json.loads((tmp_path / "config.json").read_text())) == ours.cfg


def test_saved_assistant_loads_in_transformers(tmp_path):
    ref = hf_assistant("kv_shared_proj", ordered=True)
    ref.save_pretrained(tmp_path / "a")
    ours = load_assistant(tmp_path / "a")
    save_assistant(ours, tmp_path / "b")
    again = Gemma4UnifiedAssistantForCausalLM.from_pretrained(tmp_path / "b").eval()
    for name, t in ref.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


def test_load_with_dtype(pair):
    _, _, path = pair
    model = load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(not t.is_meta for t in model.state_dict().values())


@pytest.fixture
def bad_copy(pair, tmp_path):
    """A writable copy of a good checkpoint, with its tensors loaded for editing."""
    _, _, path = pair
    for file in path.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    return tmp_path, load_file(tmp_path / "model.safetensors")


def test_wrong_model_type_is_refused(bad_copy):
    path, _ = bad_copy
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, model_type="gemma3")))
    with pytest.raises(CheckpointError, match="model_type 'gemma3', expected 'gemma4_unified'"):
        load_model(path)


def test_missing_tensor_is_named(bad_copy):
    path, tensors = bad_copy
    name = "model.language_model.layers.1.self_attn.q_norm.weight"
    del tensors[name]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"missing tensor {name}"):
        load_model(path)


def test_wrong_shape_is_named(bad_copy):
    path, tensors = bad_copy
    name = "model.embed_audio.embedding_projection.weight"
    tensors[name] = torch.zeros(64, 320)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{name}: shape \(64, 320\).*expected \(64, 640\)"):
        load_model(path)


# -------------------------------------------------------------------------------------------- config


def test_presets_round_trip_through_hf_dicts():
    for name in ("tiny", "12b"):
        cfg = Config.preset(name)
        assert Config.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg
        assert Gemma4UnifiedConfig(**cfg.to_hf()).text_config.hidden_size == cfg.text.hidden_size


def test_tiny_preset_runs():
    model = Gemma4Unified(Config.preset("tiny"))
    assert model(torch.tensor([[2, 5, 9]])).shape == (1, 3, 512)
