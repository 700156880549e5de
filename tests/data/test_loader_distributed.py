"""The loader across real processes: `deepspeed --num_gpus 2` on CPU, 2 ranks x 2 DataLoader workers each."""

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.data.shard_fixtures import (
    all_keys,
    make_loader,
    write_shards,
)
from vlm.data.pipeline import TrainLoader
from vlm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
UNEVEN = [9, 2, 14]  # 25 samples; 2 ranks x batch 2 -> 6 micro-batches per rank, 1 sample dropped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_loader(shards: Path, batch_size: int, accumulation: int) -> TrainLoader:
    """The loader of a one-process run over the same shards with the worker script's seed and chunk size."""
    return make_loader([shards], load_tokenizer(), batch_size=batch_size, accumulation=accumulation, world_size=1,
                       rank=0, num_workers=0, seed=7, chunk_size=4)


@pytest.mark.slow
def test_two_ranks_two_workers_through_the_deepspeed_launcher(tmp_path):
    shards = write_shards(tmp_path / "shards", UNEVEN)
    out = tmp_path / "out"
    out.mkdir()
    deepspeed = Path(sys.executable).with_name("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), "tests/data/loader_worker.py",
           "--shards", str(shards), "--out", str(out), "--workers", "2", "--epochs", "2", "--save-at", "2"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    ranks = [[json.loads(line) for line in (out / f"rank{r}.jsonl").read_text().splitlines()] for r in range(2)]
    # The same global batches (G = 4) from one process with accumulation 2: what a shrink to 1 rank trains on.
    accumulating = single_loader(shards, batch_size=2, accumulation=2)
    epochs = []
    for epoch in range(2):
        steps = [[rec for rec in records if rec["epoch"] == epoch] for records in ranks]
        assert [len(s) for s in steps] == [6, 6]  # the same number of micro-batches on both ranks
        assert all(rec["global_samples"] == 4 for s in steps for rec in s)
        assert [rec["micro_step"] for rec in steps[0]] == list(range(6))
        keys = [k for s in steps for rec in s for k in rec["keys"]]
        assert len(keys) == len(set(keys)) == 24 and set(keys) <= all_keys("c", 25)  # exactly once
        epochs.append(keys)
        accumulating.set_epoch(epoch)
        alone = [batch["keys"] for batch in accumulating]
        assert [steps[0][j]["keys"] + steps[1][j]["keys"] for j in range(6)] == [
            alone[2 * j] + alone[2 * j + 1] for j in range(6)]
    assert epochs[0] != epochs[1]

    # Resume the last epoch's saved position on one process, no workers: nothing lost or repeated.
    state = json.loads((out / "state.json").read_text())
    single = single_loader(shards, batch_size=3, accumulation=1)
    single.load_state_dict(state)
    before = [k for records in ranks for rec in records if rec["epoch"] == 1 and rec["micro_step"] < 2
              for k in rec["keys"]]
    after = [k for batch in single for k in batch["keys"]]
    counts = Counter(before + after)
    assert max(counts.values()) == 1 and 25 - len(counts) == single.dropped_this_epoch < 3
