"""The epoch plan at internet scale: set-up, memory and ids per micro-batch for simulated corpora (counts only).

    python tests/bench/plan_bench.py [--sizes 1e6 1e8 1e9] [--shards 1e3 1e4 1e5 1e6] [--batches 200] [--weight 1]

For each corpus of N samples in S shards (uneven sizes, so most shards end in a short chunk; no data, only
counts) it plays one DataLoader worker of a 64-rank x 8-worker run (micro-batch 256, accumulation 1, chunk
64): builds the worker's plan (`vlm.data.order.EpochOrder` and the position), then the ids of its first
`--batches` micro-batches, once plainly for the times and once under tracemalloc for the memory. Columns:
set-up seconds; peak MB of that worker (the shard counts, the plan and the batches' ids: Python allocations
seen by tracemalloc, numpy's included); microseconds per micro-batch of 256 ids (the median: the machine may
be shared), plainly and after two resizes stacked three segments; the bytes of the position JSON after them.
The issue's targets, at N = 1e9 in 1e6 shards: set-up < 5 s, < 64 MB, < 1000 us, position < 10 KB.
`--weight 0.5` gives the corpus that mixing weight (N counts the shards' samples, the epoch half of them):
a fractional shard's chosen samples are computed the first time the worker reads it, O(shard size).
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import numpy as np

from vlm.data import plan
from vlm.data.order import EpochOrder

RANKS, WORKERS, BATCH, CHUNK, SEED = 64, 8, 256, 64, 42
RANK, WORKER = 17, 3  # the worker played; any other gives the same costs


def shard_sizes(total: int, shards: int) -> np.ndarray:
    """(shards,) int64 sizes adding up to `total`, +-12% around the mean in a fixed pattern."""
    mean = total // shards
    sizes = mean + (np.arange(shards, dtype=np.int64) * 7919 % 101 - 50) * mean // 400
    sizes[-1] += total - int(sizes.sum())
    return sizes


def resized(position: dict) -> dict:
    """`position` after 3 micro-batches, resized to 48 ranks, 5 more, resized to 64 ranks again."""
    position = plan.with_consumed(position, 3)
    position = plan.resume(position, plan.Geometry(48, WORKERS, BATCH), SEED, position["num_samples"])
    position = plan.with_consumed(position, 8)
    return plan.resume(position, plan.Geometry(RANKS, WORKERS, BATCH), SEED, position["num_samples"])


def worker_batches(total: int, shards: int, batches: int, after_resize: bool, weight: float = 1.0
                   ) -> tuple[float, list[float], dict]:
    """(set-up s, [s per micro-batch], position): one worker's plan and its first `batches` micro-batches."""
    start = time.perf_counter()
    counts = shard_sizes(total, shards)
    order = EpochOrder([counts], [weight], CHUNK, SEED, epoch=3)
    position = plan.new_position(SEED, 3, len(order), plan.Geometry(RANKS, WORKERS, BATCH))
    if after_resize:
        position = resized(position)
    setup = time.perf_counter() - start
    times = []
    schedule = plan.slot_schedule(position, RANK, plan.loader_slot(position, WORKER))
    for _, (_, lo, hi) in zip(range(batches), schedule):
        tick = time.perf_counter()
        ids = order.ids(plan.epoch_positions(position, np.arange(lo, hi)))
        times.append(time.perf_counter() - tick)
        assert len(ids) == BATCH
    return setup, times, position


def peak_mb(total: int, shards: int, batches: int, weight: float) -> float:
    """Peak traced MB of one worker's plan and `batches` micro-batches."""
    tracemalloc.start()
    try:
        worker_batches(total, shards, batches, False, weight)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def main(argv: list[str] | None = None) -> int:
    """Print the table; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e8, 1e9])
    parser.add_argument("--shards", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--weight", type=float, default=1.0, help="the corpus's mixing weight")
    args = parser.parse_args(argv)
    worker_batches(10**6, 10**3, 10, after_resize=True)  # warm up numpy's code paths once
    print(f"{RANKS} ranks x {WORKERS} workers, micro-batch {BATCH}, chunk {CHUNK}; one worker (rank {RANK}, "
          f"worker {WORKER}), its first {args.batches} micro-batches, mixing weight {args.weight}")
    print(f"{'N':>8} {'shards':>8} {'set-up s':>9} {'peak MB':>8} {'us/batch':>9} {'us resized':>11} "
          f"{'position B':>11}")
    for total in (int(n) for n in args.sizes):
        for shards in (int(s) for s in args.shards if s <= total):
            setup, times, _ = worker_batches(total, shards, args.batches, False, args.weight)
            _, times_resized, position = worker_batches(total, shards, args.batches, True, args.weight)
            mb = peak_mb(total, shards, args.batches, args.weight)
            size = len(json.dumps(position))
            print(f"{total:8.0e} {shards:8.0e} {setup:9.2f} {mb:8.1f} {np.median(times) * 1e6:9.0f} "
                  f"{np.median(times_resized) * 1e6:11.0f} {size:11d}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
