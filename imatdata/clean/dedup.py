"""Near-duplicate search over 64-bit perceptual hashes, and grouping with union-find.

`iter_near_pairs` finds every pair of hashes within Hamming distance `d` without comparing
all pairs, by multi-index hashing (Norouzi, Punjani & Fleet, 2012):

* The 64 bits are cut into `m` contiguous blocks. If two hashes differ in at most `d` bits,
  then by pigeonhole at least one block differs in at most `r = d // m` bits. With
  `m = d + 1` that block is identical (`r = 0`); with fewer, wider blocks it is within a
  small radius, probed by flipping up to `r` of its bits.
* For each block the hashes are bucketed by that block's value (a counting sort), every
  hash probes the buckets at block distance at most `r`, and each candidate pair is verified
  on all 64 bits with a popcount. A pair found through an earlier block is not reported
  again, so every pair within `d` is reported exactly once and none is missed.
* `m` is chosen by a cost model: `d + 1` narrow blocks give huge buckets on a million
  hashes (N^2 / 2^13 candidates per block for d = 4), three 21-bit blocks probed at radius 1
  give ~2,000 times fewer candidates for 22 cheap probes per hash.

Everything is vectorised with numpy and streamed in chunks of candidate pairs, so memory
stays bounded however dense the hashes are. Identical hashes are best collapsed first
(`near_groups` does), because n copies of one hash are n^2/2 pairs.

This module is pure numpy: no images, no files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations
from math import comb

import numpy as np

HASH_BITS = 64
# Above this many bits a block's bucket table (2^bits entries) gets too big; such blocks
# are looked up by binary search in the sorted keys instead.
_TABLE_MAX_BITS = 24
# Candidate pairs verified per vectorised step: bounds memory (~100 bytes per pair).
DEFAULT_CHUNK_PAIRS = 2_000_000
# Probing more bit-flip masks per block than this costs more than narrower blocks would.
MAX_FLIPS = 4096


def as_unsigned(hashes: np.ndarray | int) -> np.ndarray:
    """Hashes as uint64; signed int64 phash values are reinterpreted bit for bit."""
    arr = np.asarray(hashes)
    if arr.dtype == np.uint64:
        return arr
    return arr.astype(np.int64).view(np.uint64)


def popcount(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each element (int64 out)."""
    return np.bitwise_count(as_unsigned(x)).astype(np.int64)


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Hamming distance between 64-bit hashes, elementwise."""
    return popcount(as_unsigned(a) ^ as_unsigned(b))


@dataclass(frozen=True)
class BlockPlan:
    """How the 64 bits are cut: block `k` is bits `starts[k] .. starts[k] + widths[k] - 1`."""

    starts: tuple[int, ...]
    widths: tuple[int, ...]
    radius: int

    @property
    def blocks(self) -> int:
        return len(self.widths)


def block_plan(max_distance: int, blocks: int) -> BlockPlan:
    """Cut 64 bits into `blocks` contiguous blocks as equal as possible."""
    if not 1 <= blocks <= HASH_BITS:
        raise ValueError(f"blocks must be between 1 and {HASH_BITS}")
    base, extra = divmod(HASH_BITS, blocks)
    widths = tuple(base + (1 if k < extra else 0) for k in range(blocks))
    starts = tuple(int(s) for s in np.cumsum((0,) + widths[:-1]))
    return BlockPlan(starts=starts, widths=widths, radius=max_distance // blocks)


def flips_per_block(plan: BlockPlan) -> int:
    """How many bucket probes each hash makes in the widest block."""
    return sum(comb(max(plan.widths), t) for t in range(plan.radius + 1))


def choose_blocks(n: int, max_distance: int) -> int:
    """The block count with the lowest estimated cost for `n` uniformly spread hashes.

    Cost = probes (n per flip mask per block) + candidates verified (n^2 * flips / 2^width
    / 2 per block, weighted double because each is gathered and popcounted) + a fixed
    overhead per probe pass, which dominates for small n.
    """
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"max_distance must be between 0 and {HASH_BITS - 1}")
    best_m, best_cost = max_distance + 1, float("inf")
    for m in range(1, min(max_distance + 1, HASH_BITS) + 1):
        plan = block_plan(max_distance, m)
        width = min(plan.widths)
        flips = flips_per_block(plan)
        if flips > MAX_FLIPS:
            continue
        probes = m * n * flips
        candidates = m * n * n * flips / 2.0 ** (width + 1)
        # Each probe is a handful of numpy calls: a fixed overhead worth ~20k element ops.
        cost = probes + 2.0 * candidates + 20_000.0 * m * flips
        if cost < best_cost:
            best_m, best_cost = m, cost
    return best_m


def _flip_masks(width: int, radius: int) -> list[int]:
    """Every bit mask of `width` bits with at most `radius` bits set (0 first)."""
    masks = [0]
    for t in range(1, radius + 1):
        for bits in combinations(range(width), t):
            masks.append(sum(1 << b for b in bits))
    return masks


def _expand(src: np.ndarray, lo: np.ndarray, cnt: np.ndarray, order: np.ndarray,
            chunk_pairs: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For each i = src[k], the partners order[lo[k] : lo[k] + cnt[k]], in bounded chunks."""
    keep = cnt > 0
    src, lo, cnt = src[keep], lo[keep], cnt[keep]
    if src.size == 0:
        return
    csum = np.cumsum(cnt)
    start = 0
    while start < src.size:
        before = int(csum[start - 1]) if start else 0
        end = int(np.searchsorted(csum, before + chunk_pairs, side="right"))
        end = max(end, start + 1)
        c = cnt[start:end]
        total = int(c.sum())
        first = np.cumsum(c) - c
        pos = np.repeat(lo[start:end] - first, c) + np.arange(total, dtype=np.int64)
        yield np.repeat(src[start:end], c), order[pos]
        start = end


