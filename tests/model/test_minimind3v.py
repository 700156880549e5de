"""MiniMind-V 3v (jingyaogong/minimind-v at 959561791f82) weights: strict load by its key names and shapes, and
the same logits as an independent restatement of its math (`minimind3v_reference.py`), dense and MoE.

.venv/bin/python -m pytest tests/model/test_minimind3v.py -q
"""

import pytest
import torch

from tests.model.minimind3v_reference import ffn_width, project, reference_logits
from vlm.model.config import VLMConfig
from vlm.model.vision_encoder import load_vision_encoder
from vlm.model.vlm import MiniMindVLM
from vlm.model.weights import load_minimind_weights, save_minimind_weights

PAD, RUN = 12, 16  # <|image_pad|>'s id in MiniMind 3v's tokenizer; the tiny SigLIP tower's 16 tokens


def config_3v(use_moe: bool) -> VLMConfig:
    """MiniMind 3v's choices at a tiny size (head_dim 24 is not hidden / heads = 16: set on its own)."""
    return VLMConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=24, intermediate_size=ffn_width(64), rms_norm_eps=1e-6, qk_norm=True,
                     max_position_embeddings=512, image_token_id=PAD, image_token_len=RUN, vision_hidden_size=32,
                     projector="mlp", use_moe=use_moe, n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=0,
                     aux_loss_alpha=5e-4, seq_aux=False, moe_normalize_top1=True)


def state_3v(use_moe: bool, seed: int = 3) -> dict[str, torch.Tensor]:
    """Random tensors under MiniMind 3v's key names and shapes (what its sft_vlm_768[_moe].pth holds: the
    language model, lm_head as the embedding's twin, and vision_proj.mlp; no vision tower)."""
    g = torch.Generator().manual_seed(seed)
    d, hd, ff, v = 64, 24, ffn_width(64), 32
    shapes = {"model.embed_tokens.weight": (97, d), "model.norm.weight": (d,),
              "vision_proj.mlp.0.weight": (v,), "vision_proj.mlp.0.bias": (v,), "vision_proj.mlp.1.weight": (d, v),
              "vision_proj.mlp.1.bias": (d,), "vision_proj.mlp.3.weight": (d, d), "vision_proj.mlp.3.bias": (d,)}
    mlps = [f"mlp.experts.{e}." for e in range(4)] if use_moe else ["mlp."]
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (4 * hd, d), p + "self_attn.k_proj.weight": (2 * hd, d),
                   p + "self_attn.v_proj.weight": (2 * hd, d), p + "self_attn.o_proj.weight": (d, 4 * hd),
                   p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
        for m in mlps:
            shapes |= {p + m + "gate_proj.weight": (ff, d), p + m + "up_proj.weight": (ff, d),
                       p + m + "down_proj.weight": (d, ff)}
        if use_moe:
            shapes[p + "mlp.gate.weight"] = (4, d)
    state = {k: torch.randn(s, generator=g) * 0.2 + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
             for k, s in shapes.items()}
    state["vision_proj.mlp.0.weight"] = 1.0 + 0.2 * torch.randn(v, generator=g)  # a LayerNorm's weight
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


@pytest.mark.parametrize("use_moe", [False, True])
def test_a_3v_file_loads_strictly_and_gives_its_logits(tiny_siglip_dir, tmp_path, use_moe):
    cfg, state = config_3v(use_moe), state_3v(use_moe)
    torch.save(state, tmp_path / "sft_vlm_3v.pth")
    model = MiniMindVLM(cfg, load_vision_encoder(tiny_siglip_dir)).eval()
    load_minimind_weights(model, tmp_path / "sft_vlm_3v.pth")  # strict: every key, every shape
    text = torch.randint(20, 97, (2, 30), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([text[:, :5], torch.full((2, RUN), PAD), text[:, 5:12], torch.full((2, RUN), PAD), text[:, 12:]], 1)
    pixels = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels).logits
        features = model.get_vision_encoder()(pixel_values=pixels.flatten(0, 1)).last_hidden_state  # (4, 16, 32)
        want = reference_logits(state, cfg, ids, project(state, features).view(2, 2, RUN, -1), PAD, RUN)
    assert (ours - want).abs().max().item() <= 1e-4
    # Our export in this generation's layout has 3v's key set (what its own model loads).
    saved = torch.load(save_minimind_weights(model, tmp_path / "ours.pth"), map_location="cpu", weights_only=True)
    assert set(saved) == set(state)


