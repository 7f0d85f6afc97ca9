"""Manifest rows and shards in the schema `imatdata` writes, for tests and benchmarks.

One factory instead of hand-written 17-column rows: give what a case is about (id, split,
label, the image bytes or a failure status) and the rest is filled in consistently.

    rows = [manifest_row(f"t{i}", "train", i % 4, jpeg(render_product(i % 4, rng, 32)))
            for i in range(40)]
    write_shards(root / "clean" / "train", rows)
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from imatdata.manifest import CLEAN_SCHEMA, ShardWriter

FETCHED_AT = datetime(2026, 1, 1, tzinfo=timezone.utc)


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def manifest_row(row_id: str, split: str, label: int | None, image: bytes | None = None, *,
                 status: str | None = None, size: tuple[int, int] | None = None,
                 orig: tuple[int, int] | None = None, url: str | None = None,
                 error: str | None = None, http_status: int | None = None, attempts: int = 1,
                 sha256: bool = False, phash: int | None = None,
                 fetched_at: datetime = FETCHED_AT) -> dict[str, Any]:
    """One row. `status` defaults to ok with an image and http_error without; an ok row's
    size is read from the image header unless given, its original size defaults to that."""
    status = status or ("ok" if image is not None else "http_error")
    ok = status == "ok"
    if ok and size is None and image is not None:
        try:
            size = Image.open(io.BytesIO(image)).size
        except OSError:
            size = None
    width, height = size if ok and size else (None, None)
    orig_width, orig_height = orig if orig else (width, height)
    row = {
        "id": row_id, "split": split, "label": label,
        "url": url or f"http://127.0.0.1/{split}/{row_id}",
        "status": status, "error": error if error is not None or ok else "HTTP 404",
        "http_status": http_status if http_status is not None else (200 if ok else 404),
        "attempts": attempts, "image": image if ok else None,
        "image_format": "jpeg" if ok and image is not None else None,
        "width": width, "height": height, "orig_width": orig_width, "orig_height": orig_height,
        "orig_bytes": len(image) if ok and image is not None else None,
        "sha256": hashlib.sha256(image).hexdigest() if sha256 and ok and image else None,
        "fetched_at": fetched_at,
    }
    if phash is not None:
        row["phash"] = phash
    return row


def write_shards(folder: Path, rows: Sequence[dict[str, Any]], *,
                 schema: pa.Schema = CLEAN_SCHEMA, shard_rows: int | None = None,
                 row_group_rows: int | None = None) -> Path:
    """`rows` as `folder/part-*.parquet` (the clean schema unless told); returns `folder`."""
    sizes: dict[str, int] = {}
    if shard_rows is not None:
        sizes["shard_rows"] = shard_rows
    if row_group_rows is not None:
        sizes["row_group_rows"] = row_group_rows
    with ShardWriter(Path(folder), schema=schema, **sizes) as writer:
        writer.write_rows(rows)
    return Path(folder)
