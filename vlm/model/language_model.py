"""The MiniMind language model (dense or MoE) as a `transformers` model that can `generate()` with a KV cache.

State-dict keys are MiniMind's own (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`,
..., `model.norm.weight`, `lm_head.weight`), so MiniMind(-V) `.pth` files load by name; the math (RMSNorm,
rotate-half RoPE, GQA head mapping, SwiGLU, MoE routing) follows MiniMind so those weights give its logits.

Attention mask contract (the data pipeline relies on it): `attention_mask` is an integer or bool tensor
(B, T_total), 0 = padding, a positive value = segment id. A token attends causally to the earlier tokens of
its own segment only, so several samples packed in one row stay isolated; a 0/1 padding mask is the case of
one segment. Without `position_ids`, positions restart at 0 in every segment (so left padding is not
counted). A missing mask (or, outside training, an all-ones one) takes SDPA's `is_causal` path and never
builds a mask tensor. Rows with several segments (packed rows) use a dense (B, 1, T, T) bool mask, or, once
`MiniMindModel.packed_attention` is "flex" (`MiniMindVLM.compile_blocks` sets it) and the platform runs it
(CUDA; on CPU PyTorch has no FlexAttention backward, so only without gradients), a FlexAttention block mask
with which the fused kernel skips the tiles two samples do not share.

    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=512, num_hidden_layers=8))
    out = model(input_ids, attention_mask=mask, labels=labels)   # out.loss, out.aux_loss, out.logits
    ids = model.generate(input_ids, max_new_tokens=32)           # KV cache (transformers DynamicCache)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from vlm.formats.constants import IGNORE_INDEX
from vlm.model import flex
from vlm.model.config import MiniMindConfig
from vlm.model.moe import FeedForward, MoEFeedForward, MoEGate
from vlm.model.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    """MiniMind's RMSNorm: normalise in fp32, cast back to the input dtype, then scale by the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., D): x / sqrt(mean(x^2) + eps) in fp32, cast to x's dtype, times the weight."""
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def segment_attention(segment_ids: torch.Tensor, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and positions for the last `q_len` tokens of rows of segment ids (B, T_total).

    Returns a bool mask (B, 1, q_len, T_total), True = may attend: same segment and not in the future; and
    positions (B, q_len): how many earlier tokens of its own segment each token has. Padding tokens
    (segment 0) attend to earlier padding, which keeps their softmax finite; nothing real attends to them.
    """
    total = segment_ids.shape[1]
    seg = segment_ids.long()
    seg_q = seg[:, total - q_len :]  # (B, Tq)
    q_pos = torch.arange(total - q_len, total, device=seg.device)
    causal = torch.arange(total, device=seg.device)[None, :] <= q_pos[:, None]  # (Tq, Tk)
    allowed = (seg_q[:, :, None] == seg[:, None, :]) & causal  # (B, Tq, Tk)
    positions = (allowed.sum(-1) - 1).masked_fill(seg_q == 0, 0)
    return allowed.unsqueeze(1), positions


class Attention(nn.Module):
    """Grouped-query attention with RoPE through `F.scaled_dot_product_attention`."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:  # MiniMind-V 3v: per-head RMSNorm on q and k, before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x, cos, sin, attn_mask: torch.Tensor | None, cache: Cache | None = None, causal: bool = True
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D): project, rotate q and k, extend the cache, attend, project back.

        `cos`/`sin` (B or 1, T, head_dim) are the rotary tables at x's positions; `attn_mask` is a bool
        (B, 1, T, T_total) mask, True = may attend, or None (see `attend`, which also takes `causal`). With
        `cache`, this layer's keys and values are appended to it and the queries also attend to the cached
        tokens (T_total = cached + T).
        """
        bsz, q_len, _ = x.shape
        q = self.q_proj(x).view(bsz, q_len, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(bsz, q_len, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).view(bsz, q_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, T_total, hd)
        out = self.attend(q, k, v, attn_mask, causal)
        return self.resid_dropout(self.o_proj(out.transpose(1, 2).reshape(bsz, q_len, -1)))

    def attend(self, q, k, v, attn_mask: torch.Tensor | None, causal: bool = True) -> torch.Tensor:
        """q (B, H, Tq, hd), k/v (B, H_kv, Tk, hd), mask (B, 1, Tq, Tk) bool or None -> (B, H, Tq, hd).

        Query head h reads key/value head h // (H / H_kv) (the order of MiniMind's `repeat_kv`): without a mask
        through SDPA's `enable_gqa`, so K/V are not copied H / H_kv times. A None mask means plain causal attention with
        `causal` (the model passes None then only without a cache prefix) and attend-to-everything without
        (one decoding step). `causal` is a Python bool the model decides outside the blocks, so a compiled
        block never compares symbolic shapes for it.
        A `flex.BlockMask` (packed rows, see the module docstring) goes to FlexAttention, which reads K/V
        heads by the same mapping without copies.
        """
        gqa = self.n_rep > 1
        if flex.is_block_mask(attn_mask):
            return flex.attend(q, k, v, attn_mask, gqa)
        if gqa and attn_mask is not None:
            # CUDA's flash and memory-efficient kernels take enable_gqa only without a mask: with one (packed
            # rows, left padding) copying K/V keeps the memory-efficient kernel instead of the math fallback.
            k, v = k.repeat_interleave(self.n_rep, dim=1), v.repeat_interleave(self.n_rep, dim=1)
            gqa = False
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and causal,
            enable_gqa=gqa,
        )


