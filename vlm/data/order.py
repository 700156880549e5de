"""The epoch order S as a function, position -> sample id, computed from shard counts (no list of N ids).

    from vlm.data.order import EpochOrder
    order = EpochOrder([[1000] * 10**6], weights=[1.0], chunk_size=64, seed=42, epoch=0)
    len(order)                          # N = 10^9 samples in this epoch
    order.ids(np.arange(256, 512))      # (256,) the global sample ids at positions 256..511 of S

Definition. Sample ids number every shard of every source, in order. Source s (shard sizes n_i, T samples,
weight w) gives `source_samples(T, w)` = floor(w*T) samples: `copies` whole passes over its shards and
`extra` < T more. A whole pass gives one run per shard, its ids in order. The `extra` samples are chosen by
systematic allocation (Madow 1949, "On the theory of systematic sampling II", Ann. Math. Stat.): with a
fresh offset U in [0, T) drawn from (seed, epoch, s), K(x) = floor((extra*x + U)/T) of them lie among the
source's first x samples. So shard i (samples [P_i, P_i+1)) gets k_i = K(P_i+1) - K(P_i), extra*n_i/T
rounded down or up, and so does each stratum [lo, hi) of STRATUM consecutive samples counted from the
shard's start (the last one shorter): K(hi) - K(lo), which is exactly extra*(hi-lo)/T on average over U.
Inside a stratum the chosen samples are lo + sigma(0..K(hi)-K(lo)-1), sigma a keyed bijection of
[0, hi - lo) from (seed, epoch, s, lo). Every sample is thus chosen with probability extra/T, a fresh subset
every epoch; shard i's run is its k_i chosen samples in shard order. Runs follow each other by source,
whole passes before the fractional one, shards in order.

Each run is cut into chunks of `chunk_size` c consecutive samples, its last chunk shorter when c does not
divide it, so no chunk spans two runs (two shards); chunks are numbered 0..C-1 in run order. Slot t of S
holds chunk pi(t), and place o inside chunk k its sample rho_k(o): pi a keyed bijection of [0, C) from
(seed, epoch), rho_k one of [0, len(chunk k)) from (seed, epoch, k) (`vlm.data.permutation`). S is the
slots' samples one after another.

Cost. Slot t starts at t*c less the shortfall of the short chunks in slots before t, and there is at most
one short chunk per run, so set-up sorts the short chunks by slot (pi^-1 of their numbers) with their running
shortfall: O(runs) time and memory, about 16 bytes per shard. A position is then placed in O(log runs) and
mapped to its id in O(log shards), so B ids cost O(B log shards); in a fractional run, plus O(STRATUM) for
each stratum they touch (a chunk touches about c / (w - copies) / STRATUM + 2). Nothing is O(N).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from vlm.data.permutation import keys_for, permute, round_keys

# What the keys drawn from (seed, epoch, purpose[, source]) are for: pi, rho_k, U and sigma of the module doc.
KEY_CHUNKS, KEY_INSIDE, KEY_ROUNDING, KEY_SUBSET = 0, 1, 2, 3
_BLOCK = 1 << 16  # shards (or integers) handled per step at set-up, which bounds its temporary arrays
STRATUM = 256  # consecutive samples of a shard (from its start) that a fractional pass deals a share to


def source_samples(total: int, weight: float) -> int:
    """Samples a source of `total` samples and mixing weight `weight` gives per epoch: floor(weight * total),
    with 1e-9 of slack so that 0.3 * 10 counts as 3. The one rule that `vlm.data.plan.epoch_size` uses too."""
    return int(weight * total + 1e-9)


def rounding_offset(seed: int, epoch: int, source: int, total: int) -> int:
    """U in [0, total): the offset of source `source`'s systematic rounding this epoch (from SeedSequence)."""
    words = np.random.SeedSequence([seed, epoch, KEY_ROUNDING, source]).generate_state(2, np.uint64)
    return ((int(words[0]) << 64) | int(words[1])) % total


def _prefix(values: np.ndarray) -> np.ndarray:
    """(len + 1,) int64 running sums starting at 0."""
    out = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(values, out=out[1:])
    return out


def _floor_div(a: np.ndarray, mult: int, add: int, div: int) -> np.ndarray:
    """floor((a * mult + add) / div) exactly, for (m,) int64 a >= 0 and ints with a * mult + add >= 0, div > 0.

    int64 when a * mult + add fits, else Python integers a block at a time (sources above ~3e9 samples).
    """
    a = np.asarray(a, dtype=np.int64)
    if (int(a.max()) if a.size else 0) * mult + max(add, 0) < 2**63:
        return (a * mult + add) // div
    out = np.empty_like(a)
    for lo in range(0, len(a), _BLOCK):
        out[lo : lo + _BLOCK] = (a[lo : lo + _BLOCK].astype(object) * mult + add) // div
    return out


