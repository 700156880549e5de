"""Export the model being trained (ZeRO-3 partitions gathered) as a self-contained folder, on rank 0."""

from __future__ import annotations

from pathlib import Path

import torch

from vlm.model.pretrained import save_vlm_folder


def export_live(engine, built, folder: str | Path, is_main: bool) -> Path:
    """Collective under ZeRO-3 (every rank calls it); rank 0 writes `folder` (see vlm.model.pretrained)."""
    import deepspeed

    model = engine.module
    params = list(model.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    if partitioned:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if is_main:
                _save(model, built, folder)
    elif is_main:
        _save(model, built, folder)
    import deepspeed.comm as dist

    dist.barrier()
    return Path(folder)


def _save(model, built, folder) -> None:
    with torch.no_grad():
        save_vlm_folder(model, folder, built.tokenizer, built.vision_folder, dtype=torch.float32)
