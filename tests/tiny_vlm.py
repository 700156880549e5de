"""A tiny random VLM written as an exported folder and as a MiniMind-V .pth (shared by the eval and chat tests).

Built through `vlm.build` from a config, like the trainer builds models: the built-in tokenizer, the 32 px
tiny vision tower of the `tiny_vision_dir` fixture (16 image tokens) and a one-layer, 64-wide language model.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from vlm.build import build
from vlm.config import Config, DataConfig, ModelConfig
from vlm.model.pretrained import save_vlm_folder
from vlm.model.weights import save_minimind_weights

DIM, LAYERS = 64, 1


def save_tiny_vlm(vision_dir: Path, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """(exported folder, .pth file) of one randomly initialised tiny model."""
    torch.manual_seed(seed)
    cfg = Config(model=ModelConfig(hidden_size=DIM, num_hidden_layers=LAYERS, vision_model=str(vision_dir)),
                 data=DataConfig(train_shards=["unused"]))
    built = build(cfg)
    export = save_vlm_folder(built.model, folder / "export", built.tokenizer, built.vision_folder)
    pth = save_minimind_weights(built.model, folder / "tiny.pth")
    return Path(export), Path(pth)


def picture(colour: tuple[int, int, int], size: int = 40) -> bytes:
    """A PNG: a coloured square on white."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    image.paste(colour, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def count_runs(ids: torch.Tensor, token_id: int) -> int:
    """Number of maximal runs of `token_id` in a 1-D id tensor."""
    hits = (ids == token_id).int()
    return int(((hits[1:] - hits[:-1]) == 1).sum() + hits[0])
