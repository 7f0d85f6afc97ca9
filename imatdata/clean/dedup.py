"""Near duplicates: candidate pairs from 64-bit perceptual hashes, confirmed by a second look,
and grouped around one representative.

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
stays bounded however dense the hashes are. Identical hashes are best collapsed first,
because n copies of one hash are n^2/2 pairs.

A phash match alone is not a duplicate: on a million distinct product photos (white
backgrounds, centred objects) thousands of pairs of different pictures fall within 4 bits.
`confirm_pairs` takes a second look at each candidate through the pictures' *signatures*
(66 bytes each, made in the same decode as the phash by `checks._look`): an 8x8 luma
thumbnail and 4x4 chroma thumbnails, compared by `luma_residual` and `chroma_residual`.
`star_groups` then groups confirmed pairs around representatives without chaining: a group
is one representative and the images confirmed against it, never a neighbour's neighbour.

A crop or an overlaid line of text moves a phash past a few bits, so `confirmed_pairs` takes
candidates from two more places (`window_hashes`, made from phash's own 32x32 grey image):
the phashes of five slightly cropped windows of each image, searched against every whole
phash (`iter_cross_pairs`), and the phashes of its top and bottom halves, searched against
the same half of every other image at half the distance. A crop window's candidate is also
confirmed on that window's own signature (`crop_window_signatures`), under a stricter limit.

Grey objects on white pass the phash and the signatures more often than any other pair of
different pictures: their chroma is neutral and a small object is a few cells of an 8x8 luma.
So a confirmed candidate must also pass a third look, its *fine hashes* (`fine_hashes`: the
next octave of phash's DCT, 192 bits, for the whole picture and for each crop window).
What still passes at a million pictures, `close` decodes again for a fourth look.

This module is pure numpy: no images, no files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


def _bucket_lookup(keys: np.ndarray, sorted_keys: np.ndarray, width: int
                   ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """`lookup(q)`: where bucket q starts in `sorted_keys` and how many keys it holds."""
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
        return lookup

    def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo = np.searchsorted(sorted_keys, q, side="left")
        hi = np.searchsorted(sorted_keys, q, side="right")
        return lo.astype(np.int64), (hi - lo).astype(np.int64)
    return search


def _first_report(x: np.ndarray, plan: BlockPlan, b: int, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """For candidate pairs found through block `b` (`x`: their hashes XORed), the distances and
    which pairs to report: within `max_distance`, and not already reported through an earlier
    block (one whose bits differ by at most the plan's radius)."""
    dist = np.bitwise_count(x).astype(np.int64)
    ok = dist <= max_distance
    for e in range(b):
        bits = (x >> np.uint64(plan.starts[e])) & np.uint64((1 << plan.widths[e]) - 1)
        ok &= np.bitwise_count(bits) > plan.radius
    return dist, ok


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
        lookup = _bucket_lookup(keys, sorted_keys, width)
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
                dist, ok = _first_report(u[i] ^ u[j], plan, b, max_distance)
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
    This is phash-only grouping, chains included: clean groups with `confirmed_pairs` and
    `star_groups` instead; bench/clean.py times this as the plain index + union-find.
    """
    u = as_unsigned(hashes)
    uf = uf if uf is not None else UnionFind(u.size)
    uf.union(*equal_value_pairs(u))
    distinct, first = np.unique(u, return_index=True)
    for i, j, _ in iter_near_pairs(distinct, max_distance, blocks=blocks, chunk_pairs=chunk_pairs):
        uf.union(first[i], first[j])
    return uf


# --- more candidates: crop variants and half-image hashes ----------------------------------------

# A copy cropped by a few percent has the phash of its source cropped the same way, not the
# source's own: a 3% crop moves phash by 4-10 bits. So every image also hashes a few windows of
# itself, from the 32x32 grey phash resizes anyway (linear resampling of the window to 32x32,
# then phash's 8x8 DCT, as two small matrix products: ~8 us a window), and each window hash is
# searched against everyone's full phash. Trims are (left, top, right, bottom), fractions of the
# side: the four corner-anchored windows 2.5% in from two adjacent sides, and a centred one
# 1.25% in from each. Chosen on bench/dedup.py's crops (1-5% per axis, split at random between
# the two edges): with them 97.5% of the crops have a window within distance 4 of the copy, the
# full phash alone 66%; windows picked greedily did better on the pairs they were picked on
# and worse on others.
CROP_WINDOWS: tuple[tuple[float, float, float, float], ...] = (
    (0.025, 0.025, 0.0, 0.0), (0.0, 0.0, 0.025, 0.025), (0.025, 0.0, 0.0, 0.025),
    (0.0, 0.025, 0.025, 0.0), (0.0125, 0.0125, 0.0125, 0.0125))
# A watermark or line of text is a band across part of the picture: the half it is not in keeps
# its phash. The top and bottom halves are hashed the same way and each is searched against the
# same half of every other image, at half the --hash-distance (halves of unrelated product
# photos, white above or below the object, crowd more than whole pictures).
HALF_WINDOWS: tuple[tuple[float, float, float, float], ...] = ((0.0, 0.0, 0.0, 0.5), (0.0, 0.5, 0.0, 0.0))
LOOK_WINDOWS = CROP_WINDOWS + HALF_WINDOWS
N_WINDOWS = len(LOOK_WINDOWS)
_SIDE = 32


def _resample(a: float, b: float) -> np.ndarray:
    """(32, 32): samples of the window [a, b] (fractions of the side) of a 32-pixel line, by
    linear interpolation between pixel centres."""
    centres = np.clip((a + (np.arange(_SIDE) + 0.5) * (b - a) / _SIDE) * _SIDE - 0.5, 0, _SIDE - 1)
    lo = np.floor(centres).astype(np.int64)
    hi = np.minimum(lo + 1, _SIDE - 1)
    frac = centres - lo
    m = np.zeros((_SIDE, _SIDE))
    np.add.at(m, (np.arange(_SIDE), lo), 1 - frac)
    np.add.at(m, (np.arange(_SIDE), hi), frac)
    return m


def _window_matrices() -> tuple[np.ndarray, np.ndarray]:
    """Per window, the (8, 32) row and (32, 8) column matrices taking a 32x32 grey image to the
    8x8 low-frequency DCT-II coefficients (scipy's unnormalised type II) of the window."""
    n = np.arange(_SIDE)
    dct8 = 2.0 * np.cos(np.pi * np.arange(8)[:, None] * (2 * n[None, :] + 1) / (2 * _SIDE))
    rows = np.stack([dct8 @ _resample(t, 1 - b) for _, t, _, b in LOOK_WINDOWS])
    cols = np.stack([(dct8 @ _resample(left, 1 - r)).T for left, _, r, _ in LOOK_WINDOWS])
    return rows.astype(np.float32), np.ascontiguousarray(cols.astype(np.float32))


_WIN_ROWS, _WIN_COLS = _window_matrices()
_ROWS_STACKED = np.ascontiguousarray(_WIN_ROWS.reshape(-1, _SIDE))  # (8 N_WINDOWS, 32)


def window_hashes(y32: np.ndarray) -> np.ndarray:
    """phash of each of `LOOK_WINDOWS` of 32x32 grey images (what phash resizes to): (32, 32)
    in, (N_WINDOWS,) uint64 out, or (n, 32, 32) in, (n, N_WINDOWS) out; phash's bit order.
    The whole window would give phash itself. A batch costs a few matrix products in all,
    which is why pass 1 hashes the windows of a whole batch of images at once."""
    y = np.asarray(y32, np.float32)
    single = y.ndim == 2
    y = y.reshape(-1, _SIDE, _SIDE)
    rows = np.matmul(_ROWS_STACKED, y)  # (n, 8 N_WINDOWS, 32): every window's rows at once
    coeffs = np.empty((y.shape[0], N_WINDOWS, 64), np.float32)
    for w in range(N_WINDOWS):
        coeffs[:, w] = np.matmul(rows[:, 8 * w:8 * w + 8], _WIN_COLS[w]).reshape(-1, 64)
    ranked = np.sort(coeffs, axis=2)
    median = (ranked[..., 31] + ranked[..., 32]) * np.float32(0.5)
    bits = coeffs > median[..., None]
    out = np.packbits(bits, axis=2).view(">u8")[..., 0].astype(np.uint64)
    return out[0] if single else out


def iter_cross_pairs(queries: np.ndarray, hashes: np.ndarray, max_distance: int, *,
                     blocks: int | None = None, chunk_pairs: int = DEFAULT_CHUNK_PAIRS
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield `(q, j, distance)` chunks: every pair of a query position q and an index position
    j whose hashes differ in at most `max_distance` bits, each exactly once (q == j included).
    The same multi-index search as `iter_near_pairs`, with the buckets over `hashes` only."""
    qu, u = as_unsigned(queries), as_unsigned(hashes)
    n = int(u.size)
    if n == 0 or qu.size == 0:
        return
    if max(n, int(qu.size)) >= 2**31:
        raise ValueError("at most 2**31 - 1 hashes per search")
    m = blocks if blocks is not None else choose_blocks(max(n, int(qu.size)), max_distance)
    plan = block_plan(max_distance, m)
    if flips_per_block(plan) > MAX_FLIPS:
        raise ValueError(f"{m} blocks for distance {max_distance} means probing "
                         f"{flips_per_block(plan)} buckets per hash; use more blocks")
    qindex = np.arange(qu.size, dtype=np.int64)
    for b in range(plan.blocks):
        shift, width = np.uint64(plan.starts[b]), plan.widths[b]
        key_type = np.uint32 if width <= 32 else np.uint64
        mask = np.uint64((1 << width) - 1)
        keys = ((u >> shift) & mask).astype(key_type)
        qkeys = ((qu >> shift) & mask).astype(key_type)
        order = np.argsort(keys, kind="stable").astype(np.int64)
        lookup = _bucket_lookup(keys, keys[order], width)
        for flip in _flip_masks(width, plan.radius):
            lo, cnt = lookup(qkeys ^ key_type(flip))
            for q, j in _expand(qindex, lo, cnt, order, chunk_pairs):
                dist, ok = _first_report(qu[q] ^ u[j], plan, b, max_distance)
                if ok.any():
                    yield q[ok], j[ok], dist[ok]

# --- the second look -----------------------------------------------------------------------------

# Signature layout (bytes): luma min and max; the 8x8 luma thumbnail at 4 bits a cell between
# them, two cells a byte, row by row; the 4x4 Cb and then Cr thumbnails at 8 bits a cell.
SIG_Y_SIDE = 8
SIG_Y_LEVELS = 16
SIG_C_SIDE = 4
_Y_CELLS = SIG_Y_SIDE * SIG_Y_SIDE
_C_CELLS = 2 * SIG_C_SIDE * SIG_C_SIDE
SIG_BYTES = 2 + _Y_CELLS // 2 + _C_CELLS


def pack_signatures(luma: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """Signatures (n, SIG_BYTES) uint8 from 8x8 luma cells (n, 64) and Cb, Cr 4x4 cells
    (n, 32), both integers 0..255: the luma at 4 bits between its min and max (rounded half
    up), which lead, one byte each."""
    y = np.asarray(luma, np.int32)
    n = y.shape[0]
    lo, hi = y.min(axis=1, keepdims=True), y.max(axis=1, keepdims=True)
    span = np.maximum(hi - lo, 1)
    levels = (((y - lo) * (SIG_Y_LEVELS - 1) + span // 2) // span).astype(np.uint8)
    out = np.empty((n, SIG_BYTES), np.uint8)
    out[:, 0], out[:, 1] = lo[:, 0], hi[:, 0]
    out[:, 2:2 + _Y_CELLS // 2] = (levels[:, 0::2] << 4) | levels[:, 1::2]
    out[:, 2 + _Y_CELLS // 2:] = np.asarray(chroma).reshape(n, _C_CELLS)
    return out


# Crop windows get signatures of their own: a crop's thumbnails are those of its source's
# matching window, not of the whole source (on a photo whose colour changes fast everywhere a
# 5% crop changes every cell of the whole thumbnails). A window's luma cells are area means over
# the 32x32 luma, its chroma cells area means over a finer chroma grid (CHROMA_GRID^2 cells of
# the whole image), both rounded to integers as the whole signature's are.
CHROMA_GRID = 8


def _cell_weights(a: float, b: float, cells: int, side: int) -> np.ndarray:
    """(cells, side): area-mean weights from `side` pixels to `cells` equal cells spanning the
    window [a, b] (fractions of the side)."""
    edges = (a + (b - a) * np.arange(cells + 1) / cells) * side
    left = np.arange(side, dtype=np.float64)
    overlap = np.clip(np.minimum(left + 1, edges[1:, None]) - np.maximum(left, edges[:-1, None]), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def area_weights(side: int, cells: int) -> np.ndarray:
    """(cells, side): area means of `side` pixels over `cells` equal cells of the whole side."""
    return _cell_weights(0.0, 1.0, cells, side)


_CROP_Y_ROWS = np.stack([_cell_weights(t, 1 - b, SIG_Y_SIDE, _SIDE) for _, t, _, b in CROP_WINDOWS])
_CROP_Y_COLS = np.stack([_cell_weights(left, 1 - r, SIG_Y_SIDE, _SIDE).T for left, _, r, _ in CROP_WINDOWS])
_CROP_C_ROWS = np.stack([_cell_weights(t, 1 - b, SIG_C_SIDE, CHROMA_GRID) for _, t, _, b in CROP_WINDOWS])
_CROP_C_COLS = np.stack([_cell_weights(left, 1 - r, SIG_C_SIDE, CHROMA_GRID).T for left, _, r, _ in CROP_WINDOWS])


def crop_window_signatures(y32: np.ndarray, chroma_grid: np.ndarray) -> np.ndarray:
    """Signatures of each of `CROP_WINDOWS` (n, len(CROP_WINDOWS), SIG_BYTES) from the 32x32
    luma images (n, 32, 32) and chroma grids (n, 2, CHROMA_GRID, CHROMA_GRID)."""
    n = y32.shape[0]
    luma = np.matmul(np.matmul(_CROP_Y_ROWS, np.asarray(y32, np.float64)[:, None]), _CROP_Y_COLS)
    chroma = np.matmul(np.matmul(_CROP_C_ROWS[:, None], np.asarray(chroma_grid, np.float64)[:, None]),
                       _CROP_C_COLS[:, None])
    k = len(CROP_WINDOWS)
    return pack_signatures(np.floor(luma.reshape(n * k, _Y_CELLS) + 0.5),
                           np.floor(chroma.reshape(n * k, _C_CELLS) + 0.5)).reshape(n, k, SIG_BYTES)

# Brightness edits scale luma by a few percent; anything beyond this gain range is a different
# picture (a grey object and a black one of the same shape are an affine map apart).
_GAIN_RANGE = (0.8, 1.25)
_OFFSET_MAX = 40.0
# Noise floors, in grey levels squared: below them a difference is JPEG noise, and a flat
# image's residual is not divided by next to nothing.
_Y_FLOOR = 25.0
_C_FLOOR = 16.0
# A candidate is confirmed when luma residual / _Y_SCALE + chroma residual / _C_SCALE + phash
# distance / _D_SCALE <= 1: each term is 0 for identical pictures, and the farther apart the
# phashes, the closer the thumbnails must be. Chosen on bench/dedup.py's corpus, seed 0
# (24,000 distinct images, 1,000 copies per transform), among a logistic regression's fits
# and their neighbours, for the fewest chance pairs confirmed at recall >= 95% per transform.
# With candidates at distance <= 10 it finds every re-encode, 99.8% of resizes, 98.5% of
# brightness changes, 97.5% of overlays and 96.3% of crops, and confirms 12 of 36,411 chance
# pairs (0.03%); of the 1,062 within distance 4, 3 (0.3%).
_Y_SCALE = 0.64
_C_SCALE = 0.40
_D_SCALE = 30.0
# Candidate pairs confirmed per vectorised step: ~1 KB of temporaries per pair, so a step's
# arrays stay in cache (65,536 a step took twice the time: 1.18 against 0.62 us a pair).
CONFIRM_CHUNK = 4096


def unpack_signatures(signatures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(luma (n, 64) in grey levels, chroma (n, 32) centred on neutral) as float32."""
    sig = np.asarray(signatures, np.uint8).reshape(-1, SIG_BYTES)
    lo = sig[:, :1].astype(np.float32)
    step = (sig[:, 1:2].astype(np.float32) - lo) / (SIG_Y_LEVELS - 1)
    packed = sig[:, 2:2 + _Y_CELLS // 2]
    levels = np.empty((sig.shape[0], _Y_CELLS), np.float32)
    levels[:, 0::2] = packed >> 4
    levels[:, 1::2] = packed & 0x0F
    chroma = sig[:, 2 + _Y_CELLS // 2:].astype(np.float32) - 128.0
    return lo + levels * step, chroma


def luma_residual(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row pair, the part of `b` that `a` under a small gain and offset does not explain,
    relative to the larger of their contrasts: 0 for the same picture, ~1 for unrelated ones.

    Unlike a plain correlation, the gain is bounded, so a black and a light-grey object of one
    silhouette stay apart (greys within ~90 levels of each other do not: at 8x8, a 5% crop
    moves edges about as much); unlike a plain difference, the measure is relative, so a small
    object on a white background weighs as much as a full-frame photo."""
    am, bm = a.mean(1, keepdims=True), b.mean(1, keepdims=True)
    da, db = a - am, b - bm
    va, vb = (da * da).mean(1), (db * db).mean(1)
    gain = np.clip((da * db).mean(1) / (va + 1e-3), *_GAIN_RANGE)[:, None]
    offset = np.clip(bm - gain * am, -_OFFSET_MAX, _OFFSET_MAX)
    resid = ((b - gain * a - offset) ** 2).mean(1)
    return np.sqrt(resid / (np.maximum(va, vb) + _Y_FLOOR))


def chroma_residual(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row pair, the chroma difference relative to the larger chroma of the two (0 to ~1.4):
    a red and a brown object of one shape differ wholly, two grey ones not at all."""
    resid = ((a - b) ** 2).mean(1)
    return np.sqrt(resid / (np.maximum((a * a).mean(1), (b * b).mean(1)) + _C_FLOOR))


def confirm_pairs(sig_a: np.ndarray, sig_b: np.ndarray, distance: np.ndarray, limit: float = 1.0) -> np.ndarray:
    """Which candidate pairs (signatures row by row, and their phash distances) are the same
    picture: re-encoded, resized, slightly cropped, brightened or overlaid with text. The
    score must be at most `limit` (1; stricter for candidates from half-image hashes)."""
    ya, ca = unpack_signatures(sig_a)
    yb, cb = unpack_signatures(sig_b)
    score = (luma_residual(ya, yb) / _Y_SCALE + chroma_residual(ca, cb) / _C_SCALE
             + np.asarray(distance, np.float32) / _D_SCALE)
    return score <= limit


# --- the third look: fine hashes ----------------------------------------------------------------

# Two product shots on white whose objects are grey, of one size and in one place, pass the
# signatures (their 4x4 chroma is neutral, so only the 8x8 luma speaks, and at 8x8 a small
# object's shape is a few cells) and often the phash too: on bench/dedup.py's corpus of 100,000
# distinct pictures (seed 1, longer sides 96-160 px) every one of the 95 chance pairs the
# signatures confirmed was such a pair. The fine hash looks one octave finer: the 16x16
# lowest DCT-II coefficients of the 32x32 luma, less phash's 8x8 corner (which the phash has
# already compared), one bit each for above their median: 192 bits. Every row stores it for
# the whole picture and for each of its CROP_WINDOWS (the window resampled as `window_hashes`
# does), 6 x 24 bytes, ~16 us an image for a batch.
FINE_SIDE = 16
FINE_BITS = FINE_SIDE * FINE_SIDE - 64
FINE_BYTES = FINE_BITS // 8
N_FINE_VIEWS = 1 + len(CROP_WINDOWS)  # the whole picture, then each crop window
# A confirmed candidate is a duplicate only if its fine hashes are within this many bits of
# the 192. On 100,000 distinct pictures (as above) 45 leaves 1 of the 95 chance pairs (48: 3;
# the chance pairs' distances start 30, 46, 46, 50); on planted copies (bench/dedup.py, 5,000
# distinct pictures with 1,100 copies, at 256-512 px and at 96-160 px) it loses 1 overlay of
# 186 in each and nothing else: re-encodes reach 18 bits, resizes 28, crops, brightness
# changes and the other overlays 44. There is no margin on either side. Held out: among
# 1,000,000 distinct pictures (seed 2, 96-160 px) the signatures confirm 8,721 chance pairs
# and 337 pass at 45 (123 would at 36), 303 of them through a crop window only, the closest
# the same plain shape in one grey on white, told apart only by detail finer than 32x32; on
# 20,000 pictures with 3,963 copies (seed 3, 256-512 px) 45 loses 1 of the 585 crops the
# signatures confirm (36 would lose 11) and 2 of 669 overlays.
FINE_MAX_BITS = 45


def _fine_matrices() -> tuple[np.ndarray, np.ndarray]:
    """Per fine view, the (16, 32) row and (32, 16) column matrices taking a 32x32 grey image to
    the 16x16 low-frequency DCT-II coefficients of the view."""
    n = np.arange(_SIDE)
    dct = 2.0 * np.cos(np.pi * np.arange(FINE_SIDE)[:, None] * (2 * n[None, :] + 1) / (2 * _SIDE))
    rows = np.stack([dct] + [dct @ _resample(t, 1 - b) for _, t, _, b in CROP_WINDOWS])
    cols = np.stack([dct.T] + [(dct @ _resample(left, 1 - r)).T for left, _, r, _ in CROP_WINDOWS])
    return rows.astype(np.float32), np.ascontiguousarray(cols.astype(np.float32))


_FINE_ROWS, _FINE_COLS = _fine_matrices()
_FINE_ROWS_STACKED = np.ascontiguousarray(_FINE_ROWS.reshape(-1, _SIDE))  # (16 N_FINE_VIEWS, 32)


def fine_hashes(y32: np.ndarray) -> np.ndarray:
    """The fine hashes (n, N_FINE_VIEWS, FINE_BYTES) uint8 of 32x32 luma images (n, 32, 32):
    per view, the coefficients of the 16x16 DCT block outside its 8x8 corner, row by row, one
    bit each (MSB first) for above their median."""
    y = np.asarray(y32, np.float32).reshape(-1, _SIDE, _SIDE)
    n, half = y.shape[0], FINE_SIDE // 2
    rows = np.matmul(_FINE_ROWS_STACKED, y)  # (n, 16 N_FINE_VIEWS, 32): every view's rows at once
    band = np.empty((n, N_FINE_VIEWS, FINE_BITS), np.float32)
    for v in range(N_FINE_VIEWS):
        coeffs = np.matmul(rows[:, FINE_SIDE * v:FINE_SIDE * (v + 1)], _FINE_COLS[v])  # (n, 16, 16)
        band[:, v, :half * half] = coeffs[:, :half, half:].reshape(n, -1)
        band[:, v, half * half:] = coeffs[:, half:, :].reshape(n, -1)
    mid = FINE_BITS // 2
    ranked = np.partition(band, (mid - 1, mid), axis=2)
    median = (ranked[..., mid - 1] + ranked[..., mid]) * np.float32(0.5)
    return np.packbits(band > median[..., None], axis=2)


def fine_bits(fine_a: np.ndarray, fine_b: np.ndarray) -> np.ndarray:
    """How many bits apart the rows of two (k, FINE_BYTES) arrays of fine hashes are."""
    return np.unpackbits(np.bitwise_xor(fine_a, fine_b), axis=-1).sum(axis=-1, dtype=np.int64)


def fine_agree(fine_a: np.ndarray, fine_b: np.ndarray) -> np.ndarray:
    """Which rows of two (k, FINE_BYTES) arrays of fine hashes are within FINE_MAX_BITS."""
    return fine_bits(fine_a, fine_b) <= FINE_MAX_BITS


@dataclass
class PairCount:
    """How many candidate pairs the search found and how many the looks kept (`confirmed_pairs`
    counts those the second and third kept; `resolve` then leaves those the fourth kept)."""

    candidates: int = 0
    confirmed: int = 0


def confirmed_pairs(hashes: np.ndarray, signatures: np.ndarray, max_distance: int, *,
                    windows: np.ndarray | None = None, crop_signatures: np.ndarray | None = None,
                    fine: np.ndarray | None = None, chunk_pairs: int = DEFAULT_CHUNK_PAIRS,
                    count: PairCount | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs `(i, j, distance)`, i < j, whose signatures confirm a candidate pairing.

    Candidates are the pairs within `max_distance` of each other's phash and, given `windows`
    ((n, N_WINDOWS) from `window_hashes`) and `max_distance > 0`, also the pairs where one
    row's crop window is within `max_distance` of the other's phash, and those whose top or
    bottom halves are within `max_distance // 2`. A window value shared by more than
    `COMMON_WINDOW` rows (a flat or blank half) makes no candidates. Each candidate is confirmed
    on the two whole signatures with the distance that found it, under `WHOLE_LIMIT` (a half's
    candidates under the stricter `HALF_LIMIT`); a crop window's candidate also on that window's own signature
    against the other's whole one under `CROP_LIMIT`, given `crop_signatures` ((n,
    len(CROP_WINDOWS), SIG_BYTES) from `crop_window_signatures`). Given `fine` ((n,
    N_FINE_VIEWS, FINE_BYTES) from `fine_hashes`), a confirmed candidate must also have fine
    hashes that agree (`fine_agree`): q's crop window's against j's whole one for a crop
    window's candidate, the two whole ones for the others. `distance` is the smallest that
    found a confirmed pair.
    Candidates are confirmed chunk by chunk, so only confirmed pairs are ever held whole."""
    count = count if count is not None else PairCount()
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for qq, jj, dd, limit, ww in _candidates(hashes, max_distance, windows, chunk_pairs):
        for k in range(0, qq.size, CONFIRM_CHUNK):
            q, j, d = qq[k:k + CONFIRM_CHUNK], jj[k:k + CONFIRM_CHUNK], dd[k:k + CONFIRM_CHUNK]
            w = None if ww is None else ww[k:k + CONFIRM_CHUNK]
            ok = confirm_pairs(signatures[q], signatures[j], d, limit)
            if w is not None and crop_signatures is not None:
                ok |= confirm_pairs(crop_signatures[q, w], signatures[j], d, CROP_LIMIT)
            count.candidates += int(q.size)
            if fine is not None and ok.any():
                at = np.flatnonzero(ok)
                view = np.zeros(at.size, np.int64) if w is None else w[at] + 1
                ok[at] = fine_agree(fine[q[at], view], fine[j[at], 0])
            if ok.any():
                q, j, d = q[ok], j[ok], d[ok]
                parts.append((np.minimum(q, j), np.maximum(q, j), d))
    if not parts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    i, j, d = (np.concatenate(col) for col in zip(*parts))
    if windows is not None:  # a pair found by several generators is one pair
        order = np.lexsort((d, j, i))
        i, j, d = i[order], j[order], d[order]
        first = np.ones(i.size, bool)
        first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
        i, j, d = i[first], j[first], d[first]
    count.confirmed += int(i.size)
    return i, j, d


# A window hash shared by more rows than this is a blank or flat region, not a picture: it
# makes no candidates (n rows sharing one would be n^2 / 2 pairs).
COMMON_WINDOW = 64
# The confirmation score a candidate from the half-image hashes must not exceed (WHOLE_LIMIT
# for the others). Two product shots on white share a blank half far more often than a phash, and
# the signatures of such a pair often differ only where the objects do: on bench/dedup.py's
# corpus (16,000 distinct images, 2,100 planted copies) halves at 1 confirmed 6 chance pairs
# that nothing else proposed, at 0.75 none, while overlays found went from 98.8% to 98.5%.
HALF_LIMIT = 0.75
# The score a candidate from the phash or a crop window must not exceed on the whole
# signatures. The scales above make 1 the fitted boundary (seed 0); 0.9 is stricter: on bench
# corpora of seed 1 it confirms 21 chance pairs where 1 confirmed 37 (40,000 distinct pictures
# with longer sides of 96-160 px) and 6 where it confirmed 10 (20,000), and finds as many
# crops, 0.3-0.4% fewer overlays and up to 0.3% fewer brightness changes (10,000 and 8,000
# distinct pictures at 256-512 px with 2,026 and 1,634 planted copies).
WHOLE_LIMIT = 0.9
# The score a crop window's candidate must not exceed on the window's own signature (it is
# also tried on the whole one, under WHOLE_LIMIT). A second try at confirming is a second
# chance for a chance pair, hence stricter. On 26,000 distinct bench images (bench/dedup.py's
# seed 1 and the previous session's 16,000) the window signatures at 1 confirmed 4 chance
# pairs the whole ones did not, at 0.8 none; on photos whose colour changes fast everywhere,
# 5% crops split 4%/1% (found as candidates by a window) are confirmed 26 of 300 times on the
# whole signatures alone (87 under 1), 216 with the windows' at 0.8 and 260 at 1.
CROP_LIMIT = 0.8


def _candidates(hashes: np.ndarray, max_distance: int, windows: np.ndarray | None, chunk_pairs: int
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray | None]]:
    """Candidate pairs `(q, j, distance, limit, window)` from every generator in turn, q != j,
    with the confirmation score each must not exceed; for a crop window's candidates `window`
    says which of q's crop windows found j (else None)."""
    for i, j, d in iter_near_pairs(hashes, max_distance, chunk_pairs=chunk_pairs):
        yield i, j, d, WHOLE_LIMIT, None
    if windows is None or max_distance == 0:
        return
    windows = as_unsigned(windows)
    full = as_unsigned(hashes)
    # Crop windows against whole phashes (the copy lies inside its source): all windows of all
    # rows in one index, probed by the phashes (n probes rather than n * windows).
    n_crop = len(CROP_WINDOWS)
    crops = windows[:, :n_crop].ravel()
    use = np.flatnonzero(~_common(crops))
    for j, q, d in iter_cross_pairs(full, crops[use], max_distance, chunk_pairs=chunk_pairs):
        owner, window = np.divmod(use[q], n_crop)
        keep = owner != j
        yield owner[keep], j[keep], d[keep], WHOLE_LIMIT, window[keep]
    # Halves against the same half of the others.
    for k in range(n_crop, N_WINDOWS):
        col = windows[:, k]
        use = np.flatnonzero(~_common(col))
        for a, b, d in iter_near_pairs(col[use], max_distance // 2, chunk_pairs=chunk_pairs):
            yield use[a], use[b], d, HALF_LIMIT, None


def _common(values: np.ndarray) -> np.ndarray:
    """Which elements hold a value that more than COMMON_WINDOW elements hold."""
    uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return counts[inverse] > COMMON_WINDOW


def star_groups(n: int, i: np.ndarray, j: np.ndarray, rank: np.ndarray) -> list[np.ndarray]:
    """Groups of 0..n-1 around representatives, from the links `(i, j)`.

    Elements are taken in `rank` order (lowest first); one not yet in a group becomes a
    representative and takes every linked element not yet in a group. Each group holds its
    representative first and only elements linked to it directly: with links A-B and B-C, A's
    group never reaches C through B (C and A meet only in B's group, as B's lookalikes).
    Elements without a free link are in no group."""
    i = np.asarray(i, np.int64)
    j = np.asarray(j, np.int64)
    if i.size == 0:
        return []
    # Both directions of every link, sorted by source: the links of v are nbr[start[v]:start[v+1]].
    src, nbr = np.concatenate([i, j]), np.concatenate([j, i])
    order = np.argsort(src, kind="stable")
    src, nbr = src[order], nbr[order]
    start = np.searchsorted(src, np.arange(n + 1))
    taken = np.zeros(n, bool)
    groups: list[np.ndarray] = []
    linked = np.unique(src)
    for v in linked[np.argsort(np.asarray(rank)[linked], kind="stable")].tolist():
        if taken[v]:
            continue
        free = nbr[start[v]:start[v + 1]]
        free = np.unique(free[~taken[free]])
        if free.size:
            taken[v] = True
            taken[free] = True
            groups.append(np.concatenate([[v], free]))
    return groups
