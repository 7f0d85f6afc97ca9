"""Fetch's store: raw shards plus an append-only journal, per split, under `<root>/raw/`.

Rows of a running fetch go to the journal (`Journal`: small Parquet files, each written
whole then renamed); a thread (`Sealer`) moves a full shard's worth of the oldest journal
rows into the next raw shard; when every record has a row, `finalize_split` settles the
split to one row per record, the newest. What is already done is read back from the
metadata columns alone (`index_store`, `done_keys`), and a run that would delete rows of
earlier runs is refused before anything changes (`refuse_pruning`).

Every file operation goes through `imatdata.storage`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imatdata import storage
from imatdata.errors import UserError
from imatdata.fetch.download import INVALID_URL
from imatdata.fetch.sources import record_key
from imatdata.manifest import (RAW_SCHEMA, SHARD_PATTERN, STATUSES, ShardWriter, list_shards, shard_name,
                               split_dir, write_table_atomic)

JOURNAL_DIR = ".journal"
LOCK_NAME = ".fetch.lock"
JOURNAL_SCHEMA = RAW_SCHEMA.append(pa.field("_key", pa.uint64(), nullable=False))
_STATUS_CODE = {s: i for i, s in enumerate(STATUSES)}
_NO_KEY = np.uint64(0)  # rows of earlier runs that carry no resumable key (old invalid rows)
_CARRIED = "-i"  # suffix of a journal file holding the invalid rows of sealed ones


def is_transient(status: str, http_status: int | None) -> bool:
    """Failures that another try may fix (what --retry-failed re-attempts)."""
    if status in ("timeout", "connection_error"):
        return True
    return status == "http_error" and http_status is not None and (
        http_status >= 500 or http_status in (408, 429))


def journal_dir(root: Path, split: str) -> Path:
    return root / "raw" / JOURNAL_DIR / split


def journal_files(root: Path, split: str) -> list[Path]:
    return [p for p in storage.children(journal_dir(root, split))
            if p.name.startswith("j-") and p.suffix == ".parquet"]


# --- what is stored ------------------------------------------------------------------------------


@dataclass
class StoreIndex:
    """Metadata of every row stored for one split (shards first, then journal, oldest first)."""

    files: list[Path]
    file_of: np.ndarray  # int32 per row
    keys: np.ndarray  # uint64 per row (_NO_KEY when not resumable)
    status: np.ndarray  # uint8 STATUSES index per row
    transient: np.ndarray  # bool per row

    def latest(self) -> np.ndarray:
        """Row numbers of the newest row of each key (rows without a key excluded)."""
        if self.keys.size == 0:
            return np.empty(0, dtype=np.int64)
        order = np.argsort(self.keys, kind="stable")  # equal keys keep file order
        sorted_keys = self.keys[order]
        last = np.ones(order.size, dtype=bool)
        last[:-1] = sorted_keys[:-1] != sorted_keys[1:]
        rows = order[last]
        return rows[self.keys[rows] != _NO_KEY]


def index_store(root: Path, split: str) -> StoreIndex:
    shards = list_shards(split_dir(root, "raw", split))
    files = shards + journal_files(root, split)
    parts: list[tuple[np.ndarray, ...]] = []
    if storage.is_remote(root):
        parts = _index_remote(files, len(shards), split)
    else:
        for n, path in enumerate(files):
            try:
                parts.extend(_index_file(path, n, split, is_journal=n >= len(shards)))
            except (pa.ArrowException, OSError) as exc:
                raise UserError(f"{path}: unreadable ({exc}); move it away and rerun to fetch its rows again") from None

    def cat(i: int, dtype: Any) -> np.ndarray:
        return np.concatenate([p[i] for p in parts]) if parts else np.empty(0, dtype=dtype)

    return StoreIndex(files, cat(0, np.int32), cat(1, np.uint64), cat(2, np.uint8), cat(3, bool))


def _index_remote(files: list[Path], shards: int, split: str) -> list[tuple[np.ndarray, ...]]:
    """`_index_file` of every file in an object store, several at a time: each open costs a
    round trip or three, which threads overlap (pyarrow releases the GIL while it waits)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(n: int) -> list[tuple[np.ndarray, ...]]:
        try:
            return list(_index_file(files[n], n, split, is_journal=n >= shards))
        except storage.StorageError:
            raise
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{files[n]}: unreadable ({exc}); move it away and rerun to fetch its rows "
                            "again") from None

    with ThreadPoolExecutor(8, thread_name_prefix="imat-index") as pool:
        return [part for parts in pool.map(one, range(len(files))) for part in parts]