def iter_near_pairs(hashes: np.ndarray, max_distance: int, *, blocks: int | None = None,
                    chunk_pairs: int = DEFAULT_CHUNK_PAIRS
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield `(i, j, distance)` chunks: every pair of positions i < j whose hashes differ in
    at most `max_distance` bits, each exactly once (pairs of equal hashes included)."""
    u = as_unsigned(hashes)
    n = int(u.size)
    if n < 2:
        return
    m = blocks if blocks is not None else choose_blocks(n, max_distance)
    plan = block_plan(max_distance, m)
    if flips_per_block(plan) > MAX_FLIPS:
        raise ValueError(f"{m} blocks for distance {max_distance} means probing "
                         f"{flips_per_block(plan)} buckets per hash; use more blocks")
    index = np.arange(n, dtype=np.int64)
    if n >= 2**31:
        raise ValueError("at most 2**31 - 1 hashes per search")
    for b in range(plan.blocks):
        shift, width = np.uint64(plan.starts[b]), plan.widths[b]
        key_type = np.uint32 if width <= 32 else np.uint64
        keys = ((u >> shift) & np.uint64((1 << width) - 1)).astype(key_type)
        order = np.argsort(keys, kind="stable").astype(np.int64)
        sorted_keys = keys[order]
        if width <= _TABLE_MAX_BITS:
            counts = np.bincount(keys, minlength=1 << width)
            # (start, count) side by side in one 8-byte cell: one memory access per lookup.
            cells = np.empty((1 << width, 2), dtype=np.int32)
            cells[:, 1] = counts
            cells[:, 0] = np.cumsum(counts) - counts
            table = cells.view(np.int64).ravel()

            def lookup(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                found = table[q.astype(np.intp)].view(np.int32).reshape(-1, 2)
                return found[:, 0].astype(np.int64), found[:, 1].astype(np.int64)
        else:
            def lookup(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                lo = np.searchsorted(sorted_keys, q, side="left")
                hi = np.searchsorted(sorted_keys, q, side="right")
                return lo.astype(np.int64), (hi - lo).astype(np.int64)

        for flip in _flip_masks(width, plan.radius):
            if flip == 0:
                # Same bucket: each hash pairs with those after it in the sorted order.
                lo, cnt = lookup(sorted_keys)
                pos = np.arange(n, dtype=np.int64)
                pairs = _expand(order, pos + 1, lo + cnt - pos - 1, order, chunk_pairs)
            else:
                # Buckets `key` and `key ^ flip`: probe only from the smaller key, so the
                # pair is generated once.
                probe = keys ^ key_type(flip)
                up = probe > keys
                lo, cnt = lookup(probe[up])
                pairs = _expand(index[up], lo, cnt, order, chunk_pairs)
            for i, j in pairs:
                x = u[i] ^ u[j]
                dist = np.bitwise_count(x).astype(np.int64)
                ok = dist <= max_distance
                # A pair whose earlier block is within the radius was reported there.
                for e in range(b):
                    bits = (x >> np.uint64(plan.starts[e])) & np.uint64((1 << plan.widths[e]) - 1)
                    ok &= np.bitwise_count(bits) > plan.radius
                if ok.any():
                    i, j, dist = i[ok], j[ok], dist[ok]
                    yield np.minimum(i, j), np.maximum(i, j), dist


def near_pairs(hashes: np.ndarray, max_distance: int, *, blocks: int | None = None,
               chunk_pairs: int = DEFAULT_CHUNK_PAIRS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs within `max_distance` as three arrays `(i, j, distance)`, i < j."""
    parts = list(iter_near_pairs(hashes, max_distance, blocks=blocks, chunk_pairs=chunk_pairs))
    if not parts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    return tuple(np.concatenate(col) for col in zip(*parts))  # type: ignore[return-value]


def brute_force_pairs(hashes: np.ndarray, max_distance: int, *, rows_per_step: int = 256
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The quadratic reference: compare every hash with every later one."""
    u = as_unsigned(hashes)
    out_i, out_j, out_d = [], [], []
    for start in range(0, u.size, rows_per_step):
        block = u[start:start + rows_per_step]
        dist = np.bitwise_count(block[:, None] ^ u[None, :]).astype(np.int64)
        ii, jj = np.nonzero(dist <= max_distance)
        ii = ii + start
        later = jj > ii
        out_i.append(ii[later])
        out_j.append(jj[later])
        out_d.append(dist[ii[later] - start, jj[later]])
    if not out_i:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    return (np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64),
            np.concatenate(out_d).astype(np.int64))


class UnionFind:
    """Disjoint sets over 0..n-1 with vectorised unions.

    `union(i, j)` merges whole arrays of pairs at once: each round hooks the larger of two
    roots under the smaller (`np.minimum.at`) and then compresses paths by pointer jumping,
    until every pair shares a root. Parents only ever point to smaller indices, so there are
    no cycles, and each root is the smallest member of its set.
    """

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def _compress(self) -> None:
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        self.parent = parent

    def union(self, i: np.ndarray, j: np.ndarray) -> None:
        i = np.asarray(i, dtype=np.int64)
        j = np.asarray(j, dtype=np.int64)
        while i.size:
            self._compress()
            ri, rj = self.parent[i], self.parent[j]
            differ = ri != rj
            if not differ.any():
                break
            i, j, ri, rj = i[differ], j[differ], ri[differ], rj[differ]
            np.minimum.at(self.parent, np.maximum(ri, rj), np.minimum(ri, rj))
        self._compress()

    def roots(self) -> np.ndarray:
        """The root (smallest member) of each element's set."""
        self._compress()
        return self.parent.copy()


def groups_from_roots(roots: np.ndarray, min_size: int = 2) -> list[np.ndarray]:
    """Members of each set with at least `min_size` members, in ascending order."""
    roots = np.asarray(roots)
    if min_size > 1:
        # Most elements of a real dataset are singletons: drop them before splitting, so a
        # million rows do not become a million little arrays.
        size = np.bincount(roots, minlength=roots.size)
        members = np.flatnonzero(size[roots] >= min_size)
    else:
        members = np.arange(roots.size)
    order = members[np.argsort(roots[members], kind="stable")]
    bounds = np.flatnonzero(np.diff(roots[order])) + 1
    return [g for g in np.split(order, bounds) if g.size >= min_size]


def equal_value_pairs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (first, other) linking every element to the first element with the same value:
    enough edges to put all equal values in one set."""
    values = np.asarray(values)
    if values.size < 2:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty.copy()
    order = np.argsort(values, kind="stable").astype(np.int64)
    sorted_values = values[order]
    same = sorted_values[1:] == sorted_values[:-1]
    return order[:-1][same], order[1:][same]


def near_groups(hashes: np.ndarray, max_distance: int, *, blocks: int | None = None,
                chunk_pairs: int = DEFAULT_CHUNK_PAIRS, uf: UnionFind | None = None) -> UnionFind:
    """Union every pair of hashes within `max_distance` (transitively) into one set.

    Identical hashes are collapsed first, so a placeholder served 10,000 times costs one
    hash in the index rather than fifty million pairs. Pass `uf` to add to existing sets.
    """
    u = as_unsigned(hashes)
    uf = uf if uf is not None else UnionFind(u.size)
    uf.union(*equal_value_pairs(u))
    distinct, first = np.unique(u, return_index=True)
    for i, j, _ in iter_near_pairs(distinct, max_distance, blocks=blocks, chunk_pairs=chunk_pairs):
        uf.union(first[i], first[j])
    return uf
