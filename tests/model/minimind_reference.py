"""An independent, deliberately plain re-statement of MiniMind-V's forward math, for equivalence tests.

Written from MiniMind's published formulas (not its code): RMSNorm in fp32 with the weight applied after
casting back; RoPE with theta 1e6, frequencies 1/theta^(2i/d) duplicated over both halves, rotate-half
layout; GQA with kv head j serving query heads j*n_rep .. (j+1)*n_rep-1; explicit softmax attention with a
causal mask and padding keys masked by -1e9; SwiGLU; tied lm_head. Dense layers only.
Image features replace each run of `image_token_len` placeholder ids, in order, as MiniMind-V does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.type_as(x)


def rope_tables(head_dim, length, theta):
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length).float(), freqs)
    return torch.cat([angles.cos(), angles.cos()], -1), torch.cat([angles.sin(), angles.sin()], -1)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def write_image_runs(h, input_ids, image_features, image_id, run):
    """A copy of h (B, T, D) with the k-th run of `run` ids `image_id` in row b replaced by image_features[b, k]."""
    h = h.clone()
    for b in range(input_ids.shape[0]):
        ids, k, t = input_ids[b].tolist(), 0, 0
        while t < len(ids):
            if ids[t : t + run] == [image_id] * run:
                h[b, t : t + run] = image_features[b, k]
                k, t = k + 1, t + run
            else:
                t += 1
    return h


def reference_logits(state, cfg, input_ids, attention_mask=None, image_features=None):
    """state: MiniMind-V state dict (fp32); input_ids (B, T); image_features (B, N, L, D) already projected."""
    bsz, seq = input_ids.shape
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    h = state["model.embed_tokens.weight"][input_ids]  # (B, T, D)
    if image_features is not None:
        h = write_image_runs(h, input_ids, image_features, cfg.image_token_id, cfg.image_token_len)
    cos, sin = rope_tables(head_dim, seq, cfg.rope_theta)
    causal = torch.triu(torch.full((seq, seq), float("-inf")), diagonal=1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms_norm(h, state[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = (x @ state[p + "self_attn.q_proj.weight"].T).view(bsz, seq, heads, head_dim)
        k = (x @ state[p + "self_attn.k_proj.weight"].T).view(bsz, seq, kv_heads, head_dim)
        v = (x @ state[p + "self_attn.v_proj.weight"].T).view(bsz, seq, kv_heads, head_dim)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        n_rep = heads // kv_heads
        k = k.repeat_interleave(n_rep, dim=2)
        v = v.repeat_interleave(n_rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim) + causal
        if attention_mask is not None:
            scores = scores + (1.0 - attention_mask[:, None, None, :].float()) * -1e9
        out = F.softmax(scores.float(), dim=-1) @ v
        out = out.transpose(1, 2).reshape(bsz, seq, heads * head_dim)
        h = h + out @ state[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, state[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = F.silu(x @ state[p + "mlp.gate_proj.weight"].T)
        up = x @ state[p + "mlp.up_proj.weight"].T
        h = h + (gate * up) @ state[p + "mlp.down_proj.weight"].T
    h = rms_norm(h, state["model.norm.weight"], cfg.rms_norm_eps)
    return h @ state["lm_head.weight"].T
