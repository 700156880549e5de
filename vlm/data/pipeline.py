"""The training and eval loaders: named stages from shard bytes to batches, balanced across ranks and resumable.

    from vlm.data.pipeline import LoaderSettings, SampleFormat, TrainLoader   # SampleFormat: vlm.data.stages
    fmt = SampleFormat(tokenizer, image_config, image_token_id=3, image_token_len=196, max_seq_len=640)
    loader = TrainLoader(["data/shards/pretrain"], fmt, LoaderSettings(batch_size=16, accumulation=4,
                                                                        world_size=W, rank=r, num_workers=8, seed=42))
    loader.load_state_dict(saved) if saved else loader.set_epoch(0)
    for batch in loader:                          # micro-batches of the current epoch, from the current position
        ...train on batch (batch["num_samples"] may be 0)...
        state = loader.state_dict(batch["micro_step"] + 1)   # after that micro-batch was consumed

`SampleFormat` says how a sample becomes tensors, `LoaderSettings` (`LoaderSettings.from_config(cfg, ...)`
from a `vlm.config.Config`) how the epoch is dealt and read. The trainer's API: `TrainLoader` with
`micro_batches_per_epoch`, `dropped_per_epoch`, `num_samples`, `set_epoch(e)`, iteration, `len(loader)`
(micro-batches still to come in this epoch), `state_dict(micro_batches_consumed)` (counted from the start of
the epoch: the `micro_step` of the last consumed batch + 1; prefetched batches do not count) and
`load_state_dict(state)`. `EvalLoader` reads held-out shards once, in order, each rank a disjoint share.

Stages (`loader.stages`, see `vlm.data.stages`; each a picklable callable on a sample dict that may raise
`BadSample`): read (seek into the tar; exact mode only) -> decode (allow-list, `vlm.data.reader`) -> text (chat template,
labels; before images, so a sample rejected for length costs no image decoding) -> images (the
tower's resize under a pixel limit, kept uint8) -> collate (`dynamic`: pad to the longest, multiple
of 8; `pack`: the micro-batch's samples first-fit into rows of max_seq_len; `max_len`: pad to max_seq_len).
`pixel_values` leave the loader as uint8 (a quarter of float32's bytes through the workers' shared memory);
the trainer normalises them on its device with `vlm.data.image.PixelNormalizer`.

Every batch dict (see `vlm.data.collate` for the tensors) also carries `num_samples`, `keys` (for the audit
log), `skipped` ([key, reason] of the bad samples), `epoch`, `micro_step` and `stats`
({"seen", "bad", "bad_by_reason"} for that batch). A bad sample is dropped from its batch, so the number of
micro-batches never changes; the loader aborts with `DataQualityError` once bad/seen exceeds
`data.max_bad_fraction` (after `min_seen` samples). Bad samples are logged by each worker at a rate limit.

Modes. Exact (all sources have a manifest): see `vlm.data.plan` - the same micro-batch count on every rank,
every sample of the epoch once across ranks and workers (a tail under one global batch dropped), order a
function of (seed, epoch). Samples are dealt global-batch-major: optimizer step g trains on the g-th G
samples of the epoch order (G = world size x batch size x accumulation), whatever the split of G into
ranks and accumulation steps, and the worker count changes nothing in the batches. Resume is identical with
the same (world size, batch size, accumulation), any worker count, and without loss or repeat with another.
Resampled (any source without a manifest): each (rank, worker) draws shards at random (seeded by seed,
epoch, rank, worker, resume point) and reads them in tar order; an epoch is `samples_per_epoch` samples;
the position only counts micro-batches, so exactly-once does NOT hold there.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm.data import plan
from vlm.data.collate import Collator
from vlm.data.order import EpochOrder
from vlm.data.reader import ShardReader, resampled_stream
from vlm.data.remote import RemoteSettings
from vlm.data.sources import SourceError, SourceSet, resolve_sources
from vlm.data.stages import SampleFormat
from vlm.formats.errors import BadSample

log = logging.getLogger(__name__)


class DataQualityError(RuntimeError):
    """Too many bad samples: the data (or a setting such as max_seq_len) needs fixing."""


@dataclass(frozen=True)
class LoaderSettings:
    """How an epoch is dealt and read: micro-batch size, accumulation, this rank's place, DataLoader workers,
    the data order's seed and chunking, the bad-sample budget and, for sources without a manifest, the
    declared epoch length. `weights` mix the training sources (None: each sample once)."""

    batch_size: int
    accumulation: int = 1
    world_size: int = 1
    rank: int = 0
    num_workers: int = 0
    seed: int = 0
    chunk_size: int = 64
    max_bad_fraction: float = 0.01
    samples_per_epoch: int | None = None
    weights: tuple[float, ...] | None = None
    pin_memory: bool = False
    prefetch_factor: int = 2
    min_seen: int = 100
    remote: RemoteSettings | None = None  # timeout and retries for shard folders at URLs (None: defaults)

    @classmethod
    def from_config(cls, cfg: Any, world_size: int, rank: int, pin_memory: bool = False) -> LoaderSettings:
        """The settings of a `vlm.config.Config` (data.* and train.batch_size/accumulation_steps/seed)."""
        d, t = cfg.data, cfg.train
        return cls(t.batch_size, t.accumulation_steps, world_size, rank, d.num_workers, t.seed, d.chunk_size,
                   d.max_bad_fraction, d.samples_per_epoch,
                   tuple(d.train_weights) if d.train_weights is not None else None, pin_memory,
                   remote=RemoteSettings.from_config(d))

    @property
    def geometry(self) -> plan.Geometry:
        """The dealing geometry (`vlm.data.plan.Geometry`): the one batch arithmetic."""
        return plan.Geometry(self.world_size, self.num_workers, self.batch_size, self.accumulation)


class BadSampleLog:
    """Per-process, rate-limited log of skipped samples: the first `first`, then every `every`-th."""

    def __init__(self, first: int = 5, every: int = 100):
        self.first, self.every, self.count = first, every, 0

    def __call__(self, key: str, err: BadSample) -> None:
        self.count += 1
        if self.count <= self.first or self.count % self.every == 0:
            log.warning("skipped bad sample %s: %s (%d skipped by this worker so far)", key, err, self.count)


@dataclass
class BadSampleMonitor:
    """Adds up the `stats` of every batch and raises DataQualityError past `max_bad_fraction`."""

    max_bad_fraction: float
    min_seen: int = 100

    def __post_init__(self):
        self.seen, self.bad, self.by_reason = 0, 0, Counter()

    def update(self, stats: dict) -> None:
        """Add one batch's stats; raises DataQualityError once the bad share passes the limit."""
        self.seen += stats["seen"]
        self.bad += stats["bad"]
        self.by_reason.update(stats["bad_by_reason"])
        if self.seen >= self.min_seen and self.bad > self.max_bad_fraction * self.seen:
            reasons = ", ".join(f"{r}: {n}" for r, n in self.by_reason.most_common())
            raise DataQualityError(
                f"{self.bad} of {self.seen} samples were bad ({reasons}), more than data.max_bad_fraction="
                f"{self.max_bad_fraction}. Check the shards with `python -m data_tools.verify DIR`, fix the "
                "setting named by the reasons (e.g. data.max_seq_len for image_truncated), or raise "
                "data.max_bad_fraction")


