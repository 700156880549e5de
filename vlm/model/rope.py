"""Rotary position embeddings exactly as MiniMind computes them (rotate-half layout, theta 1e6).

MiniMind precomputes `cos`/`sin` tables of shape (max_position_embeddings, head_dim) with the frequency
pattern repeated twice (`cat([f, f])`) and rotates the two halves of each head (`rotate_half`), not
interleaved pairs. The tables here are built the same way so MiniMind's weights give the same logits.

YaRN (MiniMind-V 3v's `inference_rope_scaling`, for inference beyond the trained context): with a factor s
over `original` trained positions, frequency i is multiplied by 1 - r_i + r_i / s, where the ramp r_i runs
from 0 at dimension `low` to 1 at `high`, the dimensions whose wavelength fits 32 (beta_fast) and 1
(beta_slow) times into `original`: dim(b) = d ln(original / (2 pi b)) / (2 ln theta), low = floor(dim(32)),
high = ceil(dim(1)) (YaRN, Peng et al. 2023; MiniMind's constants; its attention factor is 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

YARN_BETA_FAST, YARN_BETA_SLOW = 32, 1


def yarn_scale(head_dim: int, theta: float, factor: float, original: int) -> torch.Tensor:
    """(head_dim / 2,) multipliers of the RoPE frequencies under YaRN (see the module docstring)."""
    def dim(beta: float) -> float:
        return head_dim * math.log(original / (beta * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim(YARN_BETA_FAST)), 0)
    high = min(math.ceil(dim(YARN_BETA_SLOW)), head_dim // 2 - 1)
    ramp = ((torch.arange(head_dim // 2).float() - low) / max(high - low, 0.001)).clamp(0, 1)
    return 1 - ramp + ramp / factor


def rotary_tables(head_dim: int, max_positions: int, theta: float, yarn_factor: float | None = None,
                  yarn_original: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniMind's `precompute_freqs_cis`: fp32 tables of shape (max_positions, head_dim); with `yarn_factor`,
    YaRN-scaled when the tables reach beyond `yarn_original` positions (as MiniMind does)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if yarn_factor is not None and max_positions > yarn_original:
        inv_freq = inv_freq * yarn_scale(head_dim, theta, yarn_factor, yarn_original)
    angles = torch.outer(torch.arange(max_positions), inv_freq).float()  # (P, head_dim / 2)
    return torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([angles.sin(), angles.sin()], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d): halves [x1, x2] become [-x2, x1], as MiniMind's `rotate_half`."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, H, T, head_dim) by `cos`/`sin` of shape (B or 1, T, head_dim); keeps x's dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables as non-persistent buffers (never in a state dict) and looks positions up.

    `from_pretrained` builds models on the meta device, which leaves non-persistent buffers empty; the
    language model's `_init_weights` refills them with `reset_tables`.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, yarn_factor: float | None = None,
                 yarn_original: int = 2048):
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.yarn = (yarn_factor, yarn_original)
        cos, sin = rotary_tables(head_dim, max_positions, theta, *self.yarn)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reset_tables(self) -> None:
        """(Re)build fp32 tables on the buffers' current device."""
        cos, sin = rotary_tables(self.head_dim, self.max_positions, self.theta, *self.yarn)
        self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)

    def set_yarn(self, factor: float | None, original: int = 2048) -> None:
        """Switch YaRN scaling on (a factor) or off (None) and rebuild the tables: for inference beyond the
        context a model was trained on."""
        self.yarn = (factor, original)
        self.reset_tables()

    def _apply(self, fn, recurse=True):
        # Keep the tables in fp32 when the model is cast to bf16/fp16 (DeepSpeed does so): a bf16 cos table is
        # off by up to ~0.4% at long positions. Rebuilt rather than cast back, which would keep the rounding.
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32 and self.cos.device.type != "meta":
            self.reset_tables()
        return self

    def forward(self, positions: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """`positions` is a slice (same positions for every row) or a (B, T) integer tensor.

        Returns cos, sin of shape (1, T, head_dim) or (B, T, head_dim).
        """
        if isinstance(positions, slice):
            return self.cos[positions].unsqueeze(0), self.sin[positions].unsqueeze(0)
        return self.cos[positions], self.sin[positions]
