"""Between log steps the training loop reads nothing back from the device, but once per optimizer step.

Counted on the CPU through the real entry point: every call of the Tensor methods that make a GPU wait
(`item`, `tolist`, `nonzero`, `__bool__`, `__int__`, `__float__`) made while a micro-batch runs (forward,
backward, DeepSpeed's step, the boundary agreement), attributed to the code that made it. Ours must make
none but the agreement's one read per optimizer step; what DeepSpeed makes itself is reported (-s).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.data.shard_fixtures import write_shards
from vlm.train import distributed, stepping, trainer
from vlm.train.cli import main

SYNCING = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__")
REPO = Path(__file__).resolve().parents[2]
TORCH = str(Path(torch.__file__).parent)


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(TORCH) or frame.f_code.co_name == "counted"):
        frame = frame.f_back
    name = frame.f_code.co_filename if frame is not None else "?"
    if "deepspeed" in name:
        return "deepspeed"
    if name.endswith("vlm/train/distributed.py") and frame.f_code.co_name == "any_rank_each":
        return "agreement"
    return "ours" if name.startswith(str(REPO)) else f"other: {name}"


@pytest.mark.parametrize("batching", ["dynamic", "pack"])
def test_no_host_device_sync_per_micro_batch_but_one_agreement_per_step(tmp_path, monkeypatch, capsys, batching):
    shards = write_shards(tmp_path / "shards", [24], images_of=lambda i: 1)
    counts, where = Counter(), []
    active = {"on": False}
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if active["on"]:
                source = _caller()
                counts[source] += 1
                if source == "ours":
                    where.append((_name, sys._getframe(1).f_code.co_filename, sys._getframe(1).f_lineno))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def watched(function):
        def run(*args, **kwargs):
            active["on"] = True
            try:
                return function(*args, **kwargs)
            finally:
                active["on"] = False
        return run

    for name in ("run_micro_batch", "step_engine", "agree_at_boundary"):
        monkeypatch.setattr(trainer, name, watched(getattr(stepping, name)))
    saved = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "VLM_LAUNCHER"):
        os.environ.pop(key, None)
    try:
        code = main(["--config", "launch/configs/debug.yaml", "--train_shards", str(shards), "--out_dir",
                     str(tmp_path / "o"), "--max_steps", "4", "--accumulation_steps", "2", "--batch_size", "2",
                     "--log_interval", "1000", "--save_interval", "1000", "--data.num_workers", "0",
                     "--data.batching", batching])
    finally:
        distributed.destroy_distributed()
        os.environ.clear()
        os.environ.update(saved)
    assert code == 0
    assert counts["ours"] == 0, where
    assert counts["agreement"] == 4  # one read per optimizer step: NaN/Inf, stop signal, save cadence
    with capsys.disabled():
        print(f"\n{batching}: syncing Tensor calls in 4 optimizer steps (8 micro-batches): {dict(counts)}")
