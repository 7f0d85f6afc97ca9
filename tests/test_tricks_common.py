"""Shared helpers for the tricks tests (no tests here): tiny clean shards of rendered products."""

from __future__ import annotations

import io
import random
from datetime import datetime, timezone
from pathlib import Path

from imatdata.manifest import CLEAN_SCHEMA, ShardWriter
from imatdata.sample import render_product


def _jpeg(label: int, rng: random.Random, size: int) -> bytes:
    buf = io.BytesIO()
    render_product(label, rng, size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _row(split: str, row_id: str, label: int | None, image: bytes | None, size: int) -> dict:
    ok = image is not None
    return {
        "id": row_id, "split": split, "label": label, "url": f"http://127.0.0.1/{row_id}",
        "status": "ok" if ok else "http_error", "error": None if ok else "404",
        "http_status": 200 if ok else 404, "attempts": 1, "image": image,
        "image_format": "jpeg" if ok else None, "width": size if ok else None,
        "height": size if ok else None, "orig_width": size if ok else None,
        "orig_height": size if ok else None, "orig_bytes": len(image) if ok else None,
        "sha256": None, "fetched_at": datetime(2026, 1, 1, tzinfo=timezone.utc), "phash": 0,
    }


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
        with ShardWriter(data_dir / split, schema=CLEAN_SCHEMA, shard_rows=5 * row_group_rows,
                         row_group_rows=row_group_rows) as w:
            w.write_rows(rows)
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
