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
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from imatdata.manifest import CLEAN_SCHEMA, ShardWriter

FETCHED_AT = datetime(2026, 1, 1, tzinfo=timezone.utc)
CHUNK_ROWS = 10_000


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def manifest_row(row_id: str, split: str, label: int | None, image: bytes | None = None, *,
                 status: str | None = None, size: tuple[int, int] | None = None,
                 orig: tuple[int, int] | None = None, orig_bytes: int | None = None,
                 url: str | None = None, error: str | None = None, http_status: int | None = None,
                 attempts: int = 1, sha256: bool = False, phash: int | None = None,
                 fetched_at: datetime = FETCHED_AT) -> dict[str, Any]:
    """One row. `status` defaults to ok with an image and http_error without.

    Only an ok row has an image and sizes: its size is read from the image header unless
    given, its original size and byte count default to the stored ones (an ok row without an
    image is metadata only). A failed row's error and HTTP status default to a 404 for
    http_error and to none for any other status. `sha256=True` fills in the image's digest."""
    status = status or ("ok" if image is not None else "http_error")
    ok = status == "ok"
    image = image if ok else None
    if ok and size is None and image is not None:
        try:
            size = Image.open(io.BytesIO(image)).size
        except OSError:
            size = None
    width, height = size if ok and size else (None, None)
    orig_width, orig_height = orig if ok and orig else (width, height)
    if ok and orig_bytes is None and image is not None:
        orig_bytes = len(image)
    if error is None and status == "http_error":
        error = "HTTP 404"
    if http_status is None:
        http_status = 200 if ok else 404 if status == "http_error" else None
    row = {
        "id": row_id, "split": split, "label": label,
        "url": url or f"http://127.0.0.1/{split}/{row_id}",
        "status": status, "error": error, "http_status": http_status, "attempts": attempts, "image": image,
        "image_format": "jpeg" if image is not None else None,
        "width": width, "height": height, "orig_width": orig_width, "orig_height": orig_height,
        "orig_bytes": orig_bytes if ok else None,
        "sha256": hashlib.sha256(image).hexdigest() if sha256 and image else None,
        "fetched_at": fetched_at,
    }
    if phash is not None:
        row["phash"] = phash
    return row


def write_shards(folder: Path, rows: Iterable[Mapping[str, Any]], *,
                 schema: pa.Schema = CLEAN_SCHEMA, shard_rows: int | None = None,
                 row_group_rows: int | None = None, chunk_rows: int = CHUNK_ROWS) -> Path:
    """`rows` as `folder/part-*.parquet` (the clean schema unless told); returns `folder`.

    `rows` may be any iterable, a generator of a million rows included: it is written
    `chunk_rows` rows at a time (fewer for rows with large distinct images, to bound memory)."""
    sizes: dict[str, int] = {}
    if shard_rows is not None:
        sizes["shard_rows"] = shard_rows
    if row_group_rows is not None:
        sizes["row_group_rows"] = row_group_rows
    it = iter(rows)
    with ShardWriter(Path(folder), schema=schema, **sizes) as writer:
        while chunk := list(islice(it, max(1, chunk_rows))):
            writer.write_rows(chunk)
    return Path(folder)
