"""Tiny clean shards of rendered products for the tricks tests (a helper module, no tests)."""

from __future__ import annotations

import random
from pathlib import Path

from imatsample import render_product
from imatsample.shards import jpeg, manifest_row, write_shards


def _jpeg(label: int, rng: random.Random, size: int) -> bytes:
    return jpeg(render_product(label, rng, size))


def _row(split: str, row_id: str, label: int | None, image: bytes | None, size: int) -> dict:
    return manifest_row(row_id, split, label, image, size=(size, size), phash=0,
                        error=None if image is not None else "404")


def write_dataset(data_dir: Path, train_counts: list[int], *, val_per_class: int = 4, test_rows: int = 12,
                  test_missing: int = 3, size: int = 32, seed: int = 0, row_group_rows: int = 16) -> Path:
    """`data_dir/{train,val,test}/part-*.parquet` in the clean schema; class c has
    `train_counts[c]` train images. Test: `test_rows` rows of which `test_missing` have no image,
    spread through the split. Returns `data_dir`."""
    rng = random.Random(seed)
    for split in ("train", "val", "test"):
        rows = []
        if split == "train":
            for c, n in enumerate(train_counts):
                rows += [_row(split, f"tr{c}-{i}.jpg", c, _jpeg(c, rng, size), size) for i in range(n)]
            rng.shuffle(rows)
        elif split == "val":
            for c in range(len(train_counts)):
                rows += [_row(split, f"va{c}-{i}.jpg", c, _jpeg(c, rng, size), size)
                         for i in range(val_per_class)]
        else:
            step = max(1, test_rows // max(1, test_missing))
            for i in range(test_rows):
                missing = i % step == 1 and sum(r["image"] is None for r in rows) < test_missing
                img = None if missing else _jpeg(i % len(train_counts), rng, size)
                rows.append(_row(split, f"{i:04x}ab.jpg", None, img, size))
        write_shards(data_dir / split, rows, shard_rows=5 * row_group_rows,
                     row_group_rows=row_group_rows)
    return data_dir


def single_thread_torch():
    """Generator for an autouse fixture: run torch on one intra-op thread, then restore.

    On a shared 2-core machine, torch's default of one OpenMP thread per core spins against
    every other process; tiny models run many times faster on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