@dataclass(frozen=True)
class _Pass:
    """One pass over a source's shards: a whole copy, or the fractional subset. Arrays are (shards + 1,)."""

    first_chunk: int      # global number of the pass's first chunk
    first_id: int         # global id of the source's first sample
    source: int
    starts: np.ndarray    # sample offsets of the shards in the source (shared by the source's passes)
    runs: np.ndarray      # offsets of the runs in the pass: `starts` for a whole pass
    chunks: np.ndarray    # first chunk of each run, relative to first_chunk
    extra: int = 0        # a fractional pass: the samples it chooses, and its rounding offset U
    offset: int = 0

    @property
    def fractional(self) -> bool:
        """True for the pass that chooses a subset of the source's samples."""
        return self.extra > 0


class EpochOrder:
    """S for one (seed, epoch): see the module doc. Picklable; nothing in it grows with N.

    Raises ValueError for weights that do not match the sources or are not > 0, or chunk_size < 1.
    """

    def __init__(self, shard_counts: Sequence[Sequence[int]], weights: Sequence[float], chunk_size: int,
                 seed: int, epoch: int):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if len(shard_counts) != len(weights):
            raise ValueError(f"{len(weights)} weights for {len(shard_counts)} sources")
        self.chunk_size, self.seed, self.epoch = int(chunk_size), int(seed), int(epoch)
        self.passes = self._passes(shard_counts, weights)
        last = self.passes[-1] if self.passes else None
        self.num_chunks = last.first_chunk + int(last.chunks[-1]) if last else 0
        self.num_samples = sum(int(p.runs[-1]) for p in self.passes)
        self._pass_first = np.array([p.first_chunk for p in self.passes], dtype=np.int64)
        self._chunk_keys = round_keys(seed, epoch, KEY_CHUNKS)
        self._inside_keys = round_keys(seed, epoch, KEY_INSIDE)
        self._subset_keys = [round_keys(seed, epoch, KEY_SUBSET, s) for s in range(len(shard_counts))]
        self._short_slots, self._short_ends = self._short_chunks()

    def __len__(self) -> int:
        return self.num_samples

    def _passes(self, shard_counts: Sequence[Sequence[int]], weights: Sequence[float]) -> list[_Pass]:
        """The runs of this epoch, as passes over the sources' shards (prefix sums only)."""
        passes, chunk, first_id, c = [], 0, 0, self.chunk_size
        for s, (counts, weight) in enumerate(zip(shard_counts, weights)):
            if not weight > 0:
                raise ValueError(f"mixing weight {weight} of source {s} must be > 0")
            starts = _prefix(np.asarray(counts, dtype=np.int64))
            total = int(starts[-1])
            copies, extra = divmod(source_samples(total, weight), total) if total else (0, 0)
            whole_chunks = _prefix(-(-np.diff(starts) // c)) if copies else None
            for _ in range(copies):
                passes.append(_Pass(chunk, first_id, s, starts, starts, whole_chunks))
                chunk += int(whole_chunks[-1])
            if extra:
                offset = rounding_offset(self.seed, self.epoch, s, total)
                runs = _floor_div(starts, extra, offset, total)  # K(P_i): chosen before shard i
                passes.append(_Pass(chunk, first_id, s, starts, runs, _prefix(-(-np.diff(runs) // c)), extra, offset))
                chunk += int(passes[-1].chunks[-1])
            first_id += total
        return passes

    def _short_chunks(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots, ends), each (1 + short chunks,) int64 ascending: the slot of every chunk shorter than c and
        the position in S just after it, after a sentinel (slot -1, end 0). Built a block of shards at a time."""
        c, pieces = self.chunk_size, []
        for p in self.passes:
            for lo in range(0, len(p.runs) - 1, _BLOCK):
                sizes = np.diff(p.runs[lo : lo + _BLOCK + 1])
                short = np.flatnonzero(sizes % c)
                chunk = p.first_chunk + p.chunks[lo + short + 1] - 1  # a run's last chunk is its short one
                slot = permute(chunk, self.num_chunks, self._chunk_keys, inverse=True)
                pieces.append(slot * c + (c - sizes[short] % c))  # slot and shortfall in one sortable int64
        packed = np.concatenate([np.zeros(1, dtype=np.int64), *pieces])
        del pieces
        packed[1:].sort()
        slots = packed // c
        packed -= slots * c  # now the shortfalls
        np.cumsum(packed, out=packed)
        np.subtract((slots + 1) * c, packed, out=packed)  # end of each short chunk in S
        slots[0], packed[0] = -1, 0
        return slots, packed

    def _place(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slot, place inside the slot's chunk) of each position of S, by binary search over short chunks."""
        c = self.chunk_size
        before = np.searchsorted(self._short_ends, positions, side="right") - 1  # short chunks ending <= p
        rest = positions - self._short_ends[before]
        return self._short_slots[before] + 1 + rest // c, rest % c

    def _locate(self, chunks: np.ndarray) -> tuple[np.ndarray, ...]:
        """For (u,) chunk numbers, each (u,) int64: pass, run, first place in the run, length, and the id
        of the run's shard's first sample."""
        which = np.searchsorted(self._pass_first, chunks, side="right") - 1
        run, first, length, base = (np.empty_like(chunks) for _ in range(4))
        for b in np.unique(which).tolist():
            p, mine = self.passes[b], which == b
            local = chunks[mine] - p.first_chunk
            r = np.searchsorted(p.chunks, local, side="right") - 1
            first[mine] = (local - p.chunks[r]) * self.chunk_size
            run[mine], base[mine] = r, p.first_id + p.starts[r]
            length[mine] = np.minimum(self.chunk_size, p.runs[r + 1] - p.runs[r] - first[mine])
        return which, run, first, length, base

    def _chosen(self, p: _Pass, run: np.ndarray, place: np.ndarray) -> np.ndarray:
        """(m,) offsets in the source of the `place`-th sample the fractional pass `p` chose in shard `run`.

        That is chosen sample J = K(P_run) + place of the source. It lies in the stratum holding the smallest
        x with K(x + 1) > J (where systematic sampling would put it), at rank J - K(lo) among the stratum's
        chosen samples sorted(sigma(0..k-1)). O(m + strata * STRATUM) for the strata these places touch.
        """
        total = int(p.starts[-1])
        chosen = p.runs[run] + place  # J
        x = _floor_div(chosen + 1, total, -p.offset - 1, p.extra)  # ceil(((J+1)T - U) / extra) - 1
        lo = p.starts[run] + (x - p.starts[run]) // STRATUM * STRATUM
        strata, first, at = np.unique(lo, return_index=True, return_inverse=True)
        length = np.minimum(strata + STRATUM, p.starts[run[first] + 1]) - strata  # a shard's last stratum is short
        before = _floor_div(strata, p.extra, p.offset, total)  # K(lo)
        count = _floor_div(strata + length, p.extra, p.offset, total) - before
        begin = np.cumsum(count) - count  # where each stratum's chosen samples start in `picked`
        owner = np.repeat(np.arange(len(strata)), count)
        picked = permute(np.arange(len(owner)) - begin[owner], length[owner],
                         keys_for(self._subset_keys[p.source], strata[owner]))
        picked = np.sort(owner * STRATUM + picked) - owner * STRATUM  # ascending inside each stratum
        return strata[at] + picked[begin[at] + chosen - before[at]]

    def ids(self, positions: np.ndarray) -> np.ndarray:
        """(m,) int64 global sample ids at `positions` ((m,) ints in [0, N)) of S.

        O(m log shards) time and O(m) memory (fractional runs: O(m + chunks * STRATUM)). Raises IndexError
        for a position outside [0, N).
        """
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if positions.size and (positions.min() < 0 or positions.max() >= self.num_samples):
            raise IndexError(f"positions must lie in [0, {self.num_samples})")
        slot, place = self._place(positions)
        slots, at = np.unique(slot, return_inverse=True)  # a micro-batch spans a few chunks: permute those once
        chunks = permute(slots, self.num_chunks, self._chunk_keys)
        which, run, first, length, base = self._locate(chunks)
        inside = permute(place, length[at], keys_for(self._inside_keys, chunks[at]))
        offset = first[at] + inside  # (m,) place in the run
        out = base[at] + offset
        for b in np.unique(which).tolist():
            if self.passes[b].fractional:  # a place in its run is an index into the shard's chosen samples
                mine = which[at] == b
                out[mine] = self.passes[b].first_id + self._chosen(self.passes[b], run[at][mine], offset[mine])
        return out

    def runs(self) -> Iterator[np.ndarray]:
        """Every non-empty run's ids in order (shard order inside a run). O(N): for tests and inspection."""
        for p in self.passes:
            for r in range(len(p.runs) - 1):
                size = int(p.runs[r + 1] - p.runs[r])
                if size and p.fractional:
                    yield p.first_id + self._chosen(p, np.full(size, r), np.arange(size))
                elif size:
                    yield p.first_id + p.starts[r] + np.arange(size)