@dataclass(frozen=True)
class ExactSchedule:
    """Batches of sample ids for one rank of an exact (manifest) epoch: `vlm.data.order` and `.plan` applied.

    Each micro-batch is B consecutive positions of the epoch order, and a rank's A micro-batches of one
    optimizer step are adjacent, so a worker reads a few chunks of a few shards at a time.
    """

    shard_counts: list[list[int]]
    weights: list[float]
    chunk_size: int
    position: dict
    rank: int

    def batches(self, worker: int) -> Iterator[tuple[int, list[dict]]]:
        """(micro_step, samples) for DataLoader worker `worker`, in the order it must yield them.

        The order is computed, not stored (`vlm.data.order`): set-up O(shards), then O(B log shards) per
        micro-batch, whatever the epoch's length.
        """
        order = EpochOrder(self.shard_counts, self.weights, self.chunk_size, self.position["seed"],
                           self.position["epoch"])
        slot = plan.loader_slot(self.position, worker)
        for step, start, stop in plan.slot_schedule(self.position, self.rank, slot):
            ids = order.ids(plan.epoch_positions(self.position, np.arange(start, stop)))
            yield step, [{"__id__": i} for i in ids.tolist()]


@dataclass(frozen=True)
class ResampledSchedule:
    """Batches for one rank in resampled mode: B samples at a time from randomly drawn shards."""

    urls: list[str]
    probs: np.ndarray
    position: dict
    rank: int

    def batches(self, worker: int) -> Iterator[tuple[int, Iterator]]:
        """(micro_step, sample stream) for DataLoader worker `worker`: B samples per micro-batch, drawn afresh."""
        _, geometry, consumed = plan.current_plan(self.position)
        slot = plan.loader_slot(self.position, worker)
        skip = plan.worker_batches(consumed, geometry.slots, slot)
        p = self.position
        rng = np.random.default_rng([p["seed"], p["epoch"], len(p["segments"]), self.rank, slot, skip])
        stream = resampled_stream(self.urls, self.probs, rng)
        for step, start, stop in plan.slot_schedule(self.position, self.rank, slot):
            yield step, islice(stream, stop - start)


