"""An independent, deliberately plain re-statement of MiniMind-V 3v's forward math (jingyaogong/minimind-v at
959561791f82, "minimind-3v"), for equivalence tests; written from its published formulas, not its code.

What differs from 623a130 (`minimind_reference.py`): a per-head RMSNorm on queries and keys (`q_norm`,
`k_norm`, over head_dim) before RoPE; head_dim as configured; RMSNorm epsilon 1e-6; a feed-forward width of
ceil(hidden * pi / 64) * 64; MoE with top-1 softmax routing whose weight is normalised (so 1), no shared
expert; the vision side: SigLIP's `last_hidden_state` (every token, no CLS) through LayerNorm -> Linear ->
GELU -> Linear (`vision_proj.mlp.{0,1,3}`), written over each run of `<|image_pad|>` ids. Explicit softmax
attention, causal, no padding; GQA: kv head j serves query heads j*n_rep .. (j+1)*n_rep-1; tied lm_head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tests.model.minimind_reference import rms_norm, rope_tables, rotate, write_image_runs


def ffn_width(hidden: int) -> int:
    """MiniMind 3v's feed-forward width: ceil(hidden * pi / 64) * 64 (2432 at 768)."""
    return math.ceil(hidden * math.pi / 64) * 64


def project(state: dict, features: torch.Tensor) -> torch.Tensor:
    """(N, P, Dv) tower features -> (N, P, D): LayerNorm, Linear, GELU (exact), Linear."""
    x = F.layer_norm(features, features.shape[-1:], state["vision_proj.mlp.0.weight"], state["vision_proj.mlp.0.bias"])
    x = F.gelu(x @ state["vision_proj.mlp.1.weight"].T + state["vision_proj.mlp.1.bias"])
    return x @ state["vision_proj.mlp.3.weight"].T + state["vision_proj.mlp.3.bias"]


def _mlp(state: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ state[prefix + "gate_proj.weight"].T) * (x @ state[prefix + "up_proj.weight"].T)) @ state[
        prefix + "down_proj.weight"].T


def reference_logits(state: dict, cfg, input_ids: torch.Tensor, image_features=None, pad_id: int = 12,
                     run: int = 64) -> torch.Tensor:
    """state: a 3v state dict (fp32); cfg: heads, kv heads, head_dim, layers, eps, theta, use_moe;
    input_ids (B, T); image_features (B, N, run, D) already projected. Returns logits (B, T, vocab)."""
    bsz, seq = input_ids.shape
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h = state["model.embed_tokens.weight"][input_ids]
    if image_features is not None:
        h = write_image_runs(h, input_ids, image_features, pad_id, run)
    cos, sin = rope_tables(hd, seq, cfg.rope_theta)
    causal = torch.triu(torch.full((seq, seq), float("-inf")), diagonal=1)
    eps = cfg.rms_norm_eps
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms_norm(h, state[p + "input_layernorm.weight"], eps)
        q = (x @ state[p + "self_attn.q_proj.weight"].T).view(bsz, seq, heads, hd)
        k = (x @ state[p + "self_attn.k_proj.weight"].T).view(bsz, seq, kv_heads, hd)
        v = (x @ state[p + "self_attn.v_proj.weight"].T).view(bsz, seq, kv_heads, hd)
        q = rms_norm(q, state[p + "self_attn.q_norm.weight"], eps)  # per head, before RoPE
        k = rms_norm(k, state[p + "self_attn.k_norm.weight"], eps)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=2) for t in (k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd) + causal
        out = (F.softmax(scores.float(), dim=-1) @ v).transpose(1, 2).reshape(bsz, seq, heads * hd)
        h = h + out @ state[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, state[p + "post_attention_layernorm.weight"], eps)
        if cfg.use_moe:  # top-1 of a softmax router, weight normalised to 1: the chosen expert's output
            choice = (x @ state[p + "mlp.gate.weight"].T).softmax(-1).argmax(-1)  # (B, T)
            y = torch.stack([_mlp(state, f"{p}mlp.experts.{e}.", x) for e in range(cfg.n_routed_experts)], -1)
            h = h + y.gather(-1, choice[..., None, None].expand(*choice.shape, y.shape[2], 1)).squeeze(-1)
        else:
            h = h + _mlp(state, p + "mlp.", x)
    h = rms_norm(h, state["model.norm.weight"], eps)
    return h @ state["lm_head.weight"].T
