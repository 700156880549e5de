"""The epoch plan and the data position, without any I/O: balance, exactly-once, resume and resize."""

import json
from collections import Counter

import numpy as np
import pytest

from vlm.data.order import EpochOrder
from vlm.data.plan import (
    OLD_FORMAT,
    POSITION_FORMAT,
    Geometry,
    PositionError,
    batch_range,
    consumed_before,
    consumed_ranges,
    current_plan,
    dropped_samples,
    epoch_micro_batches,
    epoch_size,
    loader_slot,
    micro_batches,
    new_position,
    remaining_positions,
    resume,
    slot_schedule,
    with_consumed,
)

UNEVEN = [37, 5, 61]  # one source, three deliberately uneven shards


def order_for(seed=3, epoch=0, counts=UNEVEN, chunk_size=8):
    order = EpochOrder([counts], [1.0], chunk_size, seed, epoch)
    return order.ids(np.arange(len(order)))


def rank_stream(position, rank, limit=None):
    """What rank's DataLoader yields: its workers asked in turn from worker 0, an exhausted worker skipped."""
    n, geometry, consumed = current_plan(position)
    remaining = remaining_positions(position)
    workers = [slot_schedule(position, rank, loader_slot(position, w)) for w in range(geometry.slots)]
    batches, active = [], list(range(geometry.slots))
    while active:
        for w in list(active):
            item = next(workers[w], None)
            if item is None:
                active.remove(w)
            else:
                batches.append((item[0], remaining[item[1] : item[2]]))
    first = consumed_before(position) + consumed
    # The round-robin must give consecutive micro-steps, no gap and no reordering, also after a resume.
    assert [step for step, _ in batches] == list(range(first, first + micro_batches(n, geometry) - consumed))
    return batches[:limit] if limit is not None else batches


