"""The near-duplicate index against brute force, and the vectorised union-find."""

from __future__ import annotations

import numpy as np
import pytest

from imatdata.clean import dedup


def flip_bits(h: np.int64, bits: np.ndarray) -> np.int64:
    mask = np.uint64(0)
    for b in bits:
        mask |= np.uint64(1) << np.uint64(int(b))
    return (np.array([h]).view(np.uint64) ^ mask).view(np.int64)[0]


def planted_hashes(n: int, d: int, seed: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """`n` random hashes, then for every distance 0..d+1 several planted twins."""
    g = np.random.default_rng(seed)
    hashes = list(g.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n, dtype=np.int64))
    planted = []
    for dist in range(d + 2):
        for _ in range(6):
            src = int(g.integers(0, n))
            twin = flip_bits(hashes[src], g.choice(64, dist, replace=False))
            planted.append((src, len(hashes), dist))
            hashes.append(twin)
    return np.array(hashes, dtype=np.int64), planted


def as_set(pairs: tuple[np.ndarray, np.ndarray, np.ndarray]) -> set[tuple[int, int, int]]:
    i, j, d = pairs
    assert i.size == len(set(zip(i.tolist(), j.tolist()))), "a pair was reported twice"
    return set(zip(i.tolist(), j.tolist(), d.tolist()))


