"""Export the model being trained (ZeRO-3 partitions gathered) as a self-contained folder, on rank 0."""

from __future__ import annotations

from pathlib import Path

import torch

from vlm.build import Built
from vlm.model.pretrained import save_vlm_folder
from vlm.train import distributed


def export_live(engine, built: Built, folder: str | Path, is_main: bool) -> Path:
    """Collective under ZeRO-3 (every rank calls it); rank 0 writes `folder` (see vlm.model.pretrained)."""
    model = engine.module
    with distributed.gathered_parameters(model):
        if is_main:
            with torch.no_grad():
                save_vlm_folder(model, folder, built.tokenizer, built.vision_folder, dtype=torch.float32)
    distributed.barrier()
    return Path(folder)