def test_the_3v_choices_that_differ_from_623a130_each_change_the_logits(tiny_siglip_dir):
    """q/k norm, eps 1e-6 and the normalised top-1 weight each matter: a model without one of them differs."""
    ids = torch.randint(20, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    logits = {}
    for name, change in (("3v", {}), ("no qk_norm", {"qk_norm": False}), ("eps", {"rms_norm_eps": 1e-5}),
                         ("top-1 weight", {"moe_normalize_top1": False})):
        cfg = config_3v(use_moe=True).to_dict() | change
        model = MiniMindVLM(VLMConfig(**cfg)).eval()
        state = {k: v for k, v in state_3v(True).items() if change.get("qk_norm", True) or "_norm." not in k}
        model.load_state_dict(state, strict=False)
        with torch.no_grad():
            logits[name] = model(input_ids=ids).logits
    for name in ("no qk_norm", "eps", "top-1 weight"):
        assert not torch.allclose(logits[name], logits["3v"], atol=1e-6), name


def test_the_shipped_3v_configs_build_3vs_768_model():
    """launch/configs/minimind3v_*.yaml give the shapes of 3v's llm_768.pth: every key and shape counted."""
    from pathlib import Path

    from vlm.config import load_config

    configs = sorted((Path(__file__).resolve().parents[2] / "launch" / "configs").glob("minimind3v_*.yaml"))
    assert [p.name for p in configs] == ["minimind3v_pretrain.yaml", "minimind3v_sft.yaml"]
    per_layer = 768 * 768 * 2 + 384 * 768 * 2 + 2 * 768 + 2 * 96 + 3 * 2432 * 768  # q o, k v, norms, q/k norms, MLP
    expected = 6400 * 768 + 8 * per_layer + 768  # embedding (tied head), layers, final norm
    for path in configs:
        cfg = load_config(path)
        with torch.device("meta"):
            model = MiniMindVLM(VLMConfig(**cfg.model.architecture(), vocab_size=6400, image_token_id=PAD,
                                          image_token_len=64, vision_hidden_size=768, projector=cfg.model.projector))
        assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vision_proj.")) == expected
        assert (model.config.head_dim, model.config.intermediate_size) == (96, ffn_width(768)) == (96, 2432)


def test_yarn_scales_the_rope_frequencies_as_3v_does_and_only_when_asked():
    """3v's numbers: head_dim 96, theta 1e6, 2048 trained positions -> the ramp runs from dimension 8 to 21;
    below 8 the frequencies stay, from 21 on they are divided by the factor (16)."""
    import math

    from vlm.model.rope import rotary_tables, yarn_scale

    scale = yarn_scale(96, 1e6, 16.0, 2048)
    assert scale[:9].tolist() == [1.0] * 9 and torch.allclose(scale[21:], torch.full((27,), 1 / 16))
    assert all(a > b for a, b in zip(scale[8:22].tolist(), scale[9:22].tolist()))  # the ramp in between
    base_cos, _ = rotary_tables(96, 4096, 1e6)
    yarn_cos, yarn_sin = rotary_tables(96, 4096, 1e6, yarn_factor=16.0, yarn_original=2048)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 96, 2).float() / 96)) * scale
    angle = 3000 * inv_freq
    torch.testing.assert_close(yarn_cos[3000], torch.cat([angle.cos(), angle.cos()]))
    torch.testing.assert_close(yarn_sin[3000], torch.cat([angle.sin(), angle.sin()]))
    assert not torch.allclose(yarn_cos, base_cos)
    assert torch.equal(rotary_tables(96, 2048, 1e6, yarn_factor=16.0, yarn_original=2048)[0], base_cos[:2048])
    cfg = config_3v(False).to_dict() | {"rope_yarn_factor": 16.0, "rope_yarn_original": 64}
    model = MiniMindVLM(VLMConfig(**cfg))
    assert not torch.allclose(model.model.rotary.cos, MiniMindVLM(config_3v(False)).model.rotary.cos)
    model.model.rotary.set_yarn(None)
    torch.testing.assert_close(model.model.rotary.cos, MiniMindVLM(config_3v(False)).model.rotary.cos)
    assert math.isclose(float(scale[0]), 1.0)
