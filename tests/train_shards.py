"""Generated clean shards for the trainer's tests: learnable coloured products, real JPEGs.

Not a test module (no `test_` prefix); imported by tests/test_train_*.py.
"""

from __future__ import annotations

import io
import random
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from imatdata.manifest import CLEAN_SCHEMA, ShardWriter
from imatdata.sample import render_product

# Labels with distinct residues mod 9 look distinct in shape and colour (see product_style).
LABELS = (0, 1, 2, 3)


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_rows(split: str, per_class: int, *, size: int = 40, labels: tuple[int, ...] = LABELS,
              seed: int = 0, corrupt: int = 0, failed: int = 0,
              unlabelled: bool = False) -> list[dict]:
    rng = random.Random(f"{seed}-{split}")
    rows = []
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for k in range(per_class):
        for label in labels:
            img = render_product(label, rng, size)
            rows.append({"id": f"{split}-{label}-{k:04d}.jpg", "split": split,
                         "label": None if unlabelled else label, "status": "ok",
                         "image": jpeg(img), "image_format": "jpeg", "width": size,
                         "height": size, "fetched_at": now})
    rng.shuffle(rows)
    for i in range(corrupt):
        rows[i * 7 % len(rows)]["image"] = b"\xff\xd8\xff\xe0 this is not a jpeg" + bytes([i])
    for i in range(failed):
        rows.append({"id": f"{split}-failed-{i}.jpg", "split": split,
                     "label": None if unlabelled else labels[0], "status": "http_error",
                     "image": None, "fetched_at": now})
    return rows


def write_split(root: Path, split: str, rows: list[dict], row_group_rows: int = 16) -> Path:
    folder = root / split
    with ShardWriter(folder, schema=CLEAN_SCHEMA, row_group_rows=row_group_rows,
                     shard_rows=row_group_rows * 4) as writer:
        writer.write_rows(rows)
    return folder


def make_dataset(root: Path, *, train_per_class: int = 40, val_per_class: int = 10,
                 size: int = 40, corrupt: int = 0, failed: int = 0, row_group_rows: int = 16,
                 seed: int = 0) -> Path:
    """root/{train,val}/part-*.parquet; returns root (what --data takes)."""
    write_split(root, "train", make_rows("train", train_per_class, size=size, seed=seed,
                                         corrupt=corrupt, failed=failed), row_group_rows)
    write_split(root, "val", make_rows("val", val_per_class, size=size, seed=seed),
                row_group_rows)
    return root
