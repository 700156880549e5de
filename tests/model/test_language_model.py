"""The MiniMind language model: math against an explicit reference, masks, packing, KV cache, generate, HF plumbing.

.venv/bin/python -m pytest tests/model/test_language_model.py -q
"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from vlm.model.config import MiniMindConfig
from vlm.model.language_model import MiniMindForCausalLM, RMSNorm


def tiny_config(**overrides) -> MiniMindConfig:
    fields = dict(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    fields.update(overrides)
    return MiniMindConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(tiny_config(**overrides)).eval()
    # Larger-than-default weights so attention patterns and routing are far from uniform.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.15)
    return model


def reference_logits(model: MiniMindForCausalLM, ids: torch.Tensor, pad_mask: torch.Tensor | None = None):
    """MiniMind's dense forward written out: explicit softmax(QK^T/sqrt(d) + mask)V with repeat_kv.

    Masking as MiniMind does it (causal -inf plus (1 - mask) * -1e9 on padded keys); positions count only
    real tokens, the contract for left padding.
    """
    cfg, sd = model.config, model.state_dict()
    bsz, seq = ids.shape
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    pad_mask = torch.ones_like(ids) if pad_mask is None else pad_mask
    pos = (pad_mask.cumsum(-1) - 1).clamp(min=0)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    ang = pos[..., None].float() * inv_freq  # (B, T, hd/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, :, None], torch.cat([ang.sin()] * 2, -1)[:, :, None]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    def rope(x):  # (B, T, H, hd)
        rotated = torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * cos + rotated * sin

    causal = torch.full((seq, seq), float("-inf")).triu(1)
    key_pad = (1.0 - pad_mask[:, None, None, :].float()) * -1e9
    h = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        q = rope((x @ sd[p + "self_attn.q_proj.weight"].T).view(bsz, seq, heads, hd))
        k = rope((x @ sd[p + "self_attn.k_proj.weight"].T).view(bsz, seq, kv_heads, hd))
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(bsz, seq, kv_heads, hd)
        k, v = k.repeat_interleave(heads // kv_heads, 2), v.repeat_interleave(heads // kv_heads, 2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + causal + key_pad
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(bsz, seq, -1)
        h = h + out @ sd[p + "self_attn.o_proj.weight"].T
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        gated = F.silu(x @ sd[p + "mlp.gate_proj.weight"].T) * (x @ sd[p + "mlp.up_proj.weight"].T)
        h = h + gated @ sd[p + "mlp.down_proj.weight"].T
    return rms(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def test_sdpa_attention_matches_explicit_math_without_mask():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(model(ids).logits, reference_logits(model, ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_sdpa_attention_matches_explicit_math_with_padding(side):
    model = tiny_model()
    ids = torch.randint(0, 97, (3, 10))
    lengths = [10, 7, 3]
    mask = torch.zeros(3, 10, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    if side == "left":
        mask = mask.flip(-1)
    ours, ref = model(ids, attention_mask=mask).logits, reference_logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=2e-5, rtol=1e-5)
    # A left-padded prompt gives the same logits as the prompt alone (positions start at its first token).
    alone = model(ids[1:2][mask[1:2].bool()].view(1, -1)).logits[0]
    torch.testing.assert_close(ours[1][real[1]], alone, atol=2e-5, rtol=1e-5)


def test_all_padding_row_has_no_nans_and_does_not_disturb_others():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits[0, :4], model(ids[:1, :4]).logits[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("use_moe", [False, True])
def test_packed_segments_equal_separate_samples(use_moe):
    model = tiny_model(use_moe=use_moe)
    a, b = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 4))
    pad = torch.zeros(1, 2, dtype=torch.long)
    packed = torch.cat([a, b, pad], 1)
    segments = torch.tensor([[1] * 5 + [2] * 4 + [0] * 2])
    # The pipeline's label contract for packing: no loss on a segment's first token or on padding.
    labels = packed.clone()
    labels[0, [0, 5, 9, 10]] = -100
    out = model(packed, attention_mask=segments, labels=labels)
    sep_a, sep_b = model(a, labels=a), model(b, labels=b)
    torch.testing.assert_close(out.logits[0, :5], sep_a.logits[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[0, 5:9], sep_b.logits[0], atol=2e-5, rtol=1e-5)
    expected = (sep_a.loss * 4 + sep_b.loss * 3) / 7
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_explicit_position_ids_override_derived_positions():
    model = tiny_model()
    ids = torch.randint(0, 97, (1, 6))
    # RoPE is relative: a constant shift changes nothing, a gap does.
    torch.testing.assert_close(model(ids, position_ids=torch.arange(3, 9)[None]).logits, model(ids).logits)
    gapped = model(ids, position_ids=torch.tensor([[0, 1, 2, 10, 11, 12]])).logits
    assert not torch.allclose(gapped, model(ids).logits, atol=1e-4)
    torch.testing.assert_close(model(ids, position_ids=torch.arange(6)[None]).logits, model(ids).logits)


@pytest.mark.parametrize("use_moe", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_incremental_decoding_equals_full_forward(use_moe, padded):
    model = tiny_model(use_moe=use_moe)
    ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0  # left padding
    full = model(ids, attention_mask=mask).logits
    cache = DynamicCache(config=model.config)
    pieces, start = [], 0
    for end in (4, 7, 8, 9, 10, 11):  # a prefill, a 3-token chunk after it, then single steps
        out = model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache and cache.get_seq_length() == end
        pieces.append(out.logits)
        start = end
    stepped = torch.cat(pieces, 1)
    real = mask.bool()
    torch.testing.assert_close(stepped[real], full[real], atol=1e-5, rtol=1e-5)


def test_loss_is_mean_cross_entropy_over_shifted_labels():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)
    assert out.aux_loss.item() == 0.0
    no_targets = model(ids, labels=torch.full_like(ids, -100)).loss
    assert no_targets.item() == 0.0


def test_inputs_embeds_and_logits_to_keep():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 7))
    by_ids = model(ids).logits
    by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(by_embeds, by_ids)
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, by_ids[:, -1:])
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


def test_tied_embeddings_share_storage():
    model = tiny_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.get_output_embeddings() is model.lm_head
    with torch.no_grad():
        model.model.embed_tokens.weight[5].fill_(0.5)
    assert torch.equal(model.lm_head.weight[5], torch.full((64,), 0.5))


def expected_keys(cfg: MiniMindConfig) -> dict[str, tuple[int, ...]]:
    hidden, inter, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    keys = {"model.embed_tokens.weight": (cfg.vocab_size, hidden), "model.norm.weight": (hidden,)}
    keys["lm_head.weight"] = (cfg.vocab_size, hidden)
    ffn = {
        "gate_proj.weight": (inter, hidden),
        "up_proj.weight": (inter, hidden),
        "down_proj.weight": (hidden, inter),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        keys.update(
            {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
        )
        keys.update(
            {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden)}
        )
        keys.update(
            {p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.v_proj.weight": (kv, hidden)}
        )
        if not cfg.use_moe:
            keys.update({p + "mlp." + k: s for k, s in ffn.items()})
            continue
        keys[p + "mlp.gate.weight"] = (cfg.n_routed_experts, hidden)
        for e in range(cfg.n_routed_experts):
            keys.update({f"{p}mlp.experts.{e}.{k}": s for k, s in ffn.items()})
        for s_ in range(cfg.n_shared_experts):
            keys.update({f"{p}mlp.shared_experts.{s_}.{k}": s for k, s in ffn.items()})
    return keys


@pytest.mark.parametrize("use_moe", [False, True])
def test_state_dict_keys_and_shapes_are_minimind_s(use_moe):
    model = tiny_model(use_moe=use_moe, n_routed_experts=3, n_shared_experts=2)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_keys(model.config)


def test_generate_uses_the_cache_and_matches_manual_greedy():
    model = tiny_model()
    prompt = torch.randint(3, 97, (1, 5))
    seen = []
    handle = model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args[0] is not None else args[3]).shape[1]),
        with_kwargs=True,
    )
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
    handle.remove()
    assert seen == [5, 1, 1, 1, 1, 1]
    ids = prompt
    for _ in range(6):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None), out)


def test_generate_left_padded_batch_matches_each_prompt_alone():
    model = tiny_model(use_moe=True)
    long, short = torch.randint(3, 97, (1, 6)), torch.randint(3, 97, (1, 4))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    both = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=None)
    alone = model.generate(short, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert torch.equal(both[1, 6:], alone[0, 4:])


def test_generate_sampling_is_reproducible_with_a_seed():
    model = tiny_model()
    prompt = torch.randint(3, 97, (2, 4))
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20, eos_token_id=None))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (2, 12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward(dtype):
    model = tiny_model(use_moe=True)
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.tensor([[1] * 9, [0] * 3 + [1] * 6])
    ref = model(ids, attention_mask=mask).logits
    model.to(dtype)
    assert model.model.rotary.cos.dtype == torch.float32  # tables stay fp32 for precise rotations
    out = model(ids, attention_mask=mask).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_is_minimind_s_formula(dtype):
    # MiniMind: weight * (x.float() normalised).type_as(x): the cast back happens before the weight multiplies.
    norm = RMSNorm(8, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 3.0, 8))
    x = torch.randn(3, 8, dtype=dtype) * 4
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    out = norm(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_bf16_autocast_forward_backward():
    model = tiny_model(use_moe=True).train()
    ids = torch.randint(0, 97, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
        loss = out.loss + out.aux_loss
    loss.backward()
    assert torch.isfinite(loss) and out.aux_loss > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 97, (2, 9))
    grads = []
    for checkpointed in (False, True):
        model = tiny_model(use_moe=True).train()
        if checkpointed:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        out = model(ids, labels=ids, attention_mask=torch.ones_like(ids))
        (out.loss + out.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = tiny_model(use_moe=True)
    ids = torch.randint(0, 97, (1, 8))
    model.save_pretrained(tmp_path)
    loaded = MiniMindForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.model.rotary.cos, model.model.rotary.cos)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(hidden_size=60, num_attention_heads=8), "not divisible by num_attention_heads"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "not divisible by num_key_value_heads"),
        (dict(hidden_size=24, num_attention_heads=8, num_key_value_heads=2), "must be even"),
        (dict(use_moe=True, n_routed_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
    ],
)
def test_config_validation_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_input_errors_name_the_fix():
    model = tiny_model(max_position_embeddings=8)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="whole sequence"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="segment ids"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="unsupported arguments"):
        model(torch.zeros(1, 4, dtype=torch.long), pixel_values=torch.zeros(1))


def test_the_cache_answers_to_both_names_transformers_gave_it():
    """transformers 5.24 calls the output's cache field `cache`, earlier 5.x (the GPU machine's 5.17)
    `past_key_values`: the output declares whichever exists and aliases the other."""
    out = tiny_model()(torch.randint(0, 97, (1, 6)), use_cache=True)
    assert isinstance(out.cache, DynamicCache) and out.past_key_values is out.cache
