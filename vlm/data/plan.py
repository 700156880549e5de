"""Epoch plan and loader position: which samples each rank's micro-batches hold, as pure functions (no I/O).

    from vlm.data.order import EpochOrder
    from vlm.data.plan import Geometry, epoch_positions, new_position, slot_schedule
    order = EpochOrder(shard_counts, weights, chunk_size=64, seed=42, epoch=0)   # S, computed, never stored
    position = new_position(seed=42, epoch=0, num_samples=len(order), geometry=Geometry(2, 2, 16, 4))
    for micro_step, start, stop in slot_schedule(position, rank=1, worker=0):
        ids = order.ids(epoch_positions(position, np.arange(start, stop)))   # the B samples of that micro-batch

Notation: N samples in the epoch, W data-parallel ranks, K DataLoader workers per rank (K=0 runs in the
main process and counts as one slot), B samples per micro-batch, A gradient-accumulation steps,
G = W*B*A samples per optimizer step (the global batch).

Epoch order S (`vlm.data.order`). Every run of consecutive samples (one shard, or the part of it chosen this
epoch) is cut into chunks of `chunk_size`; the chunks are permuted, and the samples inside each chunk
permuted, by keyed bijections seeded with (seed, epoch). Same (seed, epoch) -> same S on every rank, worker
and process; another epoch -> another shard and sample order, while reads stay within a few chunks at a time.
S is computed one position at a time, so nothing here or in `vlm.data.order` holds N of anything.

Segment plan, dealt global-batch-major. A segment plans a list R of positions in S still to be used (all of
S at the start of an epoch). Every rank runs M = floor(|R| / G) * A micro-batches, computed from counts
alone; the rest of R (fewer than G) is the dropped tail, reported by the loader. Optimizer step g uses
exactly R[g*G : (g+1)*G], and inside it rank r's micro-batch a (rank-local micro-step j = g*A + a) is
R[g*G + (r*A + a)*B : g*G + (r*A + a + 1)*B], so a rank reads A*B consecutive positions per step. Hence
global batch g holds the same samples for every (W, B, A) with the same G: one rank with accumulation 2 and
two ranks with accumulation 1 (same B) train on identical global batches. The worker count plays no part
in the dealing: rank r's DataLoader takes micro-batch j from worker j % K (torch's round-robin over an
IterableDataset; after a resume at micro-batch c, DataLoader worker w plays slot (w + c) % K, see
`loader_slot`), so K workers and K=0 yield the same batches.

Position. A JSON-able dict {format, seed, epoch, num_samples, segments: [{world_size, workers, batch_size,
accumulation, micro_batches_consumed}]}: about 100 bytes a segment, whatever N. After c micro-batches per rank a
segment has used the first floor(c/A) global batches of R (a prefix) and, when c % A != 0, every rank's
first c % A micro-batches of global batch floor(c/A) (`consumed_ranges`: a prefix and W ranges).
Checkpoints are taken at optimizer-step boundaries, so normally that is a prefix. Restored with the last
segment's (W, B, A) - in exact mode with any worker count - each worker skips exactly the batches already
delivered, without reading them, and the stream continues identically. Restored with another (W, B, A),
the remaining positions of R, in S order (the old tail included), are planned again as a new segment: after a
step boundary that just continues S after the consumed prefix, so with an unchanged G even the global batches
(and the tail) stay the same. Several resizes in one epoch stack segments; index i of the last segment's R is
mapped back to S through each earlier segment's consumed ranges (`epoch_positions`, O(log W) per segment).
No position is used twice or lost; only the last segment's tail is dropped.

Format 3 (this one) differs from format 2 only in S (format 2 shuffled a materialised list). A format-2
position is read where S plays no part: at the start of an epoch, at its end, and in resampled mode; one saved
in the middle of an exact epoch is refused (`resume`), since its remaining samples were a set under the old S.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from vlm.data.order import source_samples

POSITION_FORMAT = "vlm-data-position/3"
OLD_FORMAT = "vlm-data-position/2"  # the same positions over the materialised S of earlier versions


class PositionError(ValueError):
    """A saved data position that does not fit this data or this run; the message says what differs."""


@dataclass(frozen=True)
class Geometry:
    """How an epoch is split: ranks, DataLoader workers per rank, micro-batch size, accumulation steps."""

    world_size: int
    workers: int
    batch_size: int
    accumulation: int = 1

    def __post_init__(self):
        if self.world_size < 1 or self.workers < 0 or self.batch_size < 1 or self.accumulation < 1:
            raise ValueError(f"invalid data geometry {self}: world_size, batch_size and accumulation must be "
                             ">= 1 and workers >= 0")

    @property
    def slots(self) -> int:
        """Producers per rank: workers, or 1 when batches are made in the main process (workers=0)."""
        return max(1, self.workers)

    @property
    def global_batch(self) -> int:
        """G = W*B*A: the samples of one optimizer step across all ranks."""
        return self.world_size * self.batch_size * self.accumulation

    def steps_per_epoch(self, num_samples: int) -> int:
        """Optimizer steps an epoch of `num_samples` gives: whole global batches (the tail is dropped)."""
        return num_samples // self.global_batch

    def same_dealing(self, other: Geometry) -> bool:
        """True if both deal the same micro-batches to the same (rank, micro_step): all but workers equal."""
        return replace(self, workers=other.workers) == other


def micro_batches(num_positions: int, geometry: Geometry) -> int:
    """M: micro-batches per rank for `num_positions` samples: whole global batches times the accumulation."""
    return geometry.steps_per_epoch(num_positions) * geometry.accumulation


def total_steps(num_samples: int, geometry: Geometry, epochs: int, max_steps: int | None = None) -> int:
    """Optimizer steps of a whole fresh run: steps per epoch x epochs, capped at `max_steps` (None: no cap)."""
    return last_step(new_position(0, 0, num_samples, geometry), 0, epochs, max_steps)


def last_step(position: dict, steps_done: int, epochs: int, max_steps: int | None = None) -> int:
    """The optimizer step a run ends at: `steps_done` (the step counter at `position`) plus the steps left
    in the position's epoch as it is planned now (after a change of geometry too) plus whole epochs up to
    `epochs`, capped at `max_steps` (None: no cap). Steps are counted in the current geometry."""
    n, geometry, consumed = current_plan(position)
    left = 0
    if position["epoch"] < epochs:
        left = (micro_batches(n, geometry) - consumed) // geometry.accumulation
        left += (epochs - position["epoch"] - 1) * geometry.steps_per_epoch(position["num_samples"])
    last = steps_done + left
    return last if max_steps is None else min(last, max_steps)


def worker_batches(total: int, slots: int, worker: int) -> int:
    """How many of micro-batches 0..total-1 come from `worker` under round-robin: ceil((total - worker) / slots)."""
    return max(0, -(-(total - worker) // slots))


def batch_range(num_positions: int, geometry: Geometry, rank: int, step: int) -> tuple[int, int]:
    """[start, stop) of rank's micro-batch `step` (0-based in the segment) in the segment's remaining positions."""
    if not 0 <= rank < geometry.world_size:
        raise ValueError(f"rank {rank} is outside {geometry}")
    if not 0 <= step < micro_batches(num_positions, geometry):
        raise ValueError(f"micro-batch {step} is beyond the {micro_batches(num_positions, geometry)} of this plan")
    g, a = divmod(step, geometry.accumulation)
    begin = g * geometry.global_batch + (rank * geometry.accumulation + a) * geometry.batch_size
    return begin, begin + geometry.batch_size


def consumed_ranges(num_positions: int, geometry: Geometry, consumed: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops), (W + 1,) int64 each: the [start, stop) ranges of a segment's positions (indexes of its
    R) used by micro-batches 0..consumed-1 on every rank; ascending, disjoint, some maybe empty.

    That is the first consumed // A global batches, then every rank's first consumed % A micro-batches of
    the next one (A*B consecutive positions per rank and step, ranks one after another). Raises
    PositionError if `consumed` is more than the segment's micro-batches per rank.
    """
    m = micro_batches(num_positions, geometry)
    if not 0 <= consumed <= m:
        raise PositionError(f"{consumed} micro-batches consumed, but this plan has only {m} per rank")
    whole, partial = divmod(consumed, geometry.accumulation)
    prefix, per_rank = whole * geometry.global_batch, geometry.accumulation * geometry.batch_size
    starts = np.concatenate([[0], prefix + per_rank * np.arange(geometry.world_size)]).astype(np.int64)
    stops = np.concatenate([[prefix], starts[1:] + partial * geometry.batch_size]).astype(np.int64)
    return starts, stops


