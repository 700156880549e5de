"""Keyed bijections on [0, n), computed one element at a time: a shuffle that is never stored.

    from vlm.data.permutation import permute, round_keys
    keys = round_keys(42, 0, 7)                        # Keys from (seed, epoch, purpose)
    items = permute(np.arange(5), 10**9, keys)           # what sits at places 0..4 of a shuffle of 10^9 items
    places = permute(items, 10**9, keys, inverse=True)   # == arange(5)

The bijection is an unbalanced Feistel network on the b = max(2, bit_length(n - 1)) bits of an index, made
a bijection of [0, n) by cycle walking: a value that lands in [n, 2^b) is encrypted again until it lands in
[0, n) (Black & Rogaway, "Ciphers with arbitrary finite domains", CT-RSA 2002, section 3). Each round XORs
one half of the bits with a keyed hash of the other half, so it is undone by the same XOR (Luby & Rackoff,
"How to construct pseudorandom permutations from pseudorandom functions", SIAM J. Comput. 1988, for why a
few such rounds of good round functions look like a random permutation; ROUNDS = 6 is above their 4). The
round function is multiply-shift hashing (see `_feistel`); mix64, splitmix64's output function, spreads one
key schedule into a family (`keys_for`). Since 2^b < 2n for n > 2, a walk takes under 2 passes on average.

Everything is uint64 arithmetic that wraps, so the same (n, keys) give the same bijection on every machine.
Work and memory are O(len(x)): nothing depends on n beyond its bit length.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

ROUNDS = 6
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_POWERS_OF_TWO = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function (Steele, Lea & Flood 2014): uint64 array -> uint64 array, same shape.

    A bijection of 64-bit words whose every output bit depends on every input bit; used as a keyed hash.
    """
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


class Keys(NamedTuple):
    """Round keys of one bijection, or of one bijection per element: `xor` (ROUNDS,) or (ROUNDS, m) uint64,
    `mult` (ROUNDS,) odd uint64 multipliers."""

    xor: np.ndarray
    mult: np.ndarray


def round_keys(*words: int) -> Keys:
    """The round keys of the bijection named by non-negative integers (e.g. seed, epoch, purpose).

    Drawn with numpy's SeedSequence, whose output for given words is fixed by its documented algorithm, so
    every rank and process derives the same keys. Raises ValueError for negative words.
    """
    if any(int(w) < 0 for w in words):
        raise ValueError(f"key words must be >= 0, got {words}")
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2 * ROUNDS, np.uint64)
    return Keys(state[:ROUNDS], state[ROUNDS:] | np.uint64(1))


def keys_for(keys: Keys, item: int | np.ndarray) -> Keys:
    """The key schedule of bijection number `item` of a family (an int, or (m,) ints for one per element):
    the XOR keys of `keys` XORed with mix64(item * golden ratio), splitmix64's spacing of its states.
    xor is (ROUNDS,) for an int item, (ROUNDS, m) for an array; the multipliers are shared."""
    flat = np.asarray(item, dtype=np.int64).reshape(-1).astype(np.uint64)
    spread = mix64(flat * _GOLDEN)
    if np.ndim(item) == 0:
        return Keys(keys.xor ^ spread[0], keys.mult)
    return Keys(keys.xor[:, None] ^ spread[None, :], keys.mult)


def _bits(n: int | np.ndarray) -> int | np.ndarray:
    """Bits of the Feistel domain for [0, n): bit_length(n - 1), at least 2 so both halves have a bit (n <= 2
    then walks a domain of 4). Exact integer arithmetic, so no machine can round differently."""
    if np.ndim(n) == 0:
        return max(2, (int(n) - 1).bit_length())
    top = np.asarray(n, dtype=np.int64).astype(np.uint64) - np.uint64(1)
    return np.maximum(np.searchsorted(_POWERS_OF_TWO, top, side="right").astype(np.uint64), np.uint64(2))


def _feistel(x: np.ndarray, lo_bits, hi_bits, keys: Keys, inverse: bool) -> np.ndarray:
    """One pass of the network over b = lo_bits + hi_bits bits of x ((m,) uint64; bits np.uint64 scalars
    or (m,) arrays, both halves >= 1 bit).

    Even rounds XOR the low half with a hash of the high half, odd rounds the reverse. The hash with a w-bit
    output is multiply-shift, the top w bits of (v ^ xor_key) * multiplier mod 2^64 (Dietzfelbinger et al.,
    "A reliable randomized algorithm for the closest-pair problem", J. Algorithms 1997): four array
    operations a round.
    """
    lo_shift, hi_shift = np.uint64(64) - lo_bits, np.uint64(64) - hi_bits
    hi, lo = x >> lo_bits, x & ((np.uint64(1) << lo_bits) - np.uint64(1))
    for r in range(ROUNDS - 1, -1, -1) if inverse else range(ROUNDS):
        if r % 2 == 0:
            lo ^= ((hi ^ keys.xor[r]) * keys.mult[r]) >> lo_shift
        else:
            hi ^= ((lo ^ keys.xor[r]) * keys.mult[r]) >> hi_shift
    return (hi << lo_bits) | lo


def permute(x: np.ndarray, n: int | np.ndarray, keys: Keys, inverse: bool = False) -> np.ndarray:
    """pi(x) (or pi^-1(x) with `inverse`) for each element of x, pi the keyed bijection of [0, n).

    x: (m,) ints in [0, n); n: an int >= 1 or an (m,) array of them (one domain per element); keys: from
    `round_keys`, or from `keys_for` (one bijection per element). Returns (m,) int64. O(m) work per Feistel
    pass; cycle walking repeats the pass only for the elements still outside [0, n), under 2 passes each on
    average. Raises ValueError if an element of x is outside its [0, n).
    """
    x = np.asarray(x, dtype=np.int64).reshape(-1)
    if x.size and (x.min() < 0 or np.any(x >= n)):
        raise ValueError("permute: every x must lie in [0, n)")
    bits = _bits(n)
    if np.ndim(n) == 0:
        lo_bits, hi_bits = np.uint64((bits + 1) // 2), np.uint64(bits // 2)
        limit = np.uint64(n)
    else:
        lo_bits = (bits + np.uint64(1)) >> np.uint64(1)
        hi_bits, limit = bits - lo_bits, n.astype(np.uint64)
    out = _feistel(x.astype(np.uint64), lo_bits, hi_bits, keys, inverse)
    walking = out >= limit
    pending = np.flatnonzero(walking)
    while pending.size:  # cycle walking: encrypt again what fell in [n, 2^b), only those elements
        if np.ndim(n):
            lo_bits, hi_bits, limit = lo_bits[walking], hi_bits[walking], limit[walking]
        if keys.xor.ndim == 2:
            keys = Keys(keys.xor[:, walking], keys.mult)
        walked = _feistel(out[pending], lo_bits, hi_bits, keys, inverse)
        out[pending] = walked
        walking = walked >= limit
        pending = pending[walking]
    return out.astype(np.int64)