def train(position, steps=None):
    """Consume `steps` micro-batches (all if None) on every rank; returns (new position, positions used per rank)."""
    world = position["segments"][-1]["world_size"]
    per_rank = [rank_stream(position, r, steps) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1, "ranks must run the same number of micro-batches"
    used = [np.concatenate([p for _, p in batches]) if batches else np.zeros(0, int) for batches in per_rank]
    done = consumed_before(position) + position["segments"][-1]["micro_batches_consumed"] + len(per_rank[0])
    return with_consumed(position, done), used


def test_two_ranks_two_workers_uneven_shards_exactly_once_and_balanced():
    order = order_for()
    n = len(order)
    g = Geometry(world_size=2, workers=2, batch_size=3, accumulation=2)
    position = new_position(3, 0, n, g)
    m = micro_batches(n, g)
    assert m == 16 and m % g.accumulation == 0  # 103 // 6 = 17, rounded down to a multiple of 2
    end, used = train(position)
    ids = order[np.concatenate(used)]
    assert all(len(u) == m * g.batch_size for u in used)
    assert len(set(ids.tolist())) == len(ids)  # nothing twice, across ranks and workers
    assert dropped_samples(position) == n - len(ids) < g.global_batch
    assert epoch_micro_batches(end) == m


def global_batches(position):
    """Positions in S of each optimizer step of the last segment, sorted, from what the ranks' loaders yield."""
    _, geometry, _ = current_plan(position)
    streams = [rank_stream(position, r) for r in range(geometry.world_size)]
    steps: dict[int, list] = {}
    for stream in streams:
        for micro_step, positions in stream:
            steps.setdefault((micro_step - consumed_before(position)) // geometry.accumulation, []).append(positions)
    return [sorted(np.concatenate(steps[k]).tolist()) for k in sorted(steps)]


def test_dealing_is_global_batch_major():
    g = Geometry(world_size=2, workers=3, batch_size=2, accumulation=3)  # G = 12: each rank 6 per step
    n = 12 * 2 + 5
    assert micro_batches(n, g) == 6 and dropped_samples(new_position(0, 0, n, g)) == 5
    starts = [[batch_range(n, g, rank, step)[0] for step in range(6)] for rank in range(2)]
    # step 0: rank 0 reads positions 0..5 (micro-batches 0, 1, 2), rank 1 6..11; step 1 the next 12
    assert starts == [[0, 2, 4, 12, 14, 16], [6, 8, 10, 18, 20, 22]]
    # The same through the workers' round-robin: step k uses exactly positions [12k, 12k + 12).
    assert global_batches(new_position(0, 0, n, g)) == [list(range(0, 12)), list(range(12, 24))]


@pytest.mark.parametrize("geometries", [
    [Geometry(1, 0, 3, 2), Geometry(2, 2, 3, 1)],  # 1 rank x accumulation 2 == 2 ranks x accumulation 1
    [Geometry(2, 2, 3, 2), Geometry(3, 1, 2, 2), Geometry(4, 3, 3, 1), Geometry(1, 0, 12, 1)],  # all G = 12
])
def test_global_batches_depend_only_on_the_global_batch_size(geometries):
    order = order_for()
    n = len(order)
    expected = global_batches(new_position(3, 0, n, geometries[0]))
    assert len(expected) == n // geometries[0].global_batch
    for g in geometries[1:]:
        assert global_batches(new_position(3, 0, n, g)) == expected
        assert dropped_samples(new_position(3, 0, n, g)) == n % g.global_batch


def test_one_rank_accumulating_sees_the_micro_batches_of_two_ranks():
    n = len(order_for())
    one = rank_stream(new_position(3, 0, n, Geometry(1, 2, 3, 2)), 0)
    two = [rank_stream(new_position(3, 0, n, Geometry(2, 2, 3, 1)), r) for r in range(2)]
    # micro-batch 2k + r of the single rank is rank r's micro-batch k: the same B samples, in the same order
    assert all(np.array_equal(one[2 * k + r][1], two[r][k][1]) for k in range(len(two[0])) for r in range(2))


@pytest.mark.parametrize("consumed", [0, 2, 3, 4, 6, 7, 11, 12])
def test_consumed_set_is_whole_global_batches_then_each_ranks_first_micro_batches(consumed):
    g = Geometry(world_size=2, workers=2, batch_size=2, accumulation=3)  # G = 12: each rank 6 per step
    n = 12 * 4 + 7
    _, used = train(new_position(0, 0, n, g), consumed)
    whole, partial = divmod(consumed, g.accumulation)
    expected = list(range(whole * 12)) + [whole * 12 + r * 6 + i for r in range(2) for i in range(partial * 2)]
    assert sorted(np.concatenate(used).tolist()) == expected
    starts, stops = consumed_ranges(n, g, consumed)
    assert [i for a, b in zip(starts.tolist(), stops.tolist()) for i in range(a, b)] == expected


def test_order_is_deterministic_per_seed_and_epoch_and_differs_between_epochs():
    shard_of = np.repeat([0, 1, 2], UNEVEN)
    e0, e0_again, e1 = order_for(epoch=0), order_for(epoch=0), order_for(epoch=1)
    assert np.array_equal(e0, e0_again)
    assert not np.array_equal(e0, e1)
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(sum(UNEVEN)))

    def shard_sequence(order):
        return [shard_of[i] for k, i in enumerate(order) if k == 0 or shard_of[order[k - 1]] != shard_of[i]]

    orders = [order_for(epoch=e) for e in range(4)]
    assert len({tuple(shard_sequence(o)) for o in orders}) > 1  # shard (chunk) order changes
    assert not np.array_equal(order_for(seed=4), e0)


def test_chunks_stay_together_and_are_shuffled_inside():
    order = order_for(chunk_size=8)
    chunk_of = np.concatenate([np.arange(c) // 8 + 100 * s for s, c in enumerate(UNEVEN)])
    pieces: list[list[int]] = []
    for i in order.tolist():
        if not pieces or chunk_of[pieces[-1][-1]] != chunk_of[i]:
            pieces.append([])
        pieces[-1].append(i)
    assert len(pieces) == len(set(chunk_of.tolist())), "every chunk must be read in one piece"
    assert any(p != sorted(p) for p in pieces), "samples inside chunks must be shuffled"


def test_resume_with_same_geometry_continues_identically():
    order = order_for()
    g = Geometry(world_size=2, workers=3, batch_size=3, accumulation=2)
    position = new_position(3, 0, len(order), g)
    uninterrupted = [rank_stream(position, r) for r in range(2)]
    # 4 consumed: the next batch is worker 1's, yet a new DataLoader asks its worker 0 first.
    saved = json.loads(json.dumps(with_consumed(position, 4)))  # checkpoints are JSON
    restored = resume(saved, g, seed=3, num_samples=len(order))
    for rank in range(2):
        tail = rank_stream(restored, rank)
        assert [s for s, _ in tail] == [s for s, _ in uninterrupted[rank][4:]]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(tail, uninterrupted[rank][4:]))


def test_another_worker_count_keeps_the_plan_and_the_batches():
    order = order_for()
    n = len(order)
    g = Geometry(world_size=2, workers=3, batch_size=3, accumulation=2)
    position = new_position(3, 0, n, g)
    uninterrupted = [rank_stream(position, r) for r in range(2)]
    saved = json.loads(json.dumps(with_consumed(position, 5)))  # mid-step and mid-round-robin
    for workers in (0, 2, 5):
        restored = resume(saved, Geometry(2, workers, 3, 2), seed=3, num_samples=n)
        assert len(restored["segments"]) == 1 and restored["segments"][0]["workers"] == workers
        for rank in range(2):
            tail = rank_stream(restored, rank)
            assert [s for s, _ in tail] == [s for s, _ in uninterrupted[rank][5:]]
            assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(tail, uninterrupted[rank][5:]))
    # Resampled streams seed their RNG by segment, so there a new worker count still starts a segment.
    assert len(resume(saved, Geometry(2, 0, 3, 2), seed=3, num_samples=n, exact=False)["segments"]) == 2


def test_resize_at_a_step_boundary_continues_the_order_and_the_global_batches():
    n = len(order_for())
    two = Geometry(world_size=2, workers=2, batch_size=3, accumulation=1)
    one = Geometry(world_size=1, workers=0, batch_size=3, accumulation=2)  # the same G = 6
    uninterrupted = global_batches(new_position(3, 0, n, two))
    position, _ = train(new_position(3, 0, n, two), 4)
    resized = resume(json.loads(json.dumps(position)), one, seed=3, num_samples=n)
    assert remaining_positions(resized).tolist() == list(range(24, n))  # S after the consumed prefix
    assert global_batches(resized) == uninterrupted[4:]
    assert dropped_samples(resized) == dropped_samples(new_position(3, 0, n, two)) == n % 6


@pytest.mark.parametrize("plans", [
    [(2, 2, 3, 1, 5), (1, 2, 3, 1, None)],   # 2 ranks -> 1
    [(2, 2, 3, 1, 5), (3, 2, 3, 1, None)],   # 2 ranks -> 3
    [(2, 2, 3, 1, 5), (2, 0, 3, 1, None)],   # 2 workers -> in-process
    [(2, 2, 3, 2, 4), (2, 2, 4, 1, None)],   # micro-batch size and accumulation change
    [(2, 2, 3, 1, 3), (3, 1, 2, 1, 7), (1, 3, 5, 1, None)],  # two resizes in one epoch
    [(2, 2, 3, 1, 0), (3, 2, 3, 1, None)],   # resized before the first step
    [(2, 2, 2, 3, 4), (3, 1, 2, 1, None)],   # resized inside an optimizer step (4 % 3 != 0)
    [(2, 2, 2, 3, 5), (1, 0, 3, 2, 3), (2, 2, 2, 3, None)],  # inside steps twice, then back
])
def test_resize_mid_epoch_loses_and_repeats_nothing(plans):
    order = order_for()
    n = len(order)
    position = new_position(3, 0, n, Geometry(*plans[0][:4]))
    used = []
    for world, workers, batch, accumulation, steps in plans:
        position = resume(json.loads(json.dumps(position)), Geometry(world, workers, batch, accumulation), 3, n)
        position, rank_used = train(position, steps)
        used.extend(rank_used)
    ids = order[np.concatenate(used)]
    counts = Counter(ids.tolist())
    assert max(counts.values()) == 1
    last = Geometry(*plans[-1][:4])
    assert n - len(ids) == dropped_samples(position) < last.world_size * last.batch_size * last.accumulation


def test_epoch_length_is_the_same_every_epoch_and_for_every_rank():
    g = Geometry(world_size=3, workers=2, batch_size=4, accumulation=1)
    for epoch in range(3):
        n = epoch_size([UNEVEN], [1.0])
        position = new_position(0, epoch, n, g)
        assert {len(rank_stream(position, r)) for r in range(3)} == {micro_batches(n, g)}


def test_mixing_weights_whole_copies_and_fresh_fractions():
    counts = [[10, 7], [4, 4, 4]]
    order0 = EpochOrder(counts, [2.0, 0.5], 4, seed=1, epoch=0)
    runs0 = list(order0.runs())
    runs1 = list(EpochOrder(counts, [2.0, 0.5], 4, seed=1, epoch=1).runs())
    ids0, ids1 = np.concatenate(runs0), np.concatenate(runs1)
    assert sorted(order0.ids(np.arange(len(order0))).tolist()) == sorted(ids0.tolist())  # S shuffles these runs
    assert len(ids0) == len(ids1) == epoch_size(counts, [2.0, 0.5]) == 34 + 6
    c0 = Counter(ids0.tolist())
    assert all(c0[i] == 2 for i in range(17))  # weight 2: each sample of source 0 twice
    half0 = sorted(i for i in c0 if i >= 17)
    half1 = sorted(i for i in Counter(ids1.tolist()) if i >= 17)
    assert len(half0) == 6 and all(c0[i] == 1 for i in half0)
    assert half0 != half1  # a fresh random half each epoch
    assert all(np.all(np.diff(r) > 0) for r in runs0)  # shard order inside each run, for sequential reads
    # Runs never cross a shard boundary, so chunks stay within one tar.
    bounds = [0, 10, 17, 21, 25, 29]
    assert all(np.searchsorted(bounds, r[0], "right") == np.searchsorted(bounds, r[-1], "right") for r in runs0)


def test_a_position_of_another_format_is_refused_by_name():
    g = Geometry(2, 2, 3)
    other = {**new_position(3, 1, 100, g), "format": "vlm-data-position/0"}
    with pytest.raises(PositionError, match=POSITION_FORMAT):
        resume(other, g, seed=3, num_samples=100)


def test_a_format_2_position_is_read_where_the_order_plays_no_part():
    g = Geometry(2, 2, 3)
    n = 100
    old = {**new_position(3, 1, n, g), "format": OLD_FORMAT}
    start = resume(json.loads(json.dumps(old)), Geometry(1, 0, 3), seed=3, num_samples=n)
    assert start["format"] == POSITION_FORMAT and start["epoch"] == 1 and epoch_micro_batches(start) == n // 3
    end = resume({**with_consumed(new_position(3, 1, n, g), micro_batches(n, g)), "format": OLD_FORMAT}, g, 3, n)
    assert end["format"] == POSITION_FORMAT and dropped_samples(end) == n % 6
    middle = {**with_consumed(new_position(3, 1, n, g), 4), "format": OLD_FORMAT}
    resampled = resume(middle, g, seed=3, num_samples=n, exact=False)  # no epoch order in resampled mode
    assert resampled["segments"] == middle["segments"] and resampled["format"] == POSITION_FORMAT
    with pytest.raises(PositionError, match="4 micro-batches into epoch 1.*--resume never"):
        resume(middle, g, seed=3, num_samples=n)


def test_position_errors_name_what_differs():
    g = Geometry(2, 2, 3)
    position = new_position(3, 0, 100, g)
    with pytest.raises(PositionError, match="train.seed"):
        resume(position, g, seed=4, num_samples=100)
    with pytest.raises(PositionError, match="data.train_shards"):
        resume(position, g, seed=3, num_samples=99)
    with pytest.raises(PositionError, match="micro-batches consumed"):
        with_consumed(position, micro_batches(100, g) + 1)
    with pytest.raises(PositionError, match="format"):
        resume({"epoch": 0}, g, seed=3, num_samples=100)