class MiniMindBlock(GradientCheckpointingLayer):
    """Pre-norm decoder layer; returns (hidden states, MoE aux loss or 0)."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, hidden, cos, sin, attn_mask, cache: Cache | None = None, causal: bool = True):
        """hidden (B, T, D) -> (hidden (B, T, D), aux loss scalar): attention, then the MLP.

        Both sublayers are pre-norm and residual. The aux loss is the MoE router's balance loss, or a zero
        scalar for a dense MLP. `cos`, `sin`, `attn_mask`, `cache` and `causal` go on to `Attention.forward`.
        """
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, attn_mask, cache=cache,
                                         causal=causal)
        if isinstance(self.mlp, MoEFeedForward):
            mlp_out, aux_loss = self.mlp(self.post_attention_layernorm(hidden))
        else:
            mlp_out, aux_loss = self.mlp(self.post_attention_layernorm(hidden)), hidden.new_zeros(())
        return hidden + mlp_out, aux_loss


class MiniMindModel(nn.Module):
    """Embeddings, decoder layers and the final norm; returns (normed hidden states, summed aux loss)."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(MiniMindBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_yarn_factor, config.rope_yarn_original)
        self.packed_attention = "dense"  # or "flex": see the module docstring

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None):
        """Embed, run the layers, norm: returns (hidden (B, T, D), aux loss summed over layers).

        Pass exactly one of `input_ids` (B, T) or `inputs_embeds` (B, T, D); dropout applies to either.
        `attention_mask` (B, T_total) holds segment ids (see the module docstring); `position_ids` (B, T),
        when given, replace the positions derived from it. `cache` (a transformers `Cache`) is updated
        in place.
        Raises ValueError for both or neither input, and (`attention_layout`) for a sequence longer than
        max_position_embeddings or a mask that is not (B, cached + T).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        # Dropout applies to whatever enters the stack, including image features written into inputs_embeds.
        hidden = self.dropout(self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds)
        past = cache.get_seq_length() if cache is not None else 0
        attn_mask, positions = self.attention_layout(attention_mask, hidden.shape[1], past)
        causal = hidden.shape[1] > 1  # decided here, outside the (possibly compiled) blocks
        if position_ids is not None:
            positions = position_ids
        cos, sin = self.rotary(positions)
        aux_loss = hidden.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            hidden, layer_aux = layer(hidden, cos, sin, attn_mask, cache=cache, causal=causal)
            aux_loss = aux_loss + layer_aux
        return self.norm(hidden), aux_loss

    def attention_layout(self, attention_mask, q_len: int, past: int):
        """(mask, positions) for this call: the mask is None (plain causal), a bool (B, 1, Tq, T_total) tensor,
        or a `flex.BlockMask` (packed rows without a cache, `packed_attention` "flex", the platform able);
        positions a slice or a (B, Tq) tensor."""
        total = past + q_len
        if total > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {total} tokens exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}; raise it in the model config or shorten the input"
            )
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be (batch, tokens) of segment ids (0 = padding); got shape "
                f"{tuple(attention_mask.shape)}"
            )
        if attention_mask is not None and attention_mask.shape[-1] != total:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens but cache + input hold {total}; "
                "pass the mask for the whole sequence, cached tokens included"
            )
        # An all-ones mask is plain causal attention; finding that out reads the mask back from the device, so
        # in training (where the trainer passes a mask only for packed rows) a given mask is used as it is.
        if attention_mask is None or (not self.training and bool((attention_mask == 1).all())):
            if past == 0 or q_len == 1:
                return None, slice(past, total)
            attention_mask = torch.ones(1, total, dtype=torch.long, device=self.embed_tokens.weight.device)
        if past == 0 and self.packed_attention == "flex" and flex.usable(
            attention_mask.device, self.config.dropout if self.training else 0.0
        ):
            return flex.segment_block_mask(attention_mask), flex.segment_positions(attention_mask)
        return segment_attention(attention_mask, q_len)


@dataclass
class MiniMindOutput(MoeCausalLMOutputWithPast):
    """`loss` (CE only), `aux_loss` (MoE balance loss, add it to the loss yourself), `logits`, and the KV
    cache as both `cache` (transformers 5.24's field) and `past_key_values` (the field before it, and
    MiniMind's name): whichever the installed transformers declares is the field, the other an alias."""


# transformers 5.24 renamed the output's cache field from past_key_values to cache; support both.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(MoeCausalLMOutputWithPast)} else "past_key_values"
if _CACHE_FIELD == "cache":
    MiniMindOutput.past_key_values = property(lambda self: self.cache, doc="Older name of `cache`.")
else:
    MiniMindOutput.cache = property(lambda self: self.past_key_values, doc="Newer name of `past_key_values`.")


def _output(loss, aux_loss, logits, cache) -> MiniMindOutput:
    return MiniMindOutput(loss=loss, aux_loss=aux_loss, logits=logits, **{_CACHE_FIELD: cache})


class MiniMindForCausalLM(PreTrainedModel, GenerationMixin):
    """MiniMind causal LM: `model` (MiniMindModel) + `lm_head` tied to `model.embed_tokens`."""

    config_class = MiniMindConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiniMindBlock"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MoEGate):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif isinstance(module, RotaryEmbedding):
            module.reset_tables()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding `model.embed_tokens` (vocab_size x D)."""
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace `model.embed_tokens` (the transformers hook used by `resize_token_embeddings`)."""
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        """The output projection `lm_head` (D -> vocab_size), tied to the token embedding."""
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        """Replace `lm_head` (the transformers hook used by `resize_token_embeddings`)."""
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        loss_index: torch.Tensor | None = None,
        loss_targets: torch.Tensor | None = None,
        **kwargs,
    ) -> MiniMindOutput:
        """Logits, and with `labels` (aligned with the input, shifted here) the mean CE over labels != -100.

        With `loss_index` (K,) long (flat positions b * T + t whose logits are scored) and `loss_targets` (K,)
        (their next-token labels; `vlm.data.collate` makes both) instead of `labels`: the output head runs on
        those K rows only, `logits` is (K, vocab) and `loss` their mean CE, the same value as with `labels`.
        `cache` is transformers 5.24's name for the KV cache (what `generate` passes); `past_key_values` is
        accepted as the older name. `use_cache=True` without a cache starts a `DynamicCache`.
        """
        check_ignored_kwargs(kwargs)
        cache = cache if cache is not None else past_key_values
        if use_cache is False:
            cache = None
        elif use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden, aux_loss = self.model(input_ids, attention_mask, position_ids, inputs_embeds, cache)
        if loss_index is not None:
            logits = self.lm_head(hidden.flatten(0, 1)[loss_index])  # (K, V)
            total = F.cross_entropy(logits.float(), loss_targets, reduction="sum")
            return _output(total / max(loss_index.numel(), 1), aux_loss, logits, cache)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need logits for every position; call with logits_to_keep=0")
            loss = shifted_cross_entropy(logits, labels)
        return _output(loss, aux_loss, logits, cache)


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean fp32 CE of logits[:, t] against labels[:, t + 1] over labels != -100 (0 when there are none)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (shift_labels != IGNORE_INDEX).sum().clamp(min=1)


# Arguments `generate` and HF utilities may pass that this model has nothing to do with.
_HARMLESS_KWARGS = {"return_dict", "output_attentions", "output_hidden_states", "cache_position"}


def check_ignored_kwargs(kwargs: dict) -> None:
    """Raise TypeError for extra `forward` arguments this model does not support.

    Names in `_HARMLESS_KWARGS` and arguments set to None pass, except that asking for `output_attentions` or
    `output_hidden_states` is refused too: the model returns neither.
    """
    unknown = sorted(k for k, v in kwargs.items() if k not in _HARMLESS_KWARGS and v is not None)
    if unknown or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
        raise TypeError(
            f"MiniMindForCausalLM.forward got unsupported arguments {unknown or ['output_attentions/hidden_states']}"
        )
