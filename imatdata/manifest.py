"""The manifest: one schema, an atomic sharded writer and a streaming reader.

Every stage (fetch, clean, stats, imattrain) reads and writes Parquet through this module
and nothing else, so the column contract of SPEC.md lives in exactly one place.
This module must not import torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from imatdata import storage
from imatdata.errors import UserError

# --- schema -------------------------------------------------------------------------------

STATUSES = (
    "ok",
    "http_error",
    "timeout",
    "connection_error",
    "too_large",
    "not_image",
    "decode_error",
    "blocked",
    "opted_out",
    "invalid",
)

DROP_REASONS = (
    "fetch_failed",
    "broken",
    "undersized",
    "bad_aspect",
    "duplicate",
    "near_duplicate",
    "placeholder",
    "leak",
    "label_conflict",
    "label_noise",
)

RAW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("url", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("http_status", pa.int16()),
        pa.field("attempts", pa.int8()),
        pa.field("image", pa.binary()),
        pa.field("image_format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("orig_width", pa.int32()),
        pa.field("orig_height", pa.int32()),
        pa.field("orig_bytes", pa.int64()),
        pa.field("sha256", pa.string()),
        pa.field("fetched_at", pa.timestamp("ms", tz="UTC")),
    ]
)

CLEAN_SCHEMA = RAW_SCHEMA.append(pa.field("phash", pa.int64()))

DROPPED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("url", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
    ]
)

# Every column except the image bytes: what stats and planning code should read.
METADATA_COLUMNS = [name for name in CLEAN_SCHEMA.names if name != "image"]

SHARD_PATTERN = re.compile(r"^part-(\d{5})\.parquet$")
DEFAULT_ROOT = "manifests"
ROW_GROUP_MAX_BYTES = 128 * 1024 * 1024


# --- layout -------------------------------------------------------------------------------


def resolve_root(root: str | os.PathLike[str] | None = None, *, writable: bool = True) -> Path:
    """`--root`, else `$IMAT_ROOT`, else `./manifests`, checked before anything is written:
    a root that is a file, or lies under one, or (with `writable`, for the stages that write
    there: fetch, clean, stats) cannot be written, is a UserError. A root that does not
    exist yet is fine when the folder it would be made in can be written."""
    if root is not None and str(root) != "":
        path = storage.location(root)
    else:
        path = storage.location(os.environ.get("IMAT_ROOT") or DEFAULT_ROOT, "IMAT_ROOT")
    storage.check_root(path, writable=writable)
    return path


SPLIT_ORDER = ("train", "val", "validation", "test")


def order_splits(splits: Sequence[str]) -> list[str]:
    """train, val, test first (the order people read them in), then the rest alphabetically."""
    rank = {name: i for i, name in enumerate(SPLIT_ORDER)}
    return sorted(splits, key=lambda s: (rank.get(s, len(rank)), s))


def split_dir(root: Path, stage: str, split: str) -> Path:
    return root / stage / split


def list_splits(stage_path: Path) -> list[str]:
    """Split names under a stage folder (those holding at least one finished shard)."""
    return [p.name for p in storage.children(stage_path) if storage.is_dir(p) and list_shards(p)]


def list_shards(split_path: Path) -> list[Path]:
    """Finished shards of one split, in order. Temporary files are never listed."""
    return [p for p in storage.children(split_path) if SHARD_PATTERN.match(p.name)]


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


# --- atomic files ---------------------------------------------------------------------------


def parquet_options(schema: pa.Schema, compression: str = "zstd") -> dict[str, Any]:
    """Writer options for `schema`: binary columns (the image bytes, already JPEG) are stored
    plain, without compression, dictionary or min/max statistics: none of them can shrink
    entropy-coded data, and skipping them halves the cost of writing a shard and makes
    reading the image column several times faster. Every other column gets `compression`."""
    small = [f.name for f in schema if not pa.types.is_binary(f.type) and not pa.types.is_large_binary(f.type)]
    return {"compression": {f.name: compression if f.name in small else "none" for f in schema},
            "use_dictionary": small, "write_statistics": small}


def write_table_atomic(table: pa.Table, final: Path, *, compression: str = "zstd",
                       row_group_rows: int | None = None) -> None:
    """Write one whole Parquet file under a temporary name and rename it when complete."""
    with storage.AtomicFile(final, size_hint=table.nbytes) as f:
        pq.write_table(table, f.target, row_group_size=row_group_rows, **parquet_options(table.schema, compression))


# --- writer -----------------------------------------------------------------------------------


@dataclass
class ShardWriter:
    """Writes rows into `folder/part-NNNNN.parquet`, each shard atomically.

    Rows are buffered into row groups (at most `row_group_rows` rows or `row_group_bytes`
    bytes, whichever comes first) and a shard is closed after `shard_rows` rows. A shard is
    written to a temporary name, fsynced and renamed, so a crash never leaves a partial
    file under a final name; shards finished before the crash stay intact.

    Use as a context manager; `abort()` (or an exception inside the `with`) discards the
    unfinished shard.
    """

    folder: Path
    schema: pa.Schema = RAW_SCHEMA
    shard_rows: int = 50_000
    row_group_rows: int = 1024
    row_group_bytes: int = 64 * 1024 * 1024
    compression: str = "zstd"
    start_index: int = 0
    written: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder = storage.as_location(self.folder)
        if self.row_group_bytes > ROW_GROUP_MAX_BYTES:
            raise ValueError("row groups must stay under 128 MiB")
        self._index = self.start_index
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._file: storage.AtomicFile | None = None
        self._shard_rows_written = 0
        self.rows_written = 0

    # public API

    def write_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            self.write_batch(pa.RecordBatch.from_pylist(list(rows), schema=self.schema))

    def write_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        if isinstance(batch, pa.Table):
            for b in batch.to_batches():
                self.write_batch(b)
            return
        if batch.schema != self.schema:
            batch = _conform(batch, self.schema)
        # Split large batches so a row group never exceeds its limits.
        offset = 0
        while offset < batch.num_rows:
            # A row group never straddles two shards, so a shard holds exactly shard_rows.
            group_cap = min(self.row_group_rows, self.shard_rows - self._shard_rows_written)
            piece = batch.slice(offset, group_cap - self._pending_rows)
            offset += piece.num_rows
            self._pending.append(piece)
            self._pending_rows += piece.num_rows
            self._pending_bytes += piece.nbytes
            if self._pending_rows >= group_cap or self._pending_bytes >= self.row_group_bytes:
                self._flush_row_group()

    def close(self) -> list[Path]:
        self._flush_row_group()
        self._finish_shard()
        return self.written

    def abort(self) -> None:
        self._pending.clear()
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:
                pass
            self._writer = None
        if self._file is not None:
            self._file.abort()
            self._file = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # internals

    def _flush_row_group(self) -> None:
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
        self._write_row_group(table)

    def _write_row_group(self, table: pa.Table) -> None:
        # A group too big in bytes is halved until it fits (one huge row stays as it is).
        if table.nbytes > self.row_group_bytes and table.num_rows > 1:
            half = table.num_rows // 2
            self._write_row_group(table.slice(0, half))
            self._write_row_group(table.slice(half))
            return
        if self._writer is None:
            self._file = storage.AtomicFile(self.folder / shard_name(self._index))
            self._writer = pq.ParquetWriter(self._file.target, self.schema, **parquet_options(self.schema, self.compression))
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._shard_rows_written += table.num_rows
        self.rows_written += table.num_rows
        if self._shard_rows_written >= self.shard_rows:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        assert self._file is not None
        self.written.append(self._file.commit())
        self._file = None
        self._index += 1
        self._shard_rows_written = 0


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """Reorder/cast a batch to `schema`; missing nullable columns become nulls."""
    arrays = []
    for f in schema:
        idx = batch.schema.get_field_index(f.name)
        if idx < 0:
            if not f.nullable:
                raise ValueError(f"column {f.name!r} is required")
            arrays.append(pa.nulls(batch.num_rows, f.type))
        else:
            arrays.append(batch.column(idx).cast(f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# --- reader -----------------------------------------------------------------------------------


def open_dataset(paths: Path | Sequence[Path]) -> ds.Dataset:
    """A pyarrow dataset over a split folder, a stage folder (all splits) or explicit shards."""
    if isinstance(paths, (str, os.PathLike)):
        paths = storage.as_location(paths)
        shards = list_shards(paths)
        if not shards and storage.is_dir(paths):
            shards = [s for split in list_splits(paths) for s in list_shards(paths / split)]
        if not shards:
            raise UserError(f"no manifest shards under {paths}: run the stage that writes them first")
    else:
        shards = [storage.as_location(p) for p in paths]
    return storage.parquet_dataset(shards)


def iter_batches(paths: Path | Sequence[Path], *, columns: Sequence[str] | None = None,
                 filter: ds.Expression | None = None, batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
    """Stream record batches with column selection and a row filter (pushed into Parquet)."""
    dataset = open_dataset(paths)
    yield from dataset.to_batches(columns=list(columns) if columns else None, filter=filter,
                                  batch_size=batch_size)


def read_table(paths: Path | Sequence[Path], *, columns: Sequence[str] | None = None,
               filter: ds.Expression | None = None) -> pa.Table:
    return open_dataset(paths).to_table(columns=list(columns) if columns else None, filter=filter)


@dataclass(frozen=True)
class RowGroupRef:
    """One (file, row group): the unit of work for parallel readers such as the trainer."""

    path: Path
    row_group: int
    num_rows: int


def row_groups(paths: Path | Sequence[Path]) -> list[RowGroupRef]:
    """Every row group of a split (or of explicit shards), in file order."""
    if isinstance(paths, (str, os.PathLike)):
        shards = list_shards(storage.as_location(paths))
    else:
        shards = [storage.as_location(p) for p in paths]
    refs = []
    for shard in shards:
        with storage.parquet_file(shard) as f:
            meta = f.metadata
        for i in range(meta.num_row_groups):
            refs.append(RowGroupRef(shard, i, meta.row_group(i).num_rows))
    return refs


def read_row_group(ref: RowGroupRef, columns: Sequence[str] | None = None) -> pa.Table:
    if storage.is_remote(ref.path):
        return storage.read_row_group(ref.path, ref.row_group, columns)
    with storage.parquet_file(ref.path) as f:
        return f.read_row_group(ref.row_group, columns=list(columns) if columns else None)


def col(name: str) -> ds.Expression:
    """A column reference for `filter=` (re-exported so callers need not import pyarrow.dataset)."""
    return ds.field(name)
