"""The computed epoch order: a bijection, equal to its definition, O(shards) at any N, exactly once with weights."""

import json
import tracemalloc
from collections import Counter

import numpy as np
import pytest

from vlm.data import plan
from vlm.data.order import (
    KEY_CHUNKS,
    KEY_INSIDE,
    KEY_SUBSET,
    STRATUM,
    EpochOrder,
    rounding_offset,
    source_samples,
)
from vlm.data.permutation import keys_for, permute, round_keys
from vlm.data.pipeline import ExactSchedule


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 13, 31, 64, 97, 1000, 4099])
def test_the_keyed_permutation_is_a_bijection_and_inverts(n):
    keys = round_keys(7, 1, 0)
    image = permute(np.arange(n), n, keys)
    assert sorted(image.tolist()) == list(range(n))
    assert permute(image, n, keys, inverse=True).tolist() == list(range(n))
    if n >= 5:
        other_keys = permute(np.arange(n), n, round_keys(7, 2, 0))
        assert image.tolist() != list(range(n)) and image.tolist() != other_keys.tolist()
    # One bijection per element (other domains, other keys) gives what each gives alone.
    items = np.arange(3 * n) % 3
    domains = np.array([n, max(1, n // 2), n + 5])[items]
    x = np.arange(3 * n) // 3 % domains
    together = permute(x, domains, keys_for(keys, items))
    alone = [permute(x[items == j], int(domains[items == j][0]), keys_for(keys, j)) for j in range(3)]
    assert all(together[items == j].tolist() == alone[j].tolist() for j in range(3))
    with pytest.raises(ValueError, match=r"\[0, n\)"):
        permute(np.array([n]), n, keys)


def reference_fraction(counts, extra, offset, first_id, subset_keys):
    """The fractional pass's runs from its definition: K(x) chosen among the first x, strata, sigma."""
    total, starts, runs = sum(counts), [sum(counts[:i]) for i in range(len(counts) + 1)], []
    for k in range(len(counts)):
        run = []
        for lo in range(starts[k], starts[k + 1], STRATUM):
            hi = min(lo + STRATUM, starts[k + 1])
            chosen = (extra * hi + offset) // total - (extra * lo + offset) // total
            picks = [int(permute(np.array([i]), hi - lo, keys_for(subset_keys, lo))[0]) for i in range(chosen)]
            run += [first_id + lo + i for i in sorted(picks)]
        runs.append(run)
    return runs


def reference_order(shard_counts, weights, chunk_size, seed, epoch):
    """S from the module's definition, element by element with Python integers and lists."""
    runs, first_id = [], 0
    for s, (counts, weight) in enumerate(zip(shard_counts, weights)):
        total = sum(counts)
        starts = [sum(counts[:i]) for i in range(len(counts) + 1)]
        copies, extra = divmod(source_samples(total, weight), total) if total else (0, 0)
        for _ in range(copies):
            runs += [[first_id + i for i in range(starts[k], starts[k + 1])] for k in range(len(counts))]
        if extra:
            runs += reference_fraction(counts, extra, rounding_offset(seed, epoch, s, total), first_id,
                                       round_keys(seed, epoch, KEY_SUBSET, s))
        first_id += total
    chunks = [run[i : i + chunk_size] for run in runs for i in range(0, len(run), chunk_size)]
    pi = round_keys(seed, epoch, KEY_CHUNKS)
    order = []
    for t in range(len(chunks)):
        k = int(permute(np.array([t]), len(chunks), pi)[0])
        rho = keys_for(round_keys(seed, epoch, KEY_INSIDE), k)
        order += [chunks[k][int(permute(np.array([o]), len(chunks[k]), rho)[0])] for o in range(len(chunks[k]))]
    return order


@pytest.mark.parametrize("shard_counts, weights, chunk_size", [
    ([[37, 5, 61]], [1.0], 8),
    ([[37, 5, 61]], [1.0], 1),
    ([[3, 0, 64, 65, 1]], [1.0], 64),           # an empty shard, a chunk as big as a shard, one sample
    ([[10, 7], [4, 4, 4]], [2.0, 0.5], 3),
    ([[13, 29, 2], [9], [5, 6]], [0.3, 1.7, 3.0], 4),
    ([[100] * 20], [0.25], 7),
    ([[700, 300, 1000]], [0.4], 16),           # shards of several strata, a short last stratum
])
def test_the_computed_order_is_its_definition(shard_counts, weights, chunk_size):
    for seed, epoch in [(0, 0), (5, 3)]:
        order = EpochOrder(shard_counts, weights, chunk_size, seed, epoch)
        expected = reference_order(shard_counts, weights, chunk_size, seed, epoch)
        assert len(order) == len(expected) == plan.epoch_size(shard_counts, weights)
        assert order.ids(np.arange(len(order))).tolist() == expected
        picked = np.array([len(order) - 1, 0, len(order) // 2, 1])  # any positions, in any order
        assert order.ids(picked).tolist() == [expected[i] for i in picked]
    with pytest.raises(IndexError):
        order.ids(np.array([len(order)]))


def test_a_huge_fractional_source_rounds_exactly():
    counts = [10**9 + 7 * i for i in range(5)]  # extra * T passes 2^63: the exact Python-integer path
    order = EpochOrder([counts], [0.5], 64, seed=1, epoch=2)
    total, extra = sum(counts), source_samples(sum(counts), 0.5)
    offset = rounding_offset(1, 2, 0, total)
    starts = [sum(counts[:i]) for i in range(6)]
    assert order.passes[0].runs.tolist() == [(extra * p + offset) // total for p in starts]
    assert len(order) == extra
    for sample in order.ids(np.array([0, 12345, len(order) - 1])).tolist():  # each one chosen by the definition
        shard = max(k for k in range(5) if starts[k] <= sample)
        lo = starts[shard] + (sample - starts[shard]) // STRATUM * STRATUM
        hi = min(lo + STRATUM, starts[shard + 1])
        count = (extra * hi + offset) // total - (extra * lo + offset) // total
        picks = permute(np.arange(count), hi - lo, keys_for(round_keys(1, 2, KEY_SUBSET, 0), lo))
        assert sample - lo in picks.tolist()


def test_a_fractional_weight_chooses_every_sample_equally_often():
    counts, epochs = [[300, 211, 489]], 200
    seen = Counter()
    for epoch in range(epochs):
        order = EpochOrder(counts, [1.3], 8, seed=0, epoch=epoch)
        seen.update(order.ids(np.arange(len(order))).tolist())
    assert sorted(seen) == list(range(1000))
    extra_share = np.array([seen[i] - epochs for i in range(1000)]) / epochs  # beyond the whole copy
    assert abs(extra_share.mean() - 0.3) < 1e-9  # exactly 300 extra a epoch
    assert extra_share.min() > 0.15 and extra_share.max() < 0.45  # no sample favoured (binomial sd ~0.03)


def test_remaining_positions_are_s_less_what_earlier_segments_used():
    n = 1000
    position = plan.new_position(0, 0, n, plan.Geometry(3, 2, 4, 2))
    for geometry, consumed in [(plan.Geometry(5, 1, 3, 3), 7), (plan.Geometry(2, 0, 7, 1), 9),
                               (plan.Geometry(4, 2, 2, 2), 5)]:
        position = plan.resume(plan.with_consumed(position, plan.consumed_before(position) + consumed),
                               geometry, 0, n)
    # Brute force, as the plan once did it: a mask over every position, segment after segment.
    remaining = np.arange(n)
    for segment in position["segments"][:-1]:
        starts, stops = plan.consumed_ranges(len(remaining), plan.segment_geometry(segment),
                                             segment["micro_batches_consumed"])
        used = np.zeros(len(remaining), dtype=bool)
        for a, b in zip(starts, stops):
            used[a:b] = True
        remaining = remaining[~used]
    assert plan.remaining_count(position) == len(remaining)
    assert plan.remaining_positions(position).tolist() == remaining.tolist()
    shuffled = np.random.default_rng(0).permutation(len(remaining))
    assert plan.epoch_positions(position, shuffled).tolist() == remaining[shuffled].tolist()


def test_a_plan_of_a_trillion_samples_holds_nothing_of_size_n():
    counts = [10**8 + 13 * (i % 7) for i in range(10**4)]  # ~10^12 samples in 10^4 shards
    tracemalloc.start()
    try:
        order = EpochOrder([counts, [10**4] * 100], [1.0, 0.5], 64, seed=9, epoch=4)
        geometry = plan.Geometry(64, 8, 256, 1)
        position = plan.new_position(9, 4, len(order), geometry)
        position = plan.resume(plan.with_consumed(position, 3), plan.Geometry(48, 8, 256, 2), 9, len(order))
        position = plan.resume(plan.with_consumed(position, 5), geometry, 9, len(order))
        batches = [order.ids(plan.epoch_positions(position, np.arange(lo, hi)))
                   for _, (_, lo, hi) in zip(range(4), plan.slot_schedule(position, 63, 7))]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(order) > 10**12
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MB for 10^4 shards: something grows with N"
    ids = np.concatenate(batches)
    assert len(ids) == 4 * 256 == len(set(ids.tolist())) and ids.min() >= 0 and ids.max() < sum(counts) + 10**6
    assert len(json.dumps(position)) < 10_000


def loader_ids(position, shard_counts, weights, chunk_size, rank, steps):
    """Ids rank's DataLoader yields from `position` through ExactSchedule: workers in turn, `steps` batches."""
    _, geometry, _ = plan.current_plan(position)
    schedule = ExactSchedule(shard_counts, weights, chunk_size, position, rank)
    workers = [schedule.batches(w) for w in range(geometry.slots)]
    out, turn = [], 0
    while len(out) < steps:
        item = next(workers[turn % geometry.slots], None)
        if item is None:
            break
        out.append([s["__id__"] for s in item[1]])
        turn += 1
    return out


@pytest.mark.parametrize("plans", [
    [(2, 2, 3, 1, 5), (3, 1, 2, 1, None)],
    [(2, 2, 2, 3, 4), (1, 0, 3, 2, 3), (4, 3, 2, 1, None)],  # inside optimizer steps, two resizes
])
def test_exactly_once_across_ranks_and_resizes_with_weights(plans):
    shard_counts, weights, chunk_size, seed = [[13, 29, 2, 40], [9, 17]], [0.5, 2.0], 4, 11
    order = EpochOrder(shard_counts, weights, chunk_size, seed, epoch=1)
    n = len(order)
    epoch = Counter(order.ids(np.arange(n)).tolist())
    assert sum(epoch.values()) == n == 42 + 52 and max(epoch.values()) == 2
    position = plan.new_position(seed, 1, n, plan.Geometry(*plans[0][:4]))
    used: Counter = Counter()
    for world, workers, batch, accumulation, steps in plans:
        position = plan.resume(json.loads(json.dumps(position)), plan.Geometry(world, workers, batch, accumulation),
                               seed, n)
        per_rank = [loader_ids(position, shard_counts, weights, chunk_size, r, steps or 10**9) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1, "every rank runs the same number of micro-batches"
        for batches in per_rank:
            used.update(i for b in batches for i in b)
        done = plan.consumed_before(position) + position["segments"][-1]["micro_batches_consumed"] + len(per_rank[0])
        position = plan.with_consumed(position, done)
    assert not used - epoch, "a sample was used more often than the epoch holds it"
    assert sum((epoch - used).values()) == plan.dropped_samples(position)
