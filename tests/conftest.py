"""Shared fixtures: tiny models and folders built in temporary directories (no downloads)."""

from __future__ import annotations

import pytest
import torch

from vlm.model.vision_encoder import write_tiny_vision_encoder


@pytest.fixture(scope="session")
def tiny_vision_dir(tmp_path_factory):
    """A tiny random CLIP vision tower (32 px, patch 8 = 16 image tokens, width 32) saved like a HF folder."""
    folder = tmp_path_factory.mktemp("tiny_vision")
    return write_tiny_vision_encoder(
        folder, seed=0, image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2,
    )


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