@pytest.mark.parametrize("d", [0, 1, 2, 4, 7])
@pytest.mark.parametrize("blocks", [None, "d+1", "few"])
def test_index_equals_brute_force(d: int, blocks: str | None) -> None:
    hashes, planted = planted_hashes(3000, d, seed=d)
    m = {None: None, "d+1": d + 1, "few": max(1, min(3, d // 2 + 1))}[blocks]
    found = as_set(dedup.near_pairs(hashes, d, blocks=m, chunk_pairs=997))
    reference = as_set(dedup.brute_force_pairs(hashes, d))
    assert found == reference
    for src, twin, dist in planted:
        hit = (min(src, twin), max(src, twin), dist) in found
        assert hit == (dist <= d), (src, twin, dist)


def test_clustered_hashes_and_equal_values() -> None:
    # Dense clusters (many hashes sharing blocks) and exact repeats stress bucket sizes.
    g = np.random.default_rng(7)
    centres = g.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 20, dtype=np.int64)
    hashes = np.array([flip_bits(centres[k % 20], g.choice(64, int(g.integers(0, 6)), replace=False))
                       for k in range(1500)], dtype=np.int64)
    hashes[::50] = hashes[0]
    for d in (3, 4, 6):
        assert as_set(dedup.near_pairs(hashes, d, chunk_pairs=1000)) == as_set(dedup.brute_force_pairs(hashes, d))


def test_block_plans_cover_the_hash() -> None:
    for d in range(0, 33):
        for n in (10, 10_000, 1_000_000):
            m = dedup.choose_blocks(n, d)
            plan = dedup.block_plan(d, m)
            assert sum(plan.widths) == 64 and plan.starts[0] == 0
            # Pigeonhole: m blocks each within `radius` bits cannot cover more than d errors.
            assert (plan.radius + 1) * plan.blocks > d
            assert dedup.flips_per_block(plan) <= dedup.MAX_FLIPS
    assert dedup.choose_blocks(1_000_000, 4) < 5  # wider blocks beat d+1 on a million hashes
    with pytest.raises(ValueError):
        list(dedup.iter_near_pairs(np.arange(10, dtype=np.int64), 12, blocks=1))


def test_hamming_and_popcount() -> None:
    assert int(dedup.hamming(-1, 0)) == 64
    assert int(dedup.hamming(np.int64(5), np.int64(6))) == 2
    assert dedup.popcount(np.array([0, 1, 3, -1], dtype=np.int64)).tolist() == [0, 1, 2, 64]


def reference_components(n: int, edges: list[tuple[int, int]]) -> list[set[int]]:
    adj: dict[int, set[int]] = {k: set() for k in range(n)}
    for a, b in edges:
        adj[a].add(b)
        adj[b].add(a)
    seen: set[int] = set()
    comps = []
    for start in range(n):
        if start in seen:
            continue
        stack, comp = [start], set()
        while stack:
            v = stack.pop()
            if v not in comp:
                comp.add(v)
                stack.extend(adj[v] - comp)
        seen |= comp
        comps.append(comp)
    return comps


def test_union_find_matches_graph_search() -> None:
    g = np.random.default_rng(3)
    n = 2000
    i, j = g.integers(0, n, 1500), g.integers(0, n, 1500)
    # A long chain in reverse order: the worst case for hooking by smaller root.
    chain = np.arange(1000, 1400)
    i = np.concatenate([i, chain[1:][::-1]])
    j = np.concatenate([j, chain[:-1][::-1]])
    uf = dedup.UnionFind(n)
    uf.union(i[:700], j[:700])
    uf.union(i[700:], j[700:])  # unions accumulate
    roots = uf.roots()
    got = sorted(sorted(map(int, c)) for c in dedup.groups_from_roots(roots, min_size=1))
    want = sorted(sorted(c) for c in reference_components(n, list(zip(i.tolist(), j.tolist()))))
    assert got == want
    assert all(roots[k] == min(c) for c in want for k in c)


def test_near_groups_links_transitively_and_collapses_repeats() -> None:
    base = np.int64(0x0123456789ABCDEF)
    a = flip_bits(base, np.array([0, 1, 2]))
    b = flip_bits(a, np.array([10, 11, 12]))  # 3 from a, 6 from base
    far = flip_bits(base, np.arange(20, 40))
    hashes = np.array([base, a, b, far, base, base], dtype=np.int64)
    uf = dedup.near_groups(hashes, 3)
    groups = [g.tolist() for g in dedup.groups_from_roots(uf.roots())]
    assert groups == [[0, 1, 2, 4, 5]]
    assert dedup.equal_value_pairs(np.array([b"x", b"y", b"x"], dtype="S1"))[1].tolist() == [2]


# --- the second look and star groups ----------------------------------------------------------


def signature(luma: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """Pack an 8x8 luma (0..255) and 2x4x4 chroma (0..255) as checks.image_signature does."""
    y = luma.astype(np.int64).ravel()
    lo, hi = int(y.min()), int(y.max())
    levels = ((y - lo) * 15 + max(hi - lo, 1) // 2) // max(hi - lo, 1)
    packed = (levels[0::2] << 4) | levels[1::2]
    return np.concatenate([[lo, hi], packed, chroma.astype(np.int64).ravel()]).astype(np.uint8)


def test_signature_layout_round_trips() -> None:
    g = np.random.default_rng(0)
    luma = np.arange(0, 256, 4).reshape(8, 8)[::-1]  # 64 levels, a whole range
    chroma = g.integers(0, 256, (2, 4, 4))
    sig = signature(luma, chroma)
    assert sig.size == dedup.SIG_BYTES
    y, c = dedup.unpack_signatures(sig)
    assert np.abs(y.reshape(8, 8) - luma).max() <= 252 / 15 / 2 + 1e-3  # half a 4-bit step
    assert np.array_equal(c.ravel() + 128, chroma.ravel())


def test_confirm_pairs_separates_shade_colour_and_layout() -> None:
    g = np.random.default_rng(1)
    scene = g.integers(30, 220, (8, 8))
    neutral = np.full((2, 4, 4), 128)
    red = np.stack([np.full((4, 4), 100), np.full((4, 4), 200)])
    base = signature(scene, neutral)
    same = [signature(np.clip(scene * 1.08, 0, 255), neutral),  # brighter
            signature(scene + g.integers(-4, 5, (8, 8)), neutral)]  # re-encode noise
    other = [signature(g.integers(30, 220, (8, 8)), neutral),  # another layout
             signature(scene, red),  # another colour
             signature(255 - scene, neutral)]  # inverted: no gain in range maps it
    sigs = np.stack(same + other)
    ok = dedup.confirm_pairs(np.repeat(base[None], len(sigs), 0), sigs, np.zeros(len(sigs)))
    assert ok.tolist() == [True, True, False, False, False]
    # The farther apart the phashes, the closer the thumbnails must be.
    near = dedup.confirm_pairs(base[None].repeat(2, 0), sigs[1:2].repeat(2, 0), np.array([0, 30]))
    assert near.tolist() == [True, False]


def test_confirmed_pairs_counts_candidates_and_keeps_the_confirmed() -> None:
    g = np.random.default_rng(2)
    neutral = np.full((2, 4, 4), 128)
    scenes = [g.integers(30, 220, (8, 8)) for _ in range(3)]
    sigs = np.stack([signature(scenes[0], neutral), signature(scenes[0] + 2, neutral), signature(scenes[1], neutral),
                     signature(scenes[2], neutral)])
    hashes = np.array([0, 1, 3, -1], dtype=np.int64)  # 0-1-2 within 2 bits, 3 far away
    count = dedup.PairCount()
    i, j, d = dedup.confirmed_pairs(hashes, sigs, 2, count=count)
    assert (count.candidates, count.confirmed) == (3, 1)
    assert (i.tolist(), j.tolist(), d.tolist()) == ([0], [1], [1])


def test_star_groups_never_chain() -> None:
    # 0-1-2-3 a chain, 4-5 a pair, 6 alone; rank by index: 0 takes 1, 2 takes 3.
    i, j = np.array([0, 1, 2, 4]), np.array([1, 2, 3, 5])
    groups = [g.tolist() for g in dedup.star_groups(7, i, j, np.arange(7))]
    assert groups == [[0, 1], [2, 3], [4, 5]]
    # Ranked middle first, 1 takes both its neighbours; 3 is left with no free link.
    rank = np.array([5, 0, 6, 1, 2, 3, 4])
    groups = [g.tolist() for g in dedup.star_groups(7, i, j, rank)]
    assert groups == [[1, 0, 2], [4, 5]]
    assert dedup.star_groups(3, np.empty(0, np.int64), np.empty(0, np.int64), np.arange(3)) == []


@pytest.mark.parametrize("d", [0, 2, 4, 7])
def test_cross_search_equals_brute_force(d: int) -> None:
    hashes, _ = planted_hashes(2000, d, seed=10 + d)
    g = np.random.default_rng(d)
    queries = hashes[g.choice(hashes.size, 700)].copy()
    queries[::2] = [flip_bits(q, g.choice(64, int(g.integers(0, d + 2)), replace=False)) for q in queries[::2]]
    found = [np.concatenate(c) for c in zip(*dedup.iter_cross_pairs(queries, hashes, d, chunk_pairs=997))]
    got = set(zip(*(x.tolist() for x in found))) if found else set()
    assert not found or len(got) == found[0].size, "a pair was reported twice"
    dist = dedup.hamming(queries[:, None], hashes[None, :])
    q, j = np.nonzero(dist <= d)
    assert got == set(zip(q.tolist(), j.tolist(), dist[q, j].tolist()))
    assert len(got) >= 700 // 2  # the planted ones at least: the test cannot pass empty


def test_window_hashes_batch_and_whole_window() -> None:
    g = np.random.default_rng(4)
    grey = (g.random((6, 32, 32)) * 255).astype(np.uint8)
    batch = dedup.window_hashes(grey)
    assert batch.shape == (6, dedup.N_WINDOWS) and batch.dtype == np.uint64
    assert all((dedup.window_hashes(grey[k]) == batch[k]).all() for k in range(6))
    # A window is the phash of that part of the picture: a smooth image cropped by the crop
    # window's trims hashes (almost) like the window.
    from PIL import Image

    cells = (np.random.default_rng(6).random((7, 7)) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(cells).resize((320, 320), Image.Resampling.BICUBIC), np.float64)

    def grey32(img: np.ndarray) -> np.ndarray:
        from PIL import Image
        return np.asarray(Image.fromarray(img.astype(np.uint8)).resize((32, 32), Image.Resampling.LANCZOS))

    from imatdata.clean.checks import phash_int64

    def phash(img: np.ndarray) -> np.int64:
        return np.int64(phash_int64(Image.fromarray(img.astype(np.uint8))))

    windows = dedup.window_hashes(grey32(smooth))
    for k, (left, top, right, bottom) in enumerate(dedup.CROP_WINDOWS):
        crop = smooth[round(320 * top):320 - round(320 * bottom), round(320 * left):320 - round(320 * right)]
        near, whole = dedup.hamming(windows[k].view(np.int64), phash(crop)), dedup.hamming(phash(smooth), phash(crop))
        assert near <= 2 < whole, (k, near, whole)


def test_confirmed_pairs_with_windows() -> None:
    # Row 1's phash is far from row 0's, but row 0's crop window is close to it (a crop);
    # rows 2 and 3 share a top half only; rows 4.. share one blank half (common: ignored).
    g = np.random.default_rng(5)
    n = 8 + dedup.COMMON_WINDOW
    hashes = g.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n, dtype=np.int64)
    windows = g.integers(0, 2**63, (n, dedup.N_WINDOWS), dtype=np.int64).view(np.uint64)
    windows[0, 2] = np.array([flip_bits(hashes[1], [3, 9])]).view(np.uint64)[0]
    top = len(dedup.CROP_WINDOWS)
    windows[3, top] = windows[2, top] ^ np.uint64(1)
    windows[4:, top + 1] = np.uint64(1) << np.uint64(63)
    sig = g.integers(0, 256, dedup.SIG_BYTES, dtype=np.uint8)
    signatures = np.tile(sig, (n, 1))  # every pair would be confirmed: the candidates decide
    count = dedup.PairCount()
    i, j, d = dedup.confirmed_pairs(hashes, signatures, 4, windows=windows, count=count)
    assert sorted(zip(i.tolist(), j.tolist(), d.tolist())) == [(0, 1, 2), (2, 3, 1)]
    assert count.confirmed == 2
    # At distance 0 only equal phashes are candidates.
    assert dedup.confirmed_pairs(hashes, signatures, 0, windows=windows)[0].size == 0
    # Without windows the crop and the half are not found.
    assert dedup.confirmed_pairs(hashes, signatures, 4)[0].size == 0


def test_crop_window_signatures_are_the_windows_thumbnails() -> None:
    # A luma ramp across the columns and a chroma ramp down the rows: each window's cells are
    # the means of its own part of the image.
    y32 = np.tile(np.arange(32, dtype=np.float64) * 8, (1, 32, 1))
    grid = np.zeros((1, 2, dedup.CHROMA_GRID, dedup.CHROMA_GRID))
    grid[0, 0] = (np.arange(dedup.CHROMA_GRID, dtype=np.float64) * 16)[:, None]
    grid[0, 1] = 128.0
    sigs = dedup.crop_window_signatures(y32, grid)
    assert sigs.shape == (1, len(dedup.CROP_WINDOWS), dedup.SIG_BYTES)
    for k, (left, top, right, bottom) in enumerate(dedup.CROP_WINDOWS):
        luma, chroma = dedup.unpack_signatures(sigs[0, k])
        cells = left + (1 - left - right) * (np.arange(8) + 0.5) / 8  # cell centres, fractions of the width
        assert np.abs(luma.reshape(8, 8)[0] - (cells * 32 - 0.5) * 8).max() <= 8.5, k  # a 4-bit step of 0..248
        rows = top + (1 - top - bottom) * (np.arange(4) + 0.5) / 4
        want = (rows * dedup.CHROMA_GRID - 0.5) * 16
        assert np.abs(chroma.reshape(2, 4, 4)[0, :, 0] + 128 - want).max() <= 1.0, k
        assert np.all(chroma.reshape(2, 4, 4)[1] == 0)
    # A window's signature differs from the whole image's by the crop: the left-trimmed window
    # starts brighter.
    assert dedup.unpack_signatures(sigs[0, 0])[0][0, 0] > dedup.unpack_signatures(sigs[0, 1])[0][0, 0]


def test_crop_candidates_are_confirmed_on_the_window_signature() -> None:
    g = np.random.default_rng(9)
    n = 6
    hashes = g.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n, dtype=np.int64)
    windows = g.integers(0, 2**63, (n, dedup.N_WINDOWS), dtype=np.int64).view(np.uint64)
    # Row 0's crop window 3 finds row 1, row 2's window 1 finds row 3, rows 4 and 5 share a top half.
    windows[0, 3] = np.array([flip_bits(hashes[1], [5])]).view(np.uint64)[0]
    windows[2, 1] = np.array([flip_bits(hashes[3], [7])]).view(np.uint64)[0]
    top = len(dedup.CROP_WINDOWS)
    windows[5, top] = windows[4, top]
    scenes = [g.integers(0, 256, (8, 8)) for _ in range(n)]
    chroma = np.full((2, 4, 4), 128)
    signatures = np.stack([signature(s, chroma) for s in scenes])  # wholes all unrelated
    crop = np.stack([np.stack([signature(g.integers(0, 256, (8, 8)), chroma) for _ in dedup.CROP_WINDOWS])
                     for _ in range(n)])
    crop[0, 3] = signatures[1]  # row 0's window 3 is row 1's picture
    # Row 2's window 1: like row 3, but not like enough (a score between CROP_LIMIT and 1).
    other = g.integers(0, 256, (8, 8))
    for mix in np.linspace(0, 1, 101):
        crop[2, 1] = signature(np.round(scenes[3] * (1 - mix) + other * mix), chroma)
        if window_score(crop[2, 1], signatures[3], 1) > dedup.CROP_LIMIT:
            break
    crop[4, :] = signatures[5]  # row 4's crop windows look like row 5, but only their halves meet
    found = dedup.confirmed_pairs(hashes, signatures, 4, windows=windows, crop_signatures=crop)
    assert list(zip(found[0].tolist(), found[1].tolist(), found[2].tolist())) == [(0, 1, 1)]
    assert dedup.CROP_LIMIT < window_score(crop[2, 1], signatures[3], 1) <= dedup.WHOLE_LIMIT  # a whole pair's pass
    assert dedup.confirmed_pairs(hashes, signatures, 4, windows=windows)[0].size == 0


def window_score(a: np.ndarray, b: np.ndarray, distance: int) -> float:
    ya, ca = dedup.unpack_signatures(a[None])
    yb, cb = dedup.unpack_signatures(b[None])
    return float(dedup.luma_residual(ya, yb)[0] / dedup._Y_SCALE + dedup.chroma_residual(ca, cb)[0] / dedup._C_SCALE
                 + distance / dedup._D_SCALE)


def test_fine_hashes_are_the_dct_band_outside_phashs_corner() -> None:
    # The whole view against scipy's 2-D DCT-II of the 32x32, in float64: every bit agrees but
    # where a coefficient sits at the median (float32 inside).
    import scipy.fftpack

    g = np.random.default_rng(11)
    grey = g.random((40, 32, 32)) * 255
    fine = dedup.fine_hashes(grey)
    assert fine.shape == (40, dedup.N_FINE_VIEWS, dedup.FINE_BYTES) and dedup.FINE_BITS == 192
    block = scipy.fftpack.dct(scipy.fftpack.dct(grey, axis=1), axis=2)[:, :16, :16]
    band = np.concatenate([block[:, :8, 8:].reshape(40, -1), block[:, 8:, :].reshape(40, -1)], axis=1)
    want = np.packbits(band > np.median(band, axis=1, keepdims=True), axis=1)
    assert np.unpackbits(fine[:, 0] ^ want).sum() <= 2
    assert all((dedup.fine_hashes(grey[k])[0] == fine[k]).all() for k in range(3))
    # A crop window's view is the fine hash of that part of the picture; the whole view is not.
    from PIL import Image

    cells = (np.random.default_rng(6).random((12, 12)) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(cells).resize((320, 320), Image.Resampling.BICUBIC))

    def grey32(img: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.LANCZOS), np.float64)

    views = dedup.fine_hashes(grey32(smooth))[0]
    for k, (left, top, right, bottom) in enumerate(dedup.CROP_WINDOWS):
        crop = smooth[round(320 * top):320 - round(320 * bottom), round(320 * left):320 - round(320 * right)]
        of_crop = dedup.fine_hashes(grey32(np.ascontiguousarray(crop)))[0, 0]
        near = np.unpackbits(views[k + 1] ^ of_crop).sum()
        whole = np.unpackbits(views[0] ^ of_crop).sum()
        assert near <= 6 and whole >= 24, (k, near, whole)


def test_confirmed_pairs_need_the_fine_hashes_to_agree() -> None:
    # Six rows whose signatures all agree: rows 0-1 a phash pair, rows 2-3 a crop window's pair
    # (row 2's window 4 finds row 3), rows 4-5 a phash pair whose fine hashes differ.
    g = np.random.default_rng(12)
    n = 6
    hashes = g.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n, dtype=np.int64)
    hashes[1], hashes[5] = flip_bits(hashes[0], [1]), flip_bits(hashes[4], [2])
    windows = g.integers(0, 2**63, (n, dedup.N_WINDOWS), dtype=np.int64).view(np.uint64)
    windows[2, 4] = np.array([hashes[3]]).view(np.uint64)[0]
    signatures = np.tile(g.integers(0, 256, dedup.SIG_BYTES, dtype=np.uint8), (n, 1))
    fine = g.integers(0, 256, (n, dedup.N_FINE_VIEWS, dedup.FINE_BYTES), dtype=np.uint8)
    fine[1, 0] = fine[0, 0]
    fine[2, 5] = fine[3, 0]  # row 2's window 4 (view 5) is row 3's picture; its whole view is not
    bits = np.unpackbits(fine[4, 0])
    bits[:dedup.FINE_MAX_BITS + 1] ^= 1  # one bit too many
    fine[5, 0] = np.packbits(bits)
    found = dedup.confirmed_pairs(hashes, signatures, 4, windows=windows, fine=fine)
    assert sorted(zip(found[0].tolist(), found[1].tolist())) == [(0, 1), (2, 3)]
    bits[0] ^= 1  # within the limit now
    fine[5, 0] = np.packbits(bits)
    fine[2, 5] = fine[2, 0]  # and the crop's window no longer matches
    found = dedup.confirmed_pairs(hashes, signatures, 4, windows=windows, fine=fine)
    assert sorted(zip(found[0].tolist(), found[1].tolist())) == [(0, 1), (4, 5)]
    assert dedup.confirmed_pairs(hashes, signatures, 4, windows=windows)[0].size == 3  # no fine look
