"""Benchmark `imatdata clean`: hashing throughput and the near-duplicate search.

    .venv/bin/python bench/clean.py                 # both parts, default sizes
    .venv/bin/python bench/clean.py --images 4000 --hashes 1000000 --compare-blocks

Part 1 - hashing. Photo-like JPEGs at the sizes fetch stores (longer side <= 512 px) are
hashed three ways: clean's `hash_batch` in this process (JPEG `draft()` + phash), the plain
baseline (full decode + `imagehash.phash`), and the whole `clean` command over a raw root
with 1 worker and with every core. Rates are given per wall second and per CPU second: on
a shared machine the CPU-second figure is the one that says what a core can do.
It also shows how many bits the draft-decoded phash differs from the full-decode one.

Part 2 - near-duplicate search over N random 64-bit hashes with planted pairs at every
distance 0..d (must all be found: recall 100%) and at d+1 (must not be). Compared with the
quadratic scan, timed on a slice of rows against all N and extrapolated to N^2/2 pairs.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from imatsample import photo_corpus
from imatsample.shards import manifest_row, write_shards
from PIL import Image

from imatdata import clean as clean_mod
from imatdata.clean import dedup
from imatdata.manifest import RAW_SCHEMA


def photos(n: int, seed: int) -> list[bytes]:
    return list(photo_corpus(n, seed=seed, min_side=400, max_side=512, pool=64))


def timed(fn, *args, **kwargs) -> tuple[object, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - w0, time.process_time() - c0


def bench_hashing(n_images: int, workers: int) -> None:
    print(f"== hashing: {n_images} photo-like JPEGs (longer side <= 512 px) ==")
    bodies = photos(n_images, seed=0)
    sizes = [Image.open(io.BytesIO(b)).size for b in bodies[:50]]
    print(f"mean body {np.mean([len(b) for b in bodies]) / 1024:.0f} KiB, e.g. {sizes[0][0]}x{sizes[0][1]}")

    rows, wall, cpu = timed(clean_mod.hash_batch, bodies, [False] * len(bodies))
    print(f"clean.hash_batch (draft + phash), 1 process: {n_images / wall:7.0f} images/s wall, "
          f"{n_images / cpu:7.0f} images/s per CPU second")

    def full_decode() -> list[int]:
        out = []
        for b in bodies:
            im = Image.open(io.BytesIO(b))
            im.load()
            out.append(clean_mod.phash_int64(im))
        return out

    full, wall_f, cpu_f = timed(full_decode)
    print(f"baseline full decode + imagehash.phash:     {n_images / wall_f:7.0f} images/s wall, "
          f"{n_images / cpu_f:7.0f} images/s per CPU second  (draft is {cpu_f / cpu:.2f}x faster)")
    diff = dedup.hamming(np.array([r.phash for r in rows]), np.array(full))
    hist = np.bincount(diff, minlength=9)
    print("draft vs full-decode phash, bits differing: "
          + ", ".join(f"{k}: {int(v)}" for k, v in enumerate(hist) if v))

    tmp = Path(tempfile.mkdtemp(prefix="imat-bench-clean-"))
    try:
        write_shards(tmp / "raw" / "train", (manifest_row(f"{k:08x}.jpg", "train", k % 50, b,
                                                          url=f"http://127.0.0.1/{k}.jpg")
                                             for k, b in enumerate(bodies)), schema=RAW_SCHEMA)
        for n_workers in sorted({1, workers}):
            cfg = clean_mod.CleanConfig(workers=n_workers, start_method="spawn")
            t0 = os.times()
            result, wall_c, _ = timed(clean_mod.clean, tmp, cfg, write_stats=False)
            t1 = os.times()
            # This process and its (joined) pool workers: what the whole command cost in CPU.
            cpu_all = sum(getattr(t1, k) - getattr(t0, k)
                          for k in ("user", "system", "children_user", "children_system"))
            assert isinstance(result, clean_mod.CleanResult)
            print(f"imatdata clean, {n_workers} worker(s) (spawn): {wall_c:5.1f} s wall in all; hashing pass "
                  f"{n_images / result.hash_seconds:5.0f} images/s wall "
                  f"({n_images / result.hash_seconds / n_workers:4.0f} per worker, pool start-up included); "
                  f"whole command {n_images / cpu_all:4.0f} images per CPU second; "
                  f"dedup {result.dedup_seconds:.2f} s, write {result.write_seconds:.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def planted_hashes(n: int, d: int, per_distance: int, seed: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    g = np.random.default_rng(seed)
    hashes = g.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n, dtype=np.int64).view(np.uint64)
    planted: dict[int, np.ndarray] = {}
    slot = 0
    for dist in range(d + 2):
        src = g.choice(n // 2, per_distance, replace=False) + 0  # sources in the first half
        dst = n // 2 + slot + np.arange(per_distance)  # twins overwrite the second half
        slot += per_distance
        masks = np.zeros(per_distance, np.uint64)
        for k in range(per_distance):
            for b in g.choice(64, dist, replace=False):
                masks[k] |= np.uint64(1) << np.uint64(int(b))
        hashes[dst] = hashes[src] ^ masks
        planted[dist] = np.stack([src, dst], axis=1)
    return hashes.view(np.int64), planted


def bench_index(n: int, d: int, per_distance: int, brute_rows: int, compare_blocks: bool) -> None:
    print(f"== near-duplicate search: {n:,} random 64-bit hashes, distance <= {d} ==")
    hashes, planted = planted_hashes(n, d, per_distance, seed=1)
    plans = [None] + ([d + 1] if compare_blocks else [])
    for blocks in plans:
        m = blocks or dedup.choose_blocks(n, d)
        plan = dedup.block_plan(d, m)
        (i, j, dist), wall, cpu = timed(dedup.near_pairs, hashes, d, blocks=blocks)
        found = set(zip(i.tolist(), j.tolist()))
        assert (dedup.hamming(hashes[i], hashes[j]) == dist).all() and (dist <= d).all()
        recall = {k: np.mean([(min(a, b), max(a, b)) in found for a, b in v.tolist()]) for k, v in planted.items()}
        ok = all(recall[k] == 1.0 for k in range(d + 1)) and recall[d + 1] == 0.0
        label = "auto" if blocks is None else "d+1"
        print(f"multi-index hashing ({label}: {m} blocks of {min(plan.widths)}-{max(plan.widths)} bits, "
              f"radius {plan.radius}): {wall:6.1f} s wall ({cpu:.1f} s CPU), {len(found):,} pairs")
        print("  planted pairs found by distance: "
              + ", ".join(f"{k}: {recall[k]:.0%}" for k in sorted(recall))
              + ("  -> recall 100%, no false positives" if ok else "  -> WRONG"))
    uf_out, wall_g, _ = timed(dedup.near_groups, hashes, d)
    groups = dedup.groups_from_roots(uf_out.roots())
    print(f"near_groups (collapse equal + index + union-find): {wall_g:.1f} s, {len(groups):,} groups")

    rows = min(brute_rows, n)
    u = hashes.view(np.uint64)
    w0 = time.perf_counter()
    for start in range(0, rows, 64):
        block = u[start:min(start + 64, rows)]
        np.nonzero(np.bitwise_count(block[:, None] ^ u[None, :]) <= d)
    per_row = (time.perf_counter() - w0) / rows
    # Row r compares with the n - r - 1 later hashes: n^2/2 comparisons in all.
    brute = per_row * n / 2
    print(f"brute force (numpy, vectorised per row): {per_row * 1e3:.2f} ms per row against {n:,} "
          f"-> {brute:,.0f} s ({brute / 3600:.1f} h) extrapolated for all pairs")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--hashes", type=int, default=1_000_000)
    ap.add_argument("--distance", type=int, default=4)
    ap.add_argument("--planted", type=int, default=2000, help="planted pairs per distance 0..d+1")
    ap.add_argument("--brute-rows", type=int, default=512)
    ap.add_argument("--compare-blocks", action="store_true", help="also time the d+1-block plan")
    ap.add_argument("--skip-images", action="store_true")
    ap.add_argument("--skip-index", action="store_true")
    args = ap.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.1f} "
          "(other processes share the CPUs: wall figures are pessimistic)")
    if not args.skip_images:
        bench_hashing(args.images, args.workers)
    if not args.skip_index:
        bench_index(args.hashes, args.distance, args.planted, args.brute_rows, args.compare_blocks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