def _index_file(path: Path, n: int, split: str, is_journal: bool) -> Iterator[tuple[np.ndarray, ...]]:
    """(file number, key, status code, transient) arrays of one stored file, batch by batch:
    a million ids never sit in memory as Python strings."""
    columns = ["id", "status", "http_status"] + (["_key"] if is_journal else ["error"])
    with storage.parquet_file(path) as pf:
        for batch in pf.iter_batches(batch_size=65_536, columns=columns):
            st = batch.column(1).to_pylist()
            hs = batch.column(2).to_pylist()
            if is_journal:
                keys = batch.column(3).to_numpy(zero_copy_only=False).astype(np.uint64)
            else:
                ids = batch.column(0).to_pylist()
                errors = batch.column(3).to_pylist() if "invalid" in st else [None] * len(st)
                # Rows of invalid input records are rebuilt from the input on every run: no key
                # needed. A URL the downloader could not parse was a valid record.
                keys = np.fromiter((_NO_KEY if s == "invalid" and not (e or "").startswith(INVALID_URL)
                                    else record_key(split, i) for i, s, e in zip(ids, st, errors)),
                                   dtype=np.uint64, count=len(ids))
            yield (np.full(len(st), n, dtype=np.int32), keys,
                   np.fromiter((_STATUS_CODE.get(s, 0) for s in st), dtype=np.uint8, count=len(st)),
                   np.fromiter((is_transient(s, h) for s, h in zip(st, hs)), dtype=bool, count=len(st)))


def done_so_far(root: Path, split_keys: dict[str, np.ndarray], *, retry_failed: bool,
                prune: bool) -> dict[str, np.ndarray]:
    """Per split, the sorted keys of the records earlier runs finished (and need no retry).

    Refuses, before anything is fetched or written, a run whose settling would delete rows of
    earlier runs, unless `prune`; sweeps the temporary files a killed run left."""
    indexes = {split: index_store(root, split) for split in split_keys}
    if not prune:
        refuse_pruning(indexes, split_keys)
    done = {}
    for split, wanted in split_keys.items():
        storage.remove_stale_temps(split_dir(root, "raw", split))
        storage.remove_stale_temps(journal_dir(root, split))
        done[split] = done_keys(indexes.pop(split), wanted, retry_failed)  # each index freed once used
    return done


def done_keys(index: StoreIndex, wanted: np.ndarray, retry_failed: bool) -> np.ndarray:
    """Sorted keys of `wanted` records that already have a row (and need no retry)."""
    rows = index.latest()
    if retry_failed:
        rows = rows[~index.transient[rows]]
    keys = np.sort(index.keys[rows])
    return keys[member(keys, wanted)]


def member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """One bool per value: whether it is in `sorted_set` (a sorted uint64 array)."""
    if sorted_set.size == 0 or values.size == 0:
        return np.zeros(values.size, dtype=bool)
    pos = np.searchsorted(sorted_set, values)
    pos[pos >= sorted_set.size] = 0
    return sorted_set[pos] == values


def contains(sorted_keys: np.ndarray, key: int) -> bool:
    """`key in sorted_keys` for one key, without a Python set of a million ints."""
    if sorted_keys.size == 0:
        return False
    k = np.uint64(key)
    i = int(np.searchsorted(sorted_keys, k))
    return i < sorted_keys.size and sorted_keys[i] == k


def unlisted_rows(index: StoreIndex, wanted: np.ndarray) -> tuple[int, int]:
    """(rows, ok rows) stored for a split whose records are not in `wanted`: what settling the
    split would delete (the newest row of each such record, as `finalize_split` counts them)."""
    rows = index.latest()
    gone = rows[~member(index.keys[rows], wanted)]
    return int(gone.size), int(np.count_nonzero(index.status[gone] == _STATUS_CODE["ok"]))


