import pytest
import torch

from tests.model.minimind_reference import reference_logits
from tests.model.tiny import IMG, RUN, ids_with_images, tiny_config
from vlm.model.vision_encoder import load_vision_encoder
from vlm.model.vlm import MiniMindVLM
from vlm.model.weights import (
    WeightsMismatchError,
    load_minimind_weights,
    read_state_dict,
    save_minimind_weights,
)


def minimind_style_state(cfg, with_projector=True, dtype=torch.float16, seed=1):
    """A state dict with MiniMind-V's key names and shapes, random values (as a released .pth would hold)."""
    g = torch.Generator().manual_seed(seed)
    hd = cfg.hidden_size // cfg.num_attention_heads
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), "model.norm.weight": (cfg.hidden_size,)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (cfg.num_attention_heads * hd, cfg.hidden_size),
            p + "self_attn.k_proj.weight": (cfg.num_key_value_heads * hd, cfg.hidden_size),
            p + "self_attn.v_proj.weight": (cfg.num_key_value_heads * hd, cfg.hidden_size),
            p + "self_attn.o_proj.weight": (cfg.hidden_size, cfg.num_attention_heads * hd),
            p + "input_layernorm.weight": (cfg.hidden_size,),
            p + "post_attention_layernorm.weight": (cfg.hidden_size,),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
            p + "mlp.down_proj.weight": (cfg.hidden_size, cfg.intermediate_size),
        }
    if with_projector:
        shapes |= {"vision_proj.vision_proj.0.weight": (cfg.hidden_size, cfg.vision_hidden_size),
                   "vision_proj.vision_proj.0.bias": (cfg.hidden_size,)}
    state = {k: (torch.randn(s, generator=g) * 0.2 + (1.0 if k.endswith("norm.weight") else 0.0)).to(dtype)
             for k, s in shapes.items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


@pytest.fixture
def vlm(tiny_vision_dir):
    return MiniMindVLM(tiny_config(), load_vision_encoder(tiny_vision_dir)).eval()


def test_minimind_v_file_loads_strictly_and_matches_reference_math(vlm, tmp_path):
    state = minimind_style_state(vlm.config)
    torch.save(state, tmp_path / "sft_vlm_32.pth")
    assert load_minimind_weights(vlm, tmp_path / "sft_vlm_32.pth") == []
    row0 = ids_with_images([7, 8, "I", 9, "I", 10, 11])
    row1 = ids_with_images([12, "I", 13]) + [0] * (len(row0) - RUN - 2)  # right padding
    input_ids = torch.tensor([row0, row1])
    mask = (torch.arange(input_ids.shape[1]) < torch.tensor([[len(row0)], [RUN + 2]])).long()
    pixels = torch.randn(2, 2, 3, 32, 32)
    ours = vlm(input_ids=input_ids, pixel_values=pixels, attention_mask=mask).logits
    fp32 = {k: v.float() for k, v in state.items()}
    with torch.no_grad():
        feats = vlm.image_features(pixels.flatten(0, 1)).view(2, 2, RUN, -1)
    ref = reference_logits(fp32, vlm.config, input_ids, mask, feats)
    real = mask.bool()
    assert torch.allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)


def test_language_model_only_file_needs_the_projector_allowed_missing(vlm, tmp_path):
    torch.save(minimind_style_state(vlm.config, with_projector=False), tmp_path / "lm_32.pth")
    with pytest.raises(WeightsMismatchError, match="vision_proj.vision_proj.0.weight"):
        load_minimind_weights(vlm, tmp_path / "lm_32.pth")
    left = load_minimind_weights(vlm, tmp_path / "lm_32.pth", allow_missing=("vision_proj.",))
    assert left == ["vision_proj.vision_proj.0.bias", "vision_proj.vision_proj.0.weight"]


def test_wrong_shape_and_unknown_key_are_named(vlm, tmp_path):
    state = minimind_style_state(vlm.config)
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    state["model.layers.9.mlp.extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsMismatchError) as err:
        load_minimind_weights(vlm, tmp_path / "bad.pth")
    assert "model.layers.1.self_attn.k_proj.weight: file (3, 3) vs model (16, 32)" in str(err.value)
    assert "model.layers.9.mlp.extra.weight" in str(err.value)


def test_wrapper_prefixes_are_stripped_and_vision_encoder_keys_ignored(vlm, tmp_path):
    state = {f"module.{k}": v for k, v in minimind_style_state(vlm.config).items()}
    state["vision_encoder.some.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "ddp.pth")
    assert load_minimind_weights(vlm, tmp_path / "ddp.pth") == []


def test_pickled_code_is_never_run(vlm, tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"model.norm.weight": Boom()}, tmp_path / "evil.pth")
    with pytest.raises(Exception):  # noqa: B017 - any refusal is fine; what matters is the file below
        read_state_dict(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def test_save_round_trip_is_fp16_without_vision_encoder(vlm, tmp_path):
    path = save_minimind_weights(vlm, tmp_path / "out.pth")
    saved = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in saved.values())
    assert not any(k.startswith("vision_encoder.") for k in saved)
    assert {"lm_head.weight", "model.embed_tokens.weight", "vision_proj.vision_proj.0.weight"} <= set(saved)
    fresh = MiniMindVLM(tiny_config(), vlm.get_vision_encoder()).eval()
    load_minimind_weights(fresh, path)
    input_ids = torch.tensor([ids_with_images([7, "I", 8])])
    pixels = torch.randn(1, 1, 3, 32, 32)
    a = vlm.half().float()(input_ids=input_ids, pixel_values=pixels).logits
    b = fresh(input_ids=input_ids, pixel_values=pixels).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_moe_key_names_load(tiny_vision_dir, tmp_path):
    cfg = tiny_config(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)
    model = MiniMindVLM(cfg, load_vision_encoder(tiny_vision_dir))
    keys = set(model.state_dict())
    assert "model.layers.0.mlp.gate.weight" in keys
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in keys
    assert "model.layers.1.mlp.shared_experts.0.up_proj.weight" in keys
    save_minimind_weights(model, tmp_path / "moe.pth")
    other = MiniMindVLM(cfg, load_vision_encoder(tiny_vision_dir))
    assert load_minimind_weights(other, tmp_path / "moe.pth") == []
    assert IMG == cfg.image_token_id


def test_untied_head_in_file_is_refused_for_a_tied_model(vlm, tmp_path):
    state = minimind_style_state(vlm.config)
    state["lm_head.weight"] = state["lm_head.weight"].clone() + 1
    torch.save(state, tmp_path / "untied.pth")
    with pytest.raises(WeightsMismatchError, match="ties them"):
        load_minimind_weights(vlm, tmp_path / "untied.pth")