def _through_consumed(index: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Index i of the positions left outside the ranges [starts, stops) -> its index before removing them.

    i lands after range j when the positions kept before range j, starts[j] - (lengths of ranges < j), are
    <= i; it then moves up by the lengths of ranges 0..j. O(log ranges) per index.
    """
    removed = np.cumsum(stops - starts)  # (ranges,) lengths up to and including each range
    kept_before = starts - (removed - (stops - starts))
    return index + removed[np.searchsorted(kept_before, index, side="right") - 1]


def epoch_size(shard_counts: Sequence[Sequence[int]], weights: Sequence[float]) -> int:
    """N, the samples per epoch the sources give with these weights (the same every epoch)."""
    return sum(source_samples(sum(c), w) for c, w in zip(shard_counts, weights))


def new_position(seed: int, epoch: int, num_samples: int, geometry: Geometry) -> dict:
    """The position at the start of `epoch`: one segment, nothing consumed."""
    return {"format": POSITION_FORMAT, "seed": int(seed), "epoch": int(epoch), "num_samples": int(num_samples),
            "segments": [_segment(geometry, 0)]}


def _segment(geometry: Geometry, consumed: int) -> dict:
    """One segment of a position: the geometry that plans it and the micro-batches delivered from it."""
    return {**asdict(geometry), "micro_batches_consumed": int(consumed)}


def segment_geometry(segment: dict) -> Geometry:
    """The Geometry a saved segment was planned with."""
    return Geometry(segment["world_size"], segment["workers"], segment["batch_size"], segment["accumulation"])


def _segment_sizes(position: dict) -> list[int]:
    """|R| of every segment: N, then what each segment leaves to the next (W*B per micro-batch consumed)."""
    sizes = [int(position["num_samples"])]
    for segment in position["segments"][:-1]:
        g = segment_geometry(segment)
        sizes.append(sizes[-1] - g.world_size * g.batch_size * segment["micro_batches_consumed"])
    return sizes


def remaining_count(position: dict) -> int:
    """|R| of the last segment: the positions of S it plans (N less what earlier segments used)."""
    return _segment_sizes(position)[-1]


def epoch_positions(position: dict, index: np.ndarray) -> np.ndarray:
    """Positions in S of the last segment's R[index]: (m,) int64 for (m,) indexes in [0, remaining_count).

    R is S less the ranges earlier segments consumed, in S order, so each earlier segment maps the index
    back through its `consumed_ranges`. O(m * segments * log W). Raises IndexError outside R.
    """
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    sizes = _segment_sizes(position)
    if index.size and (index.min() < 0 or index.max() >= sizes[-1]):
        raise IndexError(f"indexes must lie in [0, {sizes[-1]}), the positions this segment plans")
    for n, segment in zip(reversed(sizes[:-1]), reversed(position["segments"][:-1])):
        starts, stops = consumed_ranges(n, segment_geometry(segment), segment["micro_batches_consumed"])
        index = _through_consumed(index, starts, stops)
    return index


def remaining_positions(position: dict) -> np.ndarray:
    """All of R as positions in S (ascending). O(|R|) memory: for tests and small epochs; loaders map only
    the indexes of the micro-batch at hand with `epoch_positions`."""
    return epoch_positions(position, np.arange(remaining_count(position)))


def consumed_before(position: dict) -> int:
    """Micro-batches of this epoch consumed in earlier segments (the micro_step the last segment starts at)."""
    return sum(s["micro_batches_consumed"] for s in position["segments"][:-1])


def current_plan(position: dict) -> tuple[int, Geometry, int]:
    """(positions planned by the last segment, its geometry, micro-batches it has delivered)."""
    last = position["segments"][-1]
    return remaining_count(position), segment_geometry(last), last["micro_batches_consumed"]


def epoch_micro_batches(position: dict) -> int:
    """Micro-batches per rank in this epoch as planned now (earlier segments' consumed + the last plan)."""
    n, geometry, _ = current_plan(position)
    return consumed_before(position) + micro_batches(n, geometry)


def dropped_samples(position: dict) -> int:
    """Samples of this epoch that no micro-batch will use (the last segment's tail, < one global batch)."""
    n, geometry, _ = current_plan(position)
    return n - geometry.world_size * geometry.batch_size * micro_batches(n, geometry)


def with_consumed(position: dict, micro_batches_consumed: int) -> dict:
    """A copy of `position` after `micro_batches_consumed` micro-batches of the epoch (counted from its start)."""
    in_last = micro_batches_consumed - consumed_before(position)
    n, geometry, _ = current_plan(position)
    if not 0 <= in_last <= micro_batches(n, geometry):
        raise PositionError(
            f"{micro_batches_consumed} micro-batches consumed in epoch {position['epoch']}, but this position "
            f"covers {consumed_before(position)} to {epoch_micro_batches(position)}")
    segments = [dict(s) for s in position["segments"]]
    segments[-1]["micro_batches_consumed"] = in_last
    return {**position, "segments": segments}


def resume(position: dict, geometry: Geometry, seed: int, num_samples: int, exact: bool = True) -> dict:
    """`position` restored for a run with `geometry`: kept if it deals the same micro-batches, else re-planned.

    `exact` is False for resampled streams: they deal no samples, and any change of geometry starts a new
    segment. A format-2 position is read where that loses nothing (`from_format_2`). Raises PositionError
    when the position does not fit this data or seed.
    """
    position = check_position(from_format_2(position, exact))
    if position["seed"] != seed:
        raise PositionError(f"the data position was saved with seed {position['seed']}, this run uses {seed}; "
                            "set train.seed back to resume the epoch without repeating samples")
    if position["num_samples"] != num_samples:
        raise PositionError(f"the data position is for {position['num_samples']} samples per epoch, the training "
                            f"sources now give {num_samples}; resume with the same data.train_shards and weights")
    last = position["segments"][-1]
    old = segment_geometry(last)
    if old == geometry:
        return position
    segments = [dict(s) for s in position["segments"]]
    if exact and old.same_dealing(geometry):
        # Only the worker count differs: the same micro-batches, produced by other workers (see loader_slot).
        # Resampled streams still start a segment: their RNG seeds count segments, so none is drawn again.
        segments[-1]["workers"] = geometry.workers
    elif last["micro_batches_consumed"] == 0:
        segments[-1] = _segment(geometry, 0)  # nothing was taken from that plan: replace it, stack no empty one
    else:
        segments.append(_segment(geometry, 0))
    return {**position, "segments": segments}


def from_format_2(position: dict, exact: bool) -> dict:
    """A position saved by the earlier plan (format 2) as format 3, where its meaning is unchanged: nothing of
    the epoch consumed yet, the last segment done (nothing left to deal), or resampled mode (`exact` False,
    no S). Any other position is returned as it is. Raises PositionError for a format-2 position in the
    middle of an exact epoch: the samples it has yet to deal were a set under the old S, not this one.
    """
    if not isinstance(position, dict) or position.get("format") != OLD_FORMAT:
        return position
    upgraded = check_position({**position, "format": POSITION_FORMAT})
    n, geometry, consumed = current_plan(upgraded)
    done = consumed_before(upgraded) + consumed
    if exact and done and consumed < micro_batches(n, geometry):
        raise PositionError(
            f"the data position was saved by an earlier version (format {OLD_FORMAT!r}) {done} micro-batches into "
            f"epoch {position['epoch']}; this version orders an epoch's samples differently ({POSITION_FORMAT!r}), "
            "so the rest of that epoch cannot be dealt without repeating or losing samples. Finish the epoch with "
            "the version that saved it (its checkpoint at the end of the epoch resumes here), or start again "
            "with --resume never")
    return upgraded


def check_position(position: dict) -> dict:
    """Validate the structure of a saved position; returns it. Raises PositionError naming the problem."""
    if not isinstance(position, dict) or position.get("format") != POSITION_FORMAT:
        got = position.get("format") if isinstance(position, dict) else type(position).__name__
        raise PositionError(f"not a data position of format {POSITION_FORMAT!r} (got {got!r})")
    missing = [k for k in ("seed", "epoch", "num_samples", "segments") if k not in position]
    if missing or not position["segments"]:
        raise PositionError(f"data position lacks {missing or ['segments']}")
    for segment in position["segments"]:
        try:
            segment_geometry(segment), int(segment["micro_batches_consumed"])
        except (KeyError, TypeError, ValueError) as err:
            raise PositionError(f"bad segment {segment} in the data position: {err!r}") from err
    n = position["num_samples"]
    for segment in position["segments"]:
        geometry = segment_geometry(segment)
        if not 0 <= segment["micro_batches_consumed"] <= micro_batches(n, geometry):
            raise PositionError(f"segment {segment} consumed more micro-batches than it had")
        n -= geometry.world_size * geometry.batch_size * segment["micro_batches_consumed"]
    return position


def loader_slot(position: dict, loader_worker: int) -> int:
    """The slot DataLoader worker `loader_worker` must play so that round-robin resumes at the right batch.

    A DataLoader always asks its worker 0 first; after c micro-batches of the segment, batch c belongs to
    slot c % K, so DataLoader worker w plays slot (w + c) % K.
    """
    _, geometry, consumed = current_plan(position)
    return (loader_worker + consumed) % geometry.slots


def slot_schedule(position: dict, rank: int, worker: int) -> Iterator[tuple[int, int, int]]:
    """(micro_step, start, stop) for each micro-batch slot (rank, worker) still has to deliver.

    Slot k delivers the segment's micro-batches j with j % K == k, from the first one not yet consumed;
    start:stop index the last segment's R (`epoch_positions` maps them to S); micro_step counts from the start
    of the epoch.
    Batches delivered before the position was saved are skipped without being produced.
    """
    n, geometry, consumed = current_plan(position)
    if not 0 <= worker < geometry.slots:
        raise ValueError(f"worker {worker} is outside {geometry}")
    base, slots = consumed_before(position), geometry.slots
    for step in range(consumed + (worker - consumed) % slots, micro_batches(n, geometry), slots):
        start, stop = batch_range(n, geometry, rank, step)
        yield base + step, start, stop