def refuse_pruning(indexes: dict[str, StoreIndex], split_keys: dict[str, np.ndarray]) -> None:
    """A UserError saying what would go when the store holds rows this run's lists do not."""
    parts = []
    for split, wanted in split_keys.items():
        rows, ok = unlisted_rows(indexes[split], wanted)
        if rows:
            parts.append(f"{split}: {rows} rows ({ok} ok images)")
    if parts:
        raise UserError("raw/ holds rows of earlier runs whose records these lists do not have, and finishing "
                        f"would delete them ({'; '.join(parts)}); nothing was changed. Rerun with --prune to "
                        "delete them, or with the lists (and --limit) that fetched them to keep them")


# --- the journal ---------------------------------------------------------------------------------


def new_run_id() -> str:
    return f"{int(time.time() * 1000):013d}"


class Journal:
    """Append-only rows of one run: small Parquet files, each written whole then renamed, so a
    crash leaves complete files only (at most the unflushed rows are lost).

    With a `window` (`window_size` units, see `download.Fetcher`), every row added with
    `saving=True` holds one unit until its file is on disk. The fetcher takes a unit before a
    request, so the URLs whose answers a crash would lose (requests out, bodies waiting for
    the image workers, rows waiting here) never outnumber the window. When the window runs
    out, rows are flushed as soon as `window_rows` of them wait, so the fetch never stalls
    on it for long."""

    def __init__(self, root: Path, flush_rows: int, flush_seconds: float, run: str | None = None,
                 tag: str = "", flush_bytes: int = 64 * 1024 * 1024, window_size: int = 0,
                 window_rows: int = 32) -> None:
        self.root = root
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.flush_bytes = flush_bytes
        self.window = asyncio.Semaphore(window_size) if window_size > 0 else None
        self.window_rows = max(1, window_rows)
        # Names sort in the order rows were written (newest row per record wins): the run's
        # start time, then (several loops) the loop, then a sequence number.
        self._run = run or new_run_id()
        self._tag = tag
        self._seq = 0
        self._buffers: dict[str, list[dict[str, Any]]] = {}
        self._buffered = 0
        self._saving = 0  # window units held by the buffered rows
        self._bytes = 0  # stored images in the buffered rows
        self._last_flush = time.monotonic()
        self._lock = asyncio.Lock()
        self._flushing = False
        self.rows_written = 0
        self.files_written = 0

    def add(self, split: str, row: dict[str, Any], saving: bool = False) -> None:
        """Buffer `row`; `saving`: it holds a window unit, given back once it is on disk."""
        self._buffers.setdefault(split, []).append(row)
        self._buffered += 1
        self._saving += saving
        self._bytes += len(row.get("image") or b"")

    def due(self) -> bool:
        return self._buffered >= self.flush_rows or self.heavy() or self.pressed() or (
            self._buffered > 0 and time.monotonic() - self._last_flush >= self.flush_seconds)

    def heavy(self) -> bool:
        """The buffered rows hold images enough to flush now rather than at the next tick."""
        return self._bytes >= self.flush_bytes

    def pressed(self) -> bool:
        """The window is spent and enough of its units wait here to be worth a file."""
        return self.window is not None and self.window.locked() and self._saving >= self.window_rows

    async def flush(self, only_if_due: bool = False) -> None:
        """Write what is buffered (`only_if_due`: only if `due()`, and not while another flush
        is writing; rows that come meanwhile are written next, while they keep it due)."""
        if only_if_due and (self._flushing or not self.due()):
            return
        async with self._lock:
            self._flushing = True
            try:
                first = True
                while self._buffered and (first or self.due()):
                    first = False
                    buffers, saving = self._take()
                    self._last_flush = time.monotonic()
                    for split, rows in buffers.items():
                        if rows:
                            path = self._next_path(split)
                            # Encoding and fsync happen off the event loop so downloads keep moving.
                            await asyncio.to_thread(_write_journal_file, rows, path)
                            self.rows_written += len(rows)
                            self.files_written += 1
                    self._give_back(saving)
            finally:
                self._flushing = False

    def flush_now(self) -> None:
        """Synchronous flush for the interrupt path, when the loop is going away."""
        buffers, saving = self._take()
        for split, rows in buffers.items():
            if rows:
                _write_journal_file(rows, self._next_path(split))
                self.rows_written += len(rows)
                self.files_written += 1
        self._give_back(saving)

    def _give_back(self, units: int) -> None:
        if self.window is not None:
            for _ in range(units):
                self.window.release()

    def _take(self) -> tuple[dict[str, list[dict[str, Any]]], int]:
        buffers, saving = self._buffers, self._saving
        self._buffers, self._buffered, self._bytes, self._saving = {}, 0, 0, 0
        return buffers, saving

    def _next_path(self, split: str) -> Path:
        self._seq += 1
        return journal_dir(self.root, split) / f"j-{self._run}-{self._tag}{self._seq:08d}.parquet"


