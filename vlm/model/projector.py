"""The projector: one Linear from the vision encoder's width to the language model's (MiniMind-V's layout)."""

from __future__ import annotations

import torch
from torch import nn


class VisionProjector(nn.Module):
    """(N, P, vision_hidden) -> (N, P, hidden). Keys `vision_proj.0.{weight,bias}` as in MiniMind-V."""

    def __init__(self, vision_hidden_size: int, hidden_size: int):
        super().__init__()
        self.vision_proj = nn.Sequential(nn.Linear(vision_hidden_size, hidden_size))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """image_features (N, P, vision_hidden) -> (N, P, hidden)."""
        return self.vision_proj(image_features)
