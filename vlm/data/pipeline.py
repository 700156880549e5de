"""The training and eval loaders: named stages from shard bytes to batches, balanced across ranks and resumable.

    from vlm.data.pipeline import TrainLoader
    loader = TrainLoader(["data/shards/pretrain"], tokenizer, image_config, image_token_id=3, image_token_len=196,
                         max_seq_len=640, batch_size=16, accumulation=4, world_size=W, rank=r, num_workers=8, seed=42)
    loader.load_state_dict(saved) if saved else loader.set_epoch(0)
    for batch in loader:                          # micro-batches of the current epoch, from the current position
        ...train on batch (batch["num_samples"] may be 0)...
        state = loader.state_dict(batch["micro_step"] + 1)   # after that micro-batch was consumed

The trainer's API: `TrainLoader` (or `build_train_loader(cfg, ...)` from a `vlm.config.Config`) with
`micro_batches_per_epoch`, `dropped_per_epoch`, `num_samples`, `set_epoch(e)`, iteration, `len(loader)`
(micro-batches still to come in this epoch), `state_dict(micro_batches_consumed)` (counted from the start of
the epoch: the `micro_step` of the last consumed batch + 1; prefetched batches do not count) and
`load_state_dict(state)`. `EvalLoader` reads held-out shards once, in order, each rank a disjoint share.

Stages (`loader.stages`, each a picklable callable on a sample dict that may raise `BadSample`):
read (seek into the tar; exact mode only) -> decode (allow-list, `vlm.data.reader`) -> text (chat template,
labels; before images, so a sample rejected for length costs no image decoding) -> images (CLIP
resize and centre crop under a pixel limit, kept uint8) -> collate (`dynamic`: pad to the longest, multiple
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
from vlm.data.errors import BadSample
from vlm.data.image import DEFAULT_MAX_PIXELS, ImagePreprocessConfig, ImagePreprocessor
from vlm.data.reader import ShardReader, decode_members, resampled_stream
from vlm.data.sources import SourceError, SourceSet, resolve_sources
from vlm.data.text import ChatEncoder

log = logging.getLogger(__name__)
BATCHING = ("dynamic", "pack", "max_len")


class DataQualityError(RuntimeError):
    """Too many bad samples: the data (or a setting such as max_seq_len) needs fixing."""


@dataclass
class ReadSample:
    """Stage `read`: {"__id__"} -> adds "__key__" and "members" ({suffix: bytes}) by seeking into the shard."""

    reader: ShardReader

    def __call__(self, sample: dict) -> dict:
        sample["__key__"] = self.reader.key(sample["__id__"])
        _, sample["members"] = self.reader.read(sample["__id__"])
        return sample


def decode_sample(sample: dict) -> dict:
    """Stage `decode`: members -> "conversations" and "images" (bytes), by the allow-list of the reader."""
    return decode_members(sample["__key__"], sample.pop("members"))


@dataclass
class EncodeText:
    """Stage `text`: conversations -> "input_ids", "labels" (L,) with the chat template and loss mask."""

    encoder: ChatEncoder

    def __call__(self, sample: dict) -> dict:
        sample.update(self.encoder(sample["conversations"], num_images=len(sample["images"])))
        return sample


@dataclass
class PreprocessImages:
    """Stage `images`: encoded images -> "pixel_values" uint8 (n, 3, H, W), resized and cropped, not normalised
    (the trainer normalises on its device with `PixelNormalizer`); (0, 3, H, W) for text-only samples."""

    preprocessor: ImagePreprocessor

    def __call__(self, sample: dict) -> dict:
        images = sample.pop("images")
        if images:
            sample["pixel_values"] = torch.stack([self.preprocessor.pixels(data) for data in images])
        else:
            sample["pixel_values"] = torch.zeros((0, *self.preprocessor.config.output_shape), dtype=torch.uint8)
        return sample


def build_stages(tokenizer: Any, image_config: ImagePreprocessConfig, image_token_id: int, image_token_len: int,
                 max_seq_len: int, max_pixels: int, reader: ShardReader | None) -> list[tuple[str, Any]]:
    """The named per-sample stages; `read` only when samples are addressed by id (manifest sources)."""
    if image_config.output_shape is None:
        raise ValueError("image preprocessing must centre-crop (do_center_crop) so that images can be batched")
    stages: list[tuple[str, Any]] = [("read", ReadSample(reader))] if reader is not None else []
    return stages + [
        ("decode", decode_sample),
        ("text", EncodeText(ChatEncoder(tokenizer, image_token_id, image_token_len, max_seq_len))),
        ("images", PreprocessImages(ImagePreprocessor(image_config, max_pixels=max_pixels))),
    ]


def build_collator(tokenizer: Any, batching: str, max_seq_len: int) -> Collator:
    if batching not in BATCHING:
        raise ValueError(f"data.batching must be one of {BATCHING}, got {batching!r}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; give it a pad_token")
    # "max_len" pads every row to max_seq_len: the naive layout, kept for comparison.
    multiple_of = max_seq_len if batching == "max_len" else 8
    return Collator(pad_id=int(pad_id), max_len=max_seq_len, multiple_of=multiple_of, pack=batching == "pack")


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
    """Batches of sample ids for one rank of an exact (manifest) epoch: `vlm.data.plan` applied.

    Each micro-batch is B consecutive positions of the epoch order, and a rank's A micro-batches of one
    optimizer step are adjacent, so a worker reads a few chunks of a few shards at a time.
    """

    shard_counts: list[list[int]]
    weights: list[float]
    chunk_size: int
    position: dict
    rank: int

    def batches(self, worker: int) -> Iterator[tuple[int, list[dict]]]:
        """(micro_step, samples) for DataLoader worker `worker`, in the order it must yield them."""
        seed, epoch = self.position["seed"], self.position["epoch"]
        order = plan.epoch_order(plan.epoch_runs(self.shard_counts, self.weights, seed, epoch),
                                 self.chunk_size, seed, epoch)
        remaining = plan.remaining_positions(self.position)
        slot = plan.loader_slot(self.position, worker)
        for step, start, stop in plan.slot_schedule(self.position, self.rank, slot):
            yield step, [{"__id__": int(i)} for i in order[remaining[start:stop]]]


@dataclass(frozen=True)
class ResampledSchedule:
    """Batches for one rank in resampled mode: B samples at a time from randomly drawn shards."""

    urls: list[str]
    probs: np.ndarray
    position: dict
    rank: int

    def batches(self, worker: int) -> Iterator[tuple[int, Iterator]]:
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
        largest_share = -(-self.num_samples // self.world_size)  # ceil
        return -(-largest_share // self.batch_size)

    def batches(self, worker: int) -> Iterator[tuple[int, list[dict]]]:
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
                "image_mask": torch.zeros((0, 0), dtype=torch.bool), "num_tokens": torch.tensor(0),
                "num_label_tokens": torch.tensor(0), "keys": []}


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers outlive SIGTERM/SIGUSR1. SLURM signals every process of a job (preemption, scancel,
    time limit); torch's workers would die of it and abort the main process before it could checkpoint.
    The main process shuts its workers down itself once it has saved."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class _Loader:
    """What both loaders share: a DataLoader over a BatchStream, and the bad-sample monitor."""

    num_workers: int
    pin_memory: bool
    prefetch_factor: int
    monitor: BadSampleMonitor

    def _iterate(self, dataset: BatchStream) -> Iterator[dict]:
        # batch_size=None: the dataset yields whole micro-batches; DataLoader only runs and orders the workers.
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            persistent_workers=False, prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            worker_init_fn=ignore_stop_signals)
        for batch in loader:
            self.monitor.update(batch["stats"])
            yield batch


class TrainLoader(_Loader):
    """This rank's training micro-batches, epoch by epoch, with a checkpointable position (see module doc)."""

    def __init__(self, sources: Sequence[str] | SourceSet, tokenizer: Any, image_config: ImagePreprocessConfig,
                 image_token_id: int, image_token_len: int, max_seq_len: int, batch_size: int, accumulation: int = 1,
                 world_size: int = 1, rank: int = 0, num_workers: int = 0, seed: int = 0, chunk_size: int = 64,
                 batching: str = "dynamic", max_bad_fraction: float = 0.01, max_pixels: int = DEFAULT_MAX_PIXELS,
                 samples_per_epoch: int | None = None, weights: Sequence[float] | None = None,
                 pin_memory: bool = False, prefetch_factor: int = 2, min_seen: int = 100):
        self.sources = sources if isinstance(sources, SourceSet) else resolve_sources(sources, weights)
        self.geometry = plan.Geometry(world_size, num_workers, batch_size, accumulation)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.rank, self.seed, self.chunk_size = rank, seed, chunk_size
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        if self.sources.exact:
            if samples_per_epoch is not None:
                raise SourceError("data.samples_per_epoch is only for sources without a manifest (resampled mode); "
                                  "these shard folders have manifests, which fix the epoch length: remove it")
            self.num_samples = plan.epoch_size(self.sources.shard_counts, self.sources.weights)
            reader = ShardReader(self.sources.shards)
        else:
            if not samples_per_epoch or samples_per_epoch < 1:
                specs = [s.spec for s in self.sources.sources if not s.exact]
                raise SourceError(f"{specs} have no manifest, so the epoch length is unknown: set "
                                  "data.samples_per_epoch (resampled mode), or shard them with data_tools.shard")
            self.num_samples, reader = int(samples_per_epoch), None
        self.mode = "exact" if self.sources.exact else "resampled"
        self.stages = build_stages(tokenizer, image_config, image_token_id, image_token_len, max_seq_len,
                                   max_pixels, reader)
        self.collate = build_collator(tokenizer, batching, max_seq_len)
        self.image_shape = image_config.output_shape
        self.monitor = BadSampleMonitor(max_bad_fraction, min_seen)
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
    """

    def __init__(self, sources: Sequence[str], tokenizer: Any, image_config: ImagePreprocessConfig,
                 image_token_id: int, image_token_len: int, max_seq_len: int, batch_size: int, world_size: int = 1,
                 rank: int = 0, num_workers: int = 0, batching: str = "dynamic", max_bad_fraction: float = 0.01,
                 max_pixels: int = DEFAULT_MAX_PIXELS, pin_memory: bool = False, prefetch_factor: int = 2,
                 min_seen: int = 100):
        self.sources = resolve_sources(sources, label="data.eval_shards")
        if not self.sources.exact:
            raise SourceError("data.eval_shards must be shard folders with manifest.json (made by data_tools.shard)")
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"invalid eval geometry: rank {rank}, world size {world_size}, batch size {batch_size}")
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        reader = ShardReader(self.sources.shards)
        self.num_samples = len(reader)
        self.stages = build_stages(tokenizer, image_config, image_token_id, image_token_len, max_seq_len,
                                   max_pixels, reader)
        self.collate = build_collator(tokenizer, batching, max_seq_len)
        self.image_shape = image_config.output_shape
        self.schedule = EvalSchedule(self.num_samples, world_size, rank, batch_size, max(1, num_workers))
        self.monitor = BadSampleMonitor(max_bad_fraction, min_seen)

    def __len__(self) -> int:
        return self.schedule.micro_batches()

    def __iter__(self) -> Iterator[dict]:
        return self._iterate(BatchStream(self.schedule, self.stages, self.collate, 0, self.image_shape))


def build_train_loader(cfg: Any, tokenizer: Any, image_config: ImagePreprocessConfig, image_token_id: int,
                       image_token_len: int, world_size: int, rank: int, pin_memory: bool = False) -> TrainLoader:
    """A TrainLoader from a `vlm.config.Config` (data.* and train.batch_size/accumulation_steps/seed)."""
    d, t = cfg.data, cfg.train
    return TrainLoader(d.train_shards, tokenizer, image_config, image_token_id, image_token_len, d.max_seq_len,
                       t.batch_size, t.accumulation_steps, world_size, rank, d.num_workers, t.seed, d.chunk_size,
                       d.batching, d.max_bad_fraction, d.max_pixels, d.samples_per_epoch, d.train_weights,
                       pin_memory)


def build_eval_loader(cfg: Any, tokenizer: Any, image_config: ImagePreprocessConfig, image_token_id: int,
                      image_token_len: int, world_size: int, rank: int, pin_memory: bool = False) -> EvalLoader:
    """An EvalLoader over data.eval_shards with the training batch size and batching."""
    d = cfg.data
    return EvalLoader(d.eval_shards, tokenizer, image_config, image_token_id, image_token_len, d.max_seq_len,
                      cfg.train.batch_size, world_size, rank, d.num_workers, d.batching, d.max_bad_fraction,
                      d.max_pixels, pin_memory)
