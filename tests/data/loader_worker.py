"""One rank of the distributed loader test: iterate this rank's TrainLoader, all-reduce every micro-batch, log keys.

    PYTHONPATH=. DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/data/loader_worker.py \
        --shards DIR --out OUT [--workers 2] [--batch-size 2] [--epochs 2] [--save-at N]

Writes OUT/rank{r}.jsonl, one line per micro-batch: {"epoch", "micro_step", "keys", "global_samples"}.
The all-reduce is the collective a trainer runs every micro-batch: a rank that ran out of data would hang
it. With --save-at N, rank 0 also writes OUT/state.json: the loader position after N micro-batches of the
last epoch, which a test can resume from with another world size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.data.shard_fixtures import make_loader
from vlm.tokenizer import load_tokenizer
from vlm.train.distributed import init_distributed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--save-at", type=int)
    p.add_argument("--local_rank", type=int, default=0)  # passed by older deepspeed launchers
    args = p.parse_args(argv)
    env = init_distributed(timeout_minutes=2)
    loader = make_loader([args.shards], load_tokenizer(), batch_size=args.batch_size, world_size=env.world_size,
                         rank=env.rank, num_workers=args.workers, seed=7, chunk_size=4)
    out = Path(args.out)
    records = []
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            total = torch.tensor([batch["num_samples"]])
            dist.all_reduce(total)
            records.append({"epoch": batch["epoch"], "micro_step": batch["micro_step"], "keys": batch["keys"],
                            "global_samples": int(total)})
            if env.rank == 0 and epoch == args.epochs - 1 and args.save_at == batch["micro_step"] + 1:
                (out / "state.json").write_text(json.dumps(loader.state_dict(args.save_at)))
    (out / f"rank{env.rank}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
