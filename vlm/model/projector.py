"""The projector: vision-tower features -> language-model embeddings, with optional pixel shuffle before it.

Kinds (`VLMConfig.projector`), each with the state-dict names of the project whose layout it is:

    linear      Linear                                  vision_proj.vision_proj.0.*   MiniMind-V 623a130
    mlp         LayerNorm -> Linear -> GELU -> Linear   vision_proj.mlp.{0,1,3}.*     MiniMind-V 3v
    mlp2x_gelu  Linear -> GELU -> Linear                vision_proj.mlp.{0,2}.*       LLaVA-1.5's projector

Pixel shuffle (`VLMConfig.pixel_shuffle` = s > 1) merges every s x s block of neighbouring patches into one
token whose features are the block's, concatenated (nanoVLM's and InternVL's token reduction): (N, P, D) ->
(N, P / s^2, D * s^2), e.g. 196 -> 49 tokens for ViT-B/16 at s = 2. The placeholder run shrinks with it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlm.formats.constants import PROJECTORS


def pixel_shuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, P, D) patch features on a square grid (row-major) -> (N, P / factor^2, D * factor^2).

    Output token (i, j) of the (g / factor)^2 grid holds input patches (i*f + a, j*f + b) for a, b in
    0..f-1, in that (a, b) order along the channels. Raises ValueError when P is not a square grid divisible
    by `factor`.
    """
    if factor == 1:
        return features
    n, tokens, dim = features.shape
    grid = math.isqrt(tokens)
    if grid * grid != tokens or grid % factor:
        raise ValueError(f"pixel shuffle by {factor} needs a square grid of patches divisible by it; got {tokens}")
    g = grid // factor
    blocks = features.reshape(n, g, factor, g, factor, dim).permute(0, 1, 3, 2, 4, 5)  # (N, g, g, f, f, D)
    return blocks.reshape(n, g * g, factor * factor * dim)


def shuffled_tokens(tokens: int, factor: int) -> int:
    """Image tokens per picture after `pixel_shuffle` by `factor`; ValueError as `pixel_shuffle`."""
    grid = math.isqrt(tokens)
    if factor > 1 and (grid * grid != tokens or grid % factor):
        raise ValueError(f"pixel shuffle by {factor} needs a square grid of patches divisible by it; the tower "
                         f"gives {tokens} image tokens per picture (keep model.vision_cls: drop)")
    return tokens // (factor * factor)


class VisionProjector(nn.Module):
    """(N, P, vision_hidden * pixel_shuffle^2) -> (N, P, hidden), of one of `PROJECTORS` (module docstring).

    Raises ValueError for an unknown kind.
    """

    def __init__(self, vision_hidden_size: int, hidden_size: int, kind: str = "linear", shuffle: int = 1):
        super().__init__()
        self.kind = kind
        self.in_features = vision_hidden_size * shuffle * shuffle
        if kind == "linear":
            self.vision_proj = nn.Sequential(nn.Linear(self.in_features, hidden_size))
        elif kind == "mlp":
            self.mlp = nn.Sequential(nn.LayerNorm(self.in_features), nn.Linear(self.in_features, hidden_size),
                                     nn.GELU(), nn.Linear(hidden_size, hidden_size))
        elif kind == "mlp2x_gelu":
            self.mlp = nn.Sequential(nn.Linear(self.in_features, hidden_size), nn.GELU(),
                                     nn.Linear(hidden_size, hidden_size))
        else:
            raise ValueError(f"unknown projector {kind!r}; one of {PROJECTORS}")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the projector's weights (what its input is cast to)."""
        return next(self.parameters()).dtype

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """image_features (N, P, in_features) -> (N, P, hidden)."""
        return (self.vision_proj if self.kind == "linear" else self.mlp)(image_features)
