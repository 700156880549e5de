"""Packed-row attention through FlexAttention: a block mask from segment ids instead of a dense square.

A packed row holds several samples; each token attends causally within its own segment (the contract in
`vlm.model.language_model`). The dense path builds a (B, 1, T, T) bool mask, which rules out the fused
SDPA kernels and computes every score. Here the same rule is a FlexAttention `mask_mod` (PyTorch >= 2.5):
`create_block_mask` marks which (128 x 128) tiles two samples share, and the kernel skips the rest. It is
fast only inside `torch.compile` (a compiled decoder block), and PyTorch runs its backward on CUDA only.
The block mask is built once per forward, outside the blocks, and shared by all layers; building it
evaluates the rule on the whole (B, T, T) square once (eager `create_block_mask`), but the attention kernels
never read a dense mask and skip the unshared tiles.

    mask = segment_block_mask(segment_ids)              # (B, T) ids, 0 = padding
    out = attend(q, k, v, mask, gqa=True)                # q (B, H, T, hd), k/v (B, H_kv, T, hd)
"""

from __future__ import annotations

import torch

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # PyTorch without FlexAttention: the dense path is used
    BlockMask = create_block_mask = flex_attention = None


def usable(device: torch.device, dropout: float) -> bool:
    """Whether this call can attend through FlexAttention: PyTorch has it, no attention dropout (FlexAttention
    has none), and the device runs what the call needs (CUDA; the CPU only without gradients)."""
    if flex_attention is None or dropout > 0:
        return False
    return device.type == "cuda" or not torch.is_grad_enabled()


def is_block_mask(mask) -> bool:
    """True for a FlexAttention `BlockMask` (what `segment_block_mask` returns)."""
    return BlockMask is not None and isinstance(mask, BlockMask)


def segment_block_mask(segment_ids: torch.Tensor):
    """(B, T) segment ids -> a `BlockMask` for (B, H, T, T) attention: same segment and not in the future.

    The rule of `language_model.segment_attention` (padding, segment 0, attends to earlier padding; nothing
    real attends to it), with one mask for all heads. Nothing is read back to the host.
    """
    seg = segment_ids.long()

    def same_segment_causal(b, h, q_idx, kv_idx):
        return (seg[b, q_idx] == seg[b, kv_idx]) & (q_idx >= kv_idx)

    batch, total = seg.shape
    return create_block_mask(same_segment_causal, batch, None, total, total, device=seg.device)


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, T) long positions: how many earlier tokens of its own segment each token has
    (0 for padding), as `language_model.segment_attention` counts them, in O(T log T).

    A stable sort groups each row's tokens by segment in their order; a token's position is its rank in
    its group.
    """
    seg = segment_ids.long()
    sorted_seg, order = torch.sort(seg, dim=1, stable=True)
    index = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    first = torch.ones_like(sorted_seg, dtype=torch.bool)
    first[:, 1:] = sorted_seg[:, 1:] != sorted_seg[:, :-1]
    group_start = torch.where(first, index, torch.zeros_like(index)).cummax(dim=1).values
    positions = torch.empty_like(seg).scatter_(1, order, index - group_start)
    return positions.masked_fill(seg == 0, 0)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, gqa: bool) -> torch.Tensor:
    """q (B, H, T, hd), k/v (B, H_kv, T, hd), a `BlockMask` -> (B, H, T, hd); with `gqa`, query head h reads
    key/value head h // (H / H_kv) without copying them."""
    return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