def _write_journal_file(rows: list[dict[str, Any]], path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=JOURNAL_SCHEMA)
    # Images are JPEGs already; compressing the journal would only burn CPU.
    write_table_atomic(table, path, compression="none")


# --- sealing: full shards' worth of journal rows become raw shards while the fetch runs ------------


def seal_journal(root: Path, split: str, shard_rows: int, stop: threading.Event | None = None,
                 counts: dict[Path, int] | None = None) -> Path | None:
    """Move the oldest journal files of `split`, a shard's worth of rows, into the next raw shard.

    Seals only when more rows wait than one shard holds, so the shard comes out full; returns
    it, or None. The files taken are always the oldest (a prefix in name order), so the shard
    still ranks below every row left in the journal and the newest row of a record still wins.
    `invalid` rows are rebuilt from the input on every run and need their journal key, which a
    shard cannot hold: they move to a journal file of their own instead. The shard is committed
    before any journal file goes, so a crash in between only leaves rows twice (the journal
    copy wins; finalising drops the other). `counts` caches the row count of each journal
    file between calls (the files never change; a fast fetch writes several a second).
    """
    take = _oldest_shard_of_journal(root, split, shard_rows, {} if counts is None else counts)
    if not take:
        return None
    folder = split_dir(root, "raw", split)
    rows = sum(n for _, n in take)
    writer = ShardWriter(folder, RAW_SCHEMA, shard_rows=rows, start_index=_next_shard_index(folder))
    invalid: list[pa.RecordBatch] = []
    sources = _read_ahead([p for p, _ in take]) if storage.is_remote(root) else iter(p for p, _ in take)
    try:
        for (path, _), source in zip(take, sources):
            if stop is not None and stop.is_set():
                writer.abort()
                return None
            with _open_parquet(source) as pf:
                for batch in pf.iter_batches(batch_size=128):  # images inside: a bounded slice at a time
                    is_invalid = pc.equal(batch.column("status"), "invalid")
                    invalid.append(batch.filter(is_invalid))
                    writer.write_batch(batch.filter(pc.invert(is_invalid)).select(RAW_SCHEMA.names))
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    _carry_and_remove([path for path, _ in take], pa.Table.from_batches(invalid, schema=JOURNAL_SCHEMA))
    return shards[0] if shards else None


def _oldest_shard_of_journal(root: Path, split: str, shard_rows: int,
                             counts: dict[Path, int]) -> list[tuple[Path, int]]:
    """(path, rows) of the oldest journal files that fill a shard, or [] while everything
    waiting fits in one (it is left to grow, or to finalising)."""
    take: list[tuple[Path, int]] = []
    rows = 0
    files = journal_files(root, split)
    for gone in counts.keys() - set(files):
        del counts[gone]
    if storage.is_remote(root):  # each footer is a round trip or three: fetch them together
        counts.update(_row_counts([p for p in files if p not in counts and not p.stem.endswith(_CARRIED)]))
    for path in files:
        if path.stem.endswith(_CARRIED):
            n = 0  # invalid rows only, carried again: they never fill a shard
        elif path in counts:
            n = counts[path]
        else:
            with storage.parquet_file(path) as pf:
                n = counts[path] = pf.metadata.num_rows
        if rows and rows + n > shard_rows:
            return take
        take.append((path, n))
        rows += n
    return []