@dataclass(frozen=True)
class EvalSchedule:
    """Eval: rank r reads [r*N//W, (r+1)*N//W) in order; every rank yields the same number of batches."""

    num_samples: int
    world_size: int
    rank: int
    batch_size: int
    slots: int

    def micro_batches(self) -> int:
        """Batches every rank yields: ceil(largest rank share / batch size)."""
        largest_share = -(-self.num_samples // self.world_size)  # ceil
        return -(-largest_share // self.batch_size)

    def batches(self, worker: int) -> Iterator[tuple[int, list[dict]]]:
        """(micro_step, samples) of this rank's share for DataLoader worker `worker`, in order."""
        lo = self.rank * self.num_samples // self.world_size
        hi = (self.rank + 1) * self.num_samples // self.world_size
        for step in range(worker, self.micro_batches(), self.slots):
            begin = min(lo + step * self.batch_size, hi)
            yield step, [{"__id__": i} for i in range(begin, min(begin + self.batch_size, hi))]


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Build a batch in the main process (num_workers=0) with one torch thread.

    The per-image tensor ops are small (3 x 224 x 224); split over intra-op threads they wait on each other,
    which on a busy CPU was measured at ~2 ms instead of 0.05 ms per op. The previous count is restored.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BatchStream(IterableDataset):
    """The IterableDataset a DataLoader runs: this rank's micro-batches, worker k making batches i % K == k."""

    def __init__(self, schedule: Any, stages: list[tuple[str, Any]], collate: Collator, epoch: int,
                 image_shape: tuple[int, int, int]):
        self.schedule, self.stages, self.collate = schedule, stages, collate
        self.epoch, self.image_shape = epoch, image_shape

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        bad_log = BadSampleLog()
        for step, items in self.schedule.batches(worker):
            if info is not None:  # DataLoader workers already run torch single-threaded
                yield self.make_batch(step, items, bad_log)
                continue
            with _single_threaded():
                batch = self.make_batch(step, items, bad_log)
            yield batch

    def run_stages(self, sample: dict) -> dict:
        """Apply every stage in order; a stage may raise BadSample."""
        for _, stage in self.stages:
            sample = stage(sample)
        return sample

    def make_batch(self, step: int, items: Any, bad_log: BadSampleLog) -> dict:
        """Run the stages on each item (a sample dict, or a BadSample from the stream), skip the bad, collate."""
        samples, skipped = [], []
        seen = 0
        for item in items:
            seen += 1
            try:
                if isinstance(item, BadSample):
                    raise item
                sample = self.run_stages(item)
                samples.append({k: sample[k] for k in ("__key__", "input_ids", "labels", "pixel_values")})
            except BadSample as err:
                # Stages fill in "__key__" first (read does), so a sample that fails later is named.
                key = item.get("__key__", "?") if isinstance(item, dict) else "?"
                bad_log(key, err)
                skipped.append([key, err.reason])
        batch = self.collate(samples) if samples else self.empty_batch()
        batch.update(num_samples=len(samples), skipped=skipped, epoch=self.epoch, micro_step=step,
                     stats={"seen": seen, "bad": len(skipped), "bad_by_reason": dict(Counter(r for _, r in skipped))})
        return batch

    def empty_batch(self) -> dict:
        """A batch of zero rows (every sample of the micro-batch was bad), with the usual keys and dtypes."""
        rows = torch.zeros((0, 0), dtype=torch.long)
        return {"input_ids": rows, "labels": rows.clone(), "attention_mask": rows.clone(),
                "position_ids": rows.clone(),
                "pixel_values": torch.zeros((0, 0, *self.image_shape), dtype=torch.uint8),
                "image_mask": torch.zeros((0, 0), dtype=torch.bool), "image_index": torch.zeros(0, dtype=torch.long),
                "loss_index": torch.zeros(0, dtype=torch.long), "loss_targets": torch.zeros(0, dtype=torch.long),
                "num_images": 0, "packed": False, "num_tokens": 0, "num_label_tokens": 0, "keys": []}


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers outlive SIGTERM/SIGUSR1. SLURM signals every process of a job (preemption, scancel,
    time limit); torch's workers would die of it and abort the main process before it could checkpoint.
    The main process shuts its workers down itself once it has saved."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


# Workers fork on Linux (its default), whatever start method a library set for the process since (DeepSpeed's
# background checkpoint writer sets "spawn", which would re-import everything in every worker each epoch);
# elsewhere the platform's default.
WORKER_START = "fork" if sys.platform == "linux" else None


class _Loader:
    """What both loaders share: a DataLoader over a BatchStream, and the bad-sample monitor."""

    settings: LoaderSettings
    monitor: BadSampleMonitor

    def _iterate(self, dataset: BatchStream) -> Iterator[dict]:
        # batch_size=None: the dataset yields whole micro-batches; DataLoader only runs and orders the workers.
        workers = self.settings.num_workers
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=self.settings.pin_memory,
                            persistent_workers=False, multiprocessing_context=WORKER_START if workers else None,
                            prefetch_factor=self.settings.prefetch_factor if workers else None,
                            worker_init_fn=ignore_stop_signals)
        for batch in loader:
            self.monitor.update(batch["stats"])
            yield batch


class TrainLoader(_Loader):
    """This rank's training micro-batches, epoch by epoch, with a checkpointable position (see module doc).

    Raises SourceError for sources that cannot be used (or give no micro-batch), ValueError for a rank
    outside the world or an unusable `fmt`.
    """

    def __init__(self, sources: Sequence[str] | SourceSet, fmt: SampleFormat, settings: LoaderSettings):
        self.settings = settings
        self.sources = (sources if isinstance(sources, SourceSet)
                        else resolve_sources(sources, settings.weights, remote=settings.remote))
        self.geometry = settings.geometry
        if not 0 <= settings.rank < settings.world_size:
            raise ValueError(f"rank {settings.rank} is outside world size {settings.world_size}")
        self.rank, self.seed, self.chunk_size = settings.rank, settings.seed, settings.chunk_size
        if self.sources.exact:
            if settings.samples_per_epoch is not None:
                raise SourceError("data.samples_per_epoch is only for sources without a manifest (resampled mode); "
                                  "these shard folders have manifests, which fix the epoch length: remove it")
            self.num_samples = plan.epoch_size(self.sources.shard_counts, self.sources.weights)
            reader = ShardReader(self.sources.shards, remote=settings.remote)
        else:
            if not settings.samples_per_epoch or settings.samples_per_epoch < 1:
                specs = [s.spec for s in self.sources.sources if not s.exact]
                raise SourceError(f"{specs} have no manifest, so the epoch length is unknown: set "
                                  "data.samples_per_epoch (resampled mode), or shard them with data_tools.shard")
            self.num_samples, reader = int(settings.samples_per_epoch), None
        self.mode = "exact" if self.sources.exact else "resampled"
        self.stages = fmt.stages(reader)
        self.collate = fmt.collator()
        self.image_shape = fmt.image_config.output_shape
        self.monitor = BadSampleMonitor(settings.max_bad_fraction, settings.min_seen)
        if self.micro_batches_per_epoch == 0:
            raise SourceError(
                f"{self.num_samples} samples per epoch give no micro-batch: one optimizer step needs world_size x "
                f"train.batch_size x train.accumulation_steps = {self.geometry.global_batch} samples; lower them")
        self.set_epoch(0)

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches every rank runs in a whole epoch with this geometry (a multiple of accumulation)."""
        return plan.micro_batches(self.num_samples, self.geometry)

    @property
    def dropped_per_epoch(self) -> int:
        """Samples of each epoch left out: the tail under one global batch."""
        g = self.geometry
        return self.num_samples - g.world_size * g.batch_size * self.micro_batches_per_epoch

    @property
    def dropped_this_epoch(self) -> int:
        """Samples of the current epoch no micro-batch will use (differs from dropped_per_epoch after a resize)."""
        return plan.dropped_samples(self.position)

    @property
    def epoch(self) -> int:
        """The epoch the position is in."""
        return self.position["epoch"]

    @property
    def segment_start(self) -> int:
        """micro_step where the current plan began: 0, or where a resize re-planned the epoch. Optimizer steps
        end where (micro_step + 1 - segment_start) is a multiple of the accumulation steps."""
        return plan.consumed_before(self.position)

    @property
    def start_step(self) -> int:
        """The micro_step the next iteration starts at (micro-batches of this epoch already consumed)."""
        return plan.consumed_before(self.position) + self.position["segments"][-1]["micro_batches_consumed"]

    def __len__(self) -> int:
        """Micro-batches an iteration from the current position yields."""
        return plan.epoch_micro_batches(self.position) - self.start_step

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (its order depends only on seed and epoch)."""
        self.position = {**plan.new_position(self.seed, epoch, self.num_samples, self.geometry),
                         "mode": self.mode, "sources": self.sources.digest(), "chunk_size": self.chunk_size}

    def state_dict(self, micro_batches_consumed: int) -> dict:
        """JSON-able position after `micro_batches_consumed` micro-batches of the current epoch."""
        return plan.with_consumed(self.position, micro_batches_consumed)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; another world size / batch size / accumulation re-plans the rest."""
        expected = {"mode": self.mode, "sources": self.sources.digest(), "chunk_size": self.chunk_size}
        different = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if different:
            raise plan.PositionError(
                f"the saved data position does not fit this run ({different}: saved vs now); resume with the same "
                "data.train_shards, data.train_weights and data.chunk_size, or start the epoch again")
        self.position = plan.resume(state, self.geometry, self.seed, self.num_samples, exact=self.sources.exact)

    def dataset(self) -> BatchStream:
        """The IterableDataset for the current position (picklable; what the DataLoader workers run)."""
        if self.sources.exact:
            schedule = ExactSchedule(self.sources.shard_counts, self.sources.weights, self.chunk_size,
                                     self.position, self.rank)
        else:
            urls, probs = self.sources.stream_urls()
            schedule = ResampledSchedule(urls, probs, self.position, self.rank)
        return BatchStream(schedule, self.stages, self.collate, self.epoch, self.image_shape)

    def __iter__(self) -> Iterator[dict]:
        return self._iterate(self.dataset())


class EvalLoader(_Loader):
    """Held-out shards read once, in order, each rank a disjoint contiguous share, the last partial batch kept.

    Every rank yields `len(loader)` batches (some may be partial or empty), so per-batch collectives are safe.
    Uses the batch size, rank, workers and bad-sample budget of `settings`. Raises SourceError for sources
    without a manifest, ValueError for an invalid rank or batch size.
    """

    def __init__(self, sources: Sequence[str], fmt: SampleFormat, settings: LoaderSettings):
        self.settings = settings
        self.sources = resolve_sources(sources, label="data.eval_shards", remote=settings.remote)
        if not self.sources.exact:
            raise SourceError("data.eval_shards must be shard folders with manifest.json (made by data_tools.shard)")
        if not 0 <= settings.rank < settings.world_size or settings.batch_size < 1:
            raise ValueError(f"invalid eval geometry: rank {settings.rank}, world size {settings.world_size}, "
                             f"batch size {settings.batch_size}")
        reader = ShardReader(self.sources.shards, remote=settings.remote)
        self.num_samples = len(reader)
        self.stages = fmt.stages(reader)
        self.collate = fmt.collator()
        self.image_shape = fmt.image_config.output_shape
        self.schedule = EvalSchedule(self.num_samples, settings.world_size, settings.rank, settings.batch_size,
                                     max(1, settings.num_workers))
        self.monitor = BadSampleMonitor(settings.max_bad_fraction, settings.min_seen)

    def __len__(self) -> int:
        """Batches every rank yields."""
        return self.schedule.micro_batches()

    def __iter__(self) -> Iterator[dict]:
        return self._iterate(BatchStream(self.schedule, self.stages, self.collate, 0, self.image_shape))
