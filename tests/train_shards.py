"""Generated clean shards for the trainer's tests: learnable coloured products, real JPEGs.

Not a test module (no `test_` prefix); imported by tests/test_train_*.py.
"""

from __future__ import annotations

import random
from pathlib import Path

from imatsample import render_product
from imatsample.shards import jpeg, manifest_row, write_shards

# Labels with distinct residues mod 9 look distinct in shape and colour (see product_style).
LABELS = (0, 1, 2, 3)


def make_rows(split: str, per_class: int, *, size: int = 40, labels: tuple[int, ...] = LABELS,
              seed: int = 0, corrupt: int = 0, failed: int = 0,
              unlabelled: bool = False) -> list[dict]:
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for k in range(per_class):
        for label in labels:
            img = render_product(label, rng, size)
            rows.append(manifest_row(f"{split}-{label}-{k:04d}.jpg", split,
                                     None if unlabelled else label, jpeg(img), size=(size, size)))
    rng.shuffle(rows)
    for i in range(corrupt):
        rows[i * 7 % len(rows)]["image"] = b"\xff\xd8\xff\xe0 this is not a jpeg" + bytes([i])
    for i in range(failed):
        rows.append(manifest_row(f"{split}-failed-{i}.jpg", split,
                                 None if unlabelled else labels[0]))
    return rows


def write_split(root: Path, split: str, rows: list[dict], row_group_rows: int = 16) -> Path:
    return write_shards(root / split, rows, row_group_rows=row_group_rows,
                        shard_rows=row_group_rows * 4)


def make_dataset(root: Path, *, train_per_class: int = 40, val_per_class: int = 10,
                 size: int = 40, corrupt: int = 0, failed: int = 0, row_group_rows: int = 16,
                 seed: int = 0) -> Path:
    """root/{train,val}/part-*.parquet; returns root (what --data takes)."""
    write_split(root, "train", make_rows("train", train_per_class, size=size, seed=seed,
                                         corrupt=corrupt, failed=failed), row_group_rows)
    write_split(root, "val", make_rows("val", val_per_class, size=size, seed=seed),
                row_group_rows)
    return root