def _row_counts(paths: list[Path]) -> dict[Path, int]:
    """{path: rows} of stored files in an object store, read several at a time."""
    if not paths:
        return {}
    from concurrent.futures import ThreadPoolExecutor

    def rows(path: Path) -> int:
        with storage.parquet_file(path) as pf:
            return int(pf.metadata.num_rows)

    with ThreadPoolExecutor(8, thread_name_prefix="imat-footers") as pool:
        return dict(zip(paths, pool.map(rows, paths)))


def _carry_and_remove(taken: list[Path], carried: pa.Table) -> None:
    """Write the invalid rows of sealed journal files to one carried file, then drop those files."""
    carry = taken[-1].with_name(taken[-1].stem + _CARRIED + ".parquet")  # sorts just before taken[-1]
    if carried.num_rows:
        write_table_atomic(carried, carry, compression="none")
    storage.remove_all([path for path in taken
                        if path != carry or not carried.num_rows])  # an older carry of that name was just replaced
    storage.fsync_dir(taken[0].parent)


def _next_shard_index(folder: Path) -> int:
    shards = list_shards(folder)
    return _shard_index(shards[-1]) + 1 if shards else 0


def _shard_index(path: Path) -> int:
    match = SHARD_PATTERN.match(path.name)
    assert match is not None, path
    return int(match.group(1))


class Sealer:
    """A thread that seals full shards of journal rows (`seal_journal`) every few seconds.

    Without it a million-image fetch would hold every image twice at the end (journal + new
    shards) and spend its last minutes copying them; with it the journal never holds much
    more than a shard and finalising writes at most one. A seal that fails for lack of disk
    or the like is left to finalising, which reports it; anything else is a bug and is raised
    when the fetch ends."""

    def __init__(self, root: Path, splits: Sequence[str], shard_rows: int, every: float = 5.0) -> None:
        self.root, self.splits, self.shard_rows, self.every = root, list(splits), shard_rows, every
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._counts: dict[Path, int] = {}  # rows of each journal file seen (seal_journal)
        self._thread = threading.Thread(target=self._run, name="imatdata-sealer", daemon=True)

    def __enter__(self) -> Sealer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                for split in self.splits:
                    while not self._stop.is_set() and seal_journal(self.root, split, self.shard_rows, self._stop,
                                                                   self._counts):
                        pass
            except (OSError, pa.ArrowException):
                return  # disk full, say: the journal is intact and finalising will report it
            except BaseException as exc:
                self._error = exc
                return


# --- settling -------------------------------------------------------------------------------------


@dataclass
class Settled:
    """raw/ once every split is settled."""

    splits: dict[str, dict[str, int]]  # split -> rows by status, and "records"
    shards: dict[str, list[str]]  # split -> its shard paths
    dropped: int  # rows of earlier runs whose records this run's lists do not hold


def settle(root: Path, split_keys: dict[str, np.ndarray], shard_rows: int) -> Settled:
    """`finalize_split` for every split of this run."""
    settled = Settled({}, {}, 0)
    for split, wanted in split_keys.items():
        counts, paths, dropped = finalize_split(root, split, wanted, shard_rows)
        settled.splits[split], settled.shards[split] = counts, [str(p) for p in paths]
        settled.dropped += dropped
    return settled


def finalize_split(root: Path, split: str, wanted: np.ndarray, shard_rows: int) -> tuple[dict[str, int], list[Path], int]:
    """Settle raw/<split>/ from its shards and journal: one row per wanted record, the newest.

    Work is in proportion to what changed: a shard whose rows all stay is left as it is, one
    holding superseded or no-longer-listed rows is rewritten without them (or removed), the
    journal's rows become new shards after the last, and the shards are numbered from
    part-00000 without gaps. The journal goes only once all that is on disk, so a crash at any
    point leaves the newest rows readable and the rerun settles the split again.

    Returns (status counts, shard paths, rows of earlier runs dropped because their record
    is not in this input).
    """
    index = index_store(root, split)
    rows = index.latest()
    in_input = member(index.keys[rows], wanted)
    keep_rows = np.sort(rows[in_input])
    missing = int(wanted.size - keep_rows.size)
    if missing:
        raise UserError(f"raw/{split}: {missing} records have no result yet; rerun the same command to fetch them")
    keep = np.zeros(index.keys.size, dtype=bool)
    keep[keep_rows] = True
    folder = split_dir(root, "raw", split)
    journal = [p for p in index.files if p.parent == journal_dir(root, split)]
    _settle_files(index, keep, folder, shards=len(index.files) - len(journal), shard_rows=shard_rows)
    paths = _renumber_shards(folder)
    if not paths:  # an empty split still gets one (empty) shard so readers see the split exists
        write_table_atomic(RAW_SCHEMA.empty_table(), folder / shard_name(0))
        paths = [folder / shard_name(0)]
    storage.remove_all(journal)
    counts = Counter(STATUSES[c] for c in index.status[keep_rows].tolist())
    by_status = {s: counts[s] for s in STATUSES if counts.get(s, 0)}
    return by_status | {"records": int(keep_rows.size)}, paths, int(np.count_nonzero(~in_input))


def _settle_files(index: StoreIndex, keep: np.ndarray, folder: Path, shards: int, shard_rows: int) -> None:
    """Rewrite (or remove) the first `shards` files where rows go, and append the kept rows of
    the rest (the journal) as new shards after the last."""
    total = np.bincount(index.file_of, minlength=len(index.files))
    kept = np.bincount(index.file_of[keep], minlength=len(index.files))
    starts = np.concatenate([[0], np.cumsum(total)])
    for n, path in enumerate(index.files[:shards]):
        if kept[n] == total[n]:
            continue
        if kept[n] == 0:
            storage.remove(path)
            continue
        with ShardWriter(folder, RAW_SCHEMA, shard_rows=int(kept[n]), start_index=_shard_index(path)) as writer:
            for batch in _kept_batches(path, keep[starts[n]:starts[n + 1]]):
                writer.write_batch(batch)
    if kept[shards:].any():
        journal = [n for n in range(shards, len(index.files)) if kept[n]]
        sources = _read_ahead([index.files[n] for n in journal]) if storage.is_remote(folder) else \
            iter([index.files[n] for n in journal])
        with ShardWriter(folder, RAW_SCHEMA, shard_rows=shard_rows, start_index=_next_shard_index(folder)) as writer:
            for n, source in zip(journal, sources):
                for batch in _kept_batches(source, keep[starts[n]:starts[n + 1]]):
                    writer.write_batch(batch)


def _read_ahead(paths: list[Path], depth: int = 2) -> Iterator[pa.Buffer]:
    """The bytes of each file in an object store, in order, the next `depth` downloading
    while one is used (journal files are small: at most `journal_bytes` each)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(depth, thread_name_prefix="imat-read-ahead") as pool:
        pending = [pool.submit(storage.read_bytes, p) for p in paths[:depth]]
        for i in range(len(paths)):
            data = pending[i].result()
            if i + depth < len(paths):
                pending.append(pool.submit(storage.read_bytes, paths[i + depth]))
            pending[i] = None  # type: ignore[call-overload]
            yield pa.py_buffer(data)


def _open_parquet(source: Path | pa.Buffer) -> Any:
    """A stored file, or its bytes already downloaded (`_read_ahead`), as a ParquetFile."""
    if isinstance(source, pa.Buffer):
        import pyarrow.parquet as pq

        return pq.ParquetFile(pa.BufferReader(source))
    return storage.parquet_file(source)


def _kept_batches(path: Path | pa.Buffer, mask: np.ndarray) -> Iterator[pa.RecordBatch]:
    """The rows of one stored file (or its bytes) where `mask` (one bool per row) is set,
    batch by batch."""
    if not mask.any():
        return
    with _open_parquet(path) as pf:
        at = 0
        for batch in pf.iter_batches(batch_size=1024, columns=RAW_SCHEMA.names):
            part = mask[at:at + batch.num_rows]
            at += batch.num_rows
            if part.all():
                yield batch
            elif part.any():
                yield batch.filter(pa.array(part))


def _renumber_shards(folder: Path) -> list[Path]:
    """Rename the shards to part-00000, part-00001, ... in their order. Each moves down to a
    free name, so a crash half-way leaves gaps and nothing worse."""
    paths = []
    for i, path in enumerate(list_shards(folder)):
        if path.name != shard_name(i):
            storage.replace(path, folder / shard_name(i))
        paths.append(folder / shard_name(i))
    if paths:
        storage.fsync_dir(folder)  # the renames, and the shards settling removed, are durable
    return paths
