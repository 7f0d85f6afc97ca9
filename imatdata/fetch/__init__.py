"""`imatdata fetch`: URL lists in, raw Parquet shards out, every record exactly once.

The run, in order:
1. validate every source (streaming; nothing written on a bad file);
2. read what earlier runs finished: the raw shards and the journal (metadata columns only);
3. stream the records again; those without a result go to the network (`download`), their
   bodies to the image workers (`imagepool`, running `images`), and every outcome to an append-only journal of
   small Parquet files flushed every few hundred rows or second.
   On a machine of more than 4 cores, several such loops run, each a process with its own
   share of the records, request caps, image workers and journal files (`--loops`).
   Meanwhile a thread seals each full shard's worth of journal rows into a raw shard;
4. when every record has a row, settle `raw/<split>/` from shards + journal (the newest row
   per record wins; untouched shards stay as they are), drop the journal, write the summary
   and the class statistics.

A `kill -9` at any moment loses only the requests in flight and the rows not yet flushed:
rerunning the same command reads the journal back and continues. Memory stays flat in the
length of the list: records stream, tasks are bounded, per-record state is one 8-byte key in
sorted numpy arrays, and the bytes of the bodies held (downloading, queued for and inside
the image workers) are bounded by `--memory` (a `ByteBudget` per loop), not by a count.

Settling keeps exactly the records of this run's lists: rows of earlier runs that they do
not hold (another list under the same split, a smaller --limit) would go, so the run refuses
before touching anything unless `--prune` says to delete them.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imatdata.fetch import images as imagework
from imatdata.fetch.download import INVALID_URL, MIN_MEMORY, ByteBudget, Download, Fetcher, NetConfig
from imatdata.fetch.imagepool import ImagePool, safe_path_children
from imatdata.errors import UserError
from imatdata.manifest import (RAW_SCHEMA, SHARD_PATTERN, STATUSES, RunLock, ShardWriter, fsync_dir, list_shards,
                               remove_stale_temps, resolve_root, shard_name, split_dir, write_bytes_atomic,
                               write_table_atomic)
from imatdata.fetch.sources import (Record, ScanResult, Source, invalid_key, read_records, record_key,
                              resolve_sources, scan_sources)

JOURNAL_DIR = ".journal"
LOCK_NAME = ".fetch.lock"
SUMMARY_NAME = "fetch_summary.json"
JOURNAL_SCHEMA = RAW_SCHEMA.append(pa.field("_key", pa.uint64(), nullable=False))
_STATUS_CODE = {s: i for i, s in enumerate(STATUSES)}
_NO_KEY = np.uint64(0)  # rows of earlier runs that carry no resumable key (old invalid rows)


@dataclass
class FetchOptions:
    """Everything one `imatdata fetch` run needs; the CLI fills it from flags."""

    sources: Sequence[str | Path]
    root: Path | None = None
    split: str | None = None
    net: NetConfig = field(default_factory=NetConfig)
    max_side: int = 512
    limit: int | None = None
    retry_failed: bool = False
    # Delete stored rows whose records this run's lists do not hold (else: refuse, exit 2).
    prune: bool = False
    skip_invalid: bool = False
    quiet: bool = False
    workers: int | None = None
    # Network event loops, each a process with its own share of the records, caps and image
    # workers (None: `default_loops()`). One loop's own work caps it near 700 images/s.
    loops: int | None = None
    max_pixels: int = imagework.DEFAULT_MAX_PIXELS
    resize_filter: str = imagework.DEFAULT_RESIZE_FILTER
    journal_rows: int = 512
    journal_seconds: float = 1.0
    # Rows waiting for the journal hold their stored images: flush before they pass this
    # (with --max-side 0 an image may be as large as its body).
    journal_bytes: int = 64 * 1024 * 1024
    shard_rows: int = 50_000
    seal_seconds: float = 5.0  # how often journal rows are checked for a full shard to seal
    # Records being worked on at once (waiting for a host slot, downloading, decoding).
    # More than --concurrency so one busy host cannot idle the others.
    pending: int | None = None
    # Most bodies sent to a worker in one round trip when a backlog builds up.
    image_batch: int = 8
    stats: bool = True

    def __post_init__(self) -> None:
        if self.max_side < 0:
            raise UserError("--max-side must be 0 (no limit) or a positive number of pixels")
        self.resize_filter = self.resize_filter.strip().lower()  # "Lanczos" is lanczos too
        if self.resize_filter not in imagework.RESIZE_FILTERS:
            raise UserError(f"--resize-filter {self.resize_filter!r}: use one of "
                            + ", ".join(imagework.RESIZE_FILTERS))
        if self.workers is not None and self.workers < 1:
            raise UserError("--workers must be at least 1")
        if self.loops is not None and self.loops < 1:
            raise UserError("--loops must be at least 1")


@dataclass
class FetchSummary:
    """What a run did (this run) and what raw/ now holds (all runs)."""

    root: str
    elapsed_s: float
    records: int
    already_done: int
    attempted: int
    this_run: dict[str, int]
    splits: dict[str, dict[str, int]]
    requests: int
    retries: int
    host_pauses: int
    hosts_given_up: int
    bytes_downloaded: int
    images_per_s: float
    rows_dropped_not_in_input: int
    shards: dict[str, list[str]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))  # respects taskset / container CPU sets
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_loops(cores: int) -> int:
    """One event loop up to 4 cores, then one per 4 cores. A loop spends ~1.3 ms of its own
    CPU per image (HTTP, feeding the workers, the journal), so one keeps up with about seven
    cores of image work on local photos and fewer on HTTPS; several keep every core busy."""
    return 1 if cores <= 4 else -(-cores // 4)


def _share(total: int, k: int, parts: int) -> int:
    """Part k of `total` split over `parts` as evenly as integers allow (they sum to total)."""
    return total // parts + (1 if k < total % parts else 0)


def is_transient(status: str, http_status: int | None) -> bool:
    """Failures that another try may fix (what --retry-failed re-attempts)."""
    if status in ("timeout", "connection_error"):
        return True
    return status == "http_error" and http_status is not None and (
        http_status >= 500 or http_status in (408, 429))


# --- the store: raw shards + journal ------------------------------------------------------------


def journal_dir(root: Path, split: str) -> Path:
    return root / "raw" / JOURNAL_DIR / split


def journal_files(root: Path, split: str) -> list[Path]:
    folder = journal_dir(root, split)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("j-") and p.suffix == ".parquet")


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
    journal = journal_files(root, split)
    files = shards + journal
    file_of, keys, status, transient = [], [], [], []
    for n, path in enumerate(files):
        is_journal = n >= len(shards)
        columns = ["id", "status", "http_status"] + (["_key"] if is_journal else ["error"])
        try:
            with pq.ParquetFile(path) as pf:
                # Batch by batch: a million ids never sit in memory as Python strings.
                for batch in pf.iter_batches(batch_size=65_536, columns=columns):
                    st = batch.column(1).to_pylist()
                    hs = batch.column(2).to_pylist()
                    if is_journal:
                        k = batch.column(3).to_numpy(zero_copy_only=False).astype(np.uint64)
                    else:
                        ids = batch.column(0).to_pylist()
                        errors = batch.column(3).to_pylist() if "invalid" in st else [None] * len(st)
                        # Rows of invalid input records are rebuilt from the input on every run:
                        # no key needed. A URL the downloader could not parse was a valid record.
                        k = np.fromiter((_NO_KEY if s == "invalid" and not (e or "").startswith(INVALID_URL)
                                         else record_key(split, i) for i, s, e in zip(ids, st, errors)),
                                        dtype=np.uint64, count=len(ids))
                    file_of.append(np.full(len(st), n, dtype=np.int32))
                    keys.append(k)
                    status.append(np.fromiter((_STATUS_CODE.get(s, 0) for s in st), dtype=np.uint8,
                                              count=len(st)))
                    transient.append(np.fromiter((is_transient(s, h) for s, h in zip(st, hs)), dtype=bool,
                                                 count=len(st)))
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{path}: unreadable ({exc}); move it away and rerun to fetch its rows again") from None

    def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)

    return StoreIndex(files, cat(file_of, np.int32), cat(keys, np.uint64), cat(status, np.uint8),
                      cat(transient, bool))


def done_keys(index: StoreIndex, wanted: np.ndarray, retry_failed: bool) -> np.ndarray:
    """Sorted keys of `wanted` records that already have a row (and need no retry)."""
    rows = index.latest()
    if retry_failed:
        rows = rows[~index.transient[rows]]
    keys = np.sort(index.keys[rows])
    return keys[_member(keys, wanted)]


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if sorted_set.size == 0 or values.size == 0:
        return np.zeros(values.size, dtype=bool)
    pos = np.searchsorted(sorted_set, values)
    pos[pos >= sorted_set.size] = 0
    return sorted_set[pos] == values


# --- sealing: full shards' worth of journal rows become raw shards while the fetch runs ------------


def seal_journal(root: Path, split: str, shard_rows: int, stop: threading.Event | None = None) -> Path | None:
    """Move the oldest journal files of `split`, a shard's worth of rows, into the next raw shard.

    Seals only when more rows wait than one shard holds, so the shard comes out full; returns
    it, or None. The files taken are always the oldest (a prefix in name order), so the shard
    still ranks below every row left in the journal and the newest row of a record still wins.
    `invalid` rows are rebuilt from the input on every run and need their journal key, which a
    shard cannot hold: they move to a journal file of their own instead. The shard is committed
    before any journal file goes, so a crash in between only leaves rows twice (the journal
    copy wins; finalising drops the other).
    """
    take, rows = [], 0
    for path in journal_files(root, split):
        if path.stem.endswith(_CARRIED):
            n = 0  # invalid rows only, carried again: they never fill a shard
        else:
            with pq.ParquetFile(path) as pf:
                n = pf.metadata.num_rows
        if rows and rows + n > shard_rows:
            break
        take.append(path)
        rows += n
    else:
        return None  # everything waiting fits in one shard: leave it to grow (or to finalising)
    folder = split_dir(root, "raw", split)
    writer = ShardWriter(folder, RAW_SCHEMA, shard_rows=rows, start_index=_next_shard_index(folder))
    invalid: list[pa.RecordBatch] = []
    try:
        for path in take:
            if stop is not None and stop.is_set():
                writer.abort()
                return None
            with pq.ParquetFile(path) as pf:
                for batch in pf.iter_batches(batch_size=128):  # images inside: a bounded slice at a time
                    is_invalid = pc.equal(batch.column("status"), "invalid")
                    invalid.append(batch.filter(is_invalid))
                    writer.write_batch(batch.filter(pc.invert(is_invalid)).select(RAW_SCHEMA.names))
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    carried = pa.Table.from_batches(invalid, schema=JOURNAL_SCHEMA)
    carry = take[-1].with_name(take[-1].stem + _CARRIED + ".parquet")  # sorts just before take[-1]
    if carried.num_rows:
        write_table_atomic(carried, carry, compression="none")
    for path in take:
        if path != carry or not carried.num_rows:  # an older carry of that name was just replaced
            path.unlink(missing_ok=True)
    fsync_dir(take[0].parent)
    return shards[0] if shards else None


_CARRIED = "-i"  # suffix of a journal file holding the invalid rows of sealed ones


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
                    while not self._stop.is_set() and seal_journal(self.root, split, self.shard_rows, self._stop):
                        pass
            except (OSError, pa.ArrowException):
                return  # disk full, say: the journal is intact and finalising will report it
            except BaseException as exc:
                self._error = exc
                return


class Journal:
    """Append-only rows of one run: small Parquet files, each written whole then renamed, so a
    crash leaves complete files only (at most the unflushed rows are lost)."""

    def __init__(self, root: Path, flush_rows: int, flush_seconds: float, run: str | None = None,
                 tag: str = "", flush_bytes: int = 64 * 1024 * 1024) -> None:
        self.root = root
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.flush_bytes = flush_bytes
        # Names sort in the order rows were written (newest row per record wins): the run's
        # start time, then (several loops) the loop, then a sequence number.
        self._run = run or new_run_id()
        self._tag = tag
        self._seq = 0
        self._buffers: dict[str, list[dict[str, Any]]] = {}
        self._buffered = 0
        self._bytes = 0  # stored images in the buffered rows
        self._last_flush = time.monotonic()
        self._lock = asyncio.Lock()
        self.rows_written = 0

    def add(self, split: str, row: dict[str, Any]) -> None:
        self._buffers.setdefault(split, []).append(row)
        self._buffered += 1
        self._bytes += len(row.get("image") or b"")

    def due(self) -> bool:
        return self._buffered >= self.flush_rows or self.heavy() or (
            self._buffered > 0 and time.monotonic() - self._last_flush >= self.flush_seconds)

    def heavy(self) -> bool:
        """The buffered rows hold images enough to flush now rather than at the next tick."""
        return self._bytes >= self.flush_bytes

    async def flush(self) -> None:
        async with self._lock:
            buffers, self._buffers, self._buffered, self._bytes = self._buffers, {}, 0, 0
            self._last_flush = time.monotonic()
            for split, rows in buffers.items():
                if rows:
                    path = self._next_path(split)
                    # Encoding and fsync happen off the event loop so downloads keep moving.
                    await asyncio.to_thread(_write_journal_file, rows, path)
                    self.rows_written += len(rows)

    def flush_now(self) -> None:
        """Synchronous flush for the interrupt path, when the loop is going away."""
        buffers, self._buffers, self._buffered, self._bytes = self._buffers, {}, 0, 0
        for split, rows in buffers.items():
            if rows:
                _write_journal_file(rows, self._next_path(split))
                self.rows_written += len(rows)

    def _next_path(self, split: str) -> Path:
        self._seq += 1
        return journal_dir(self.root, split) / f"j-{self._run}-{self._tag}{self._seq:08d}.parquet"


def new_run_id() -> str:
    return f"{int(time.time() * 1000):013d}"


def _write_journal_file(rows: list[dict[str, Any]], path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=JOURNAL_SCHEMA)
    # Images are JPEGs already; compressing the journal would only burn CPU.
    write_table_atomic(table, path, compression="none")


# --- rows ---------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(timezone.utc)


def base_row(split: str, rec: Record, key: int) -> dict[str, Any]:
    return {"id": rec.id, "split": split, "label": rec.label, "url": rec.url, "_key": key,
            "attempts": 0, "fetched_at": _now()}


def failure_row(split: str, rec: Record, key: int, d: Download) -> dict[str, Any]:
    row = base_row(split, rec, key)
    row.update(status=d.status, error=d.error, http_status=d.http_status, attempts=min(d.attempts, 127))
    return row


def image_row(split: str, rec: Record, key: int, d: Download, res: imagework.ImageResult) -> dict[str, Any]:
    row = base_row(split, rec, key)
    row.update(status=res.status, error=res.error, http_status=d.http_status, attempts=min(d.attempts, 127),
               orig_bytes=res.orig_bytes, sha256=res.sha256, orig_width=res.orig_width,
               orig_height=res.orig_height)
    if res.status == "ok":
        row.update(image=res.image, image_format=res.image_format, width=res.width, height=res.height)
    return row


# --- progress ---------------------------------------------------------------------------------


@dataclass
class Counters:
    done: int = 0
    ok: int = 0
    failed: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_split: dict[str, Counter[str]] = field(default_factory=dict)

    def count(self, split: str, status: str) -> None:
        self.done += 1
        if status == "ok":
            self.ok += 1
        else:
            self.failed += 1
        self.by_status[status] += 1
        self.by_split.setdefault(split, Counter())[status] += 1


class Progress:
    """A rich progress line (done/total, ok, failed, images/s, ETA); silent with --quiet."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total = total
        self.quiet = quiet
        self.started = time.monotonic()
        self._bar = None
        self._task = None

    def __enter__(self) -> Progress:
        if not self.quiet:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(
                TextColumn("[bold]fetch"), BarColumn(), MofNCompleteColumn(),
                TextColumn("[green]ok {task.fields[ok]}"), TextColumn("[red]failed {task.fields[failed]}"),
                TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=Console(stderr=True), refresh_per_second=4)
            self._bar.__enter__()
            self._task = self._bar.add_task("fetch", total=self.total, ok=0, failed=0, rate="0.0")
        return self

    def update(self, c: Counters) -> None:
        if self._bar is not None:
            elapsed = max(1e-6, time.monotonic() - self.started)
            self._bar.update(self._task, completed=c.done, ok=c.ok, failed=c.failed, rate=f"{c.ok / elapsed:.1f}")

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


# --- the run ------------------------------------------------------------------------------------


def run_fetch(opts: FetchOptions) -> FetchSummary:
    """Validate, fetch what is missing, settle raw/ shards, write summary and stats."""
    root = resolve_root(opts.root)
    started = time.monotonic()
    # Validation comes first and writes nothing: a bad list leaves the disk as it was.
    sources = resolve_sources(opts.sources, opts.split)
    scan = scan_sources(sources, limit=opts.limit, skip_invalid=opts.skip_invalid)
    with RunLock(root / "raw" / LOCK_NAME,
                 f"another imatdata fetch is writing {root / 'raw'}; wait for it or stop it"):
        indexes = {split: index_store(root, split) for split in scan.split_keys}
        if not opts.prune:
            refuse_pruning(indexes, scan.split_keys)  # before anything is fetched or written
        done: dict[str, np.ndarray] = {}
        for split, wanted in scan.split_keys.items():
            remove_stale_temps(split_dir(root, "raw", split))
            remove_stale_temps(journal_dir(root, split))
            done[split] = done_keys(indexes.pop(split), wanted, opts.retry_failed)
        already = sum(int(d.size) for d in done.values())
        total = sum(int(k.size) for k in scan.split_keys.values())
        counters = Counters()
        fetcher_stats: dict[str, int] = {}
        loops = _loop_count(opts, total - already)
        with Sealer(root, list(scan.split_keys), opts.shard_rows, opts.seal_seconds):
            if total - already > 0 and loops > 1:
                fetcher_stats = _fetch_parallel(opts, root, sources, scan, done, counters, total - already, loops)
            elif total - already > 0:
                journal = Journal(root, opts.journal_rows, opts.journal_seconds, flush_bytes=opts.journal_bytes)
                fetcher_stats = asyncio.run(_fetch_all(opts, root, sources, scan, done, journal, counters,
                                                       total - already))
        if opts.stats:
            _preload("imatdata.stats.plots")  # ~1 s of matplotlib import, hidden behind the settle
        splits, shards, dropped = {}, {}, 0
        for split, wanted in scan.split_keys.items():
            counts, paths, extra = finalize_split(root, split, wanted, opts.shard_rows)
            splits[split], shards[split], dropped = counts, [str(p) for p in paths], dropped + extra
    elapsed = time.monotonic() - started
    summary = FetchSummary(
        root=str(root), elapsed_s=round(elapsed, 3), records=total, already_done=already,
        attempted=counters.done, this_run=dict(counters.by_status), splits=splits,
        requests=fetcher_stats.get("requests", 0), retries=fetcher_stats.get("retries", 0),
        host_pauses=fetcher_stats.get("host_pauses", 0), hosts_given_up=fetcher_stats.get("hosts_given_up", 0),
        bytes_downloaded=fetcher_stats.get("bytes_in", 0),
        images_per_s=round(counters.ok / elapsed, 2) if elapsed > 0 else 0.0,
        rows_dropped_not_in_input=dropped, shards=shards)
    write_bytes_atomic((json.dumps(summary.to_json(), indent=2) + "\n").encode(), root / "raw" / SUMMARY_NAME)
    if opts.stats:
        from imatdata.stats import write_stats

        write_stats(root, stage="raw")
    return summary


def unlisted_rows(index: StoreIndex, wanted: np.ndarray) -> tuple[int, int]:
    """(rows, ok rows) stored for a split whose records are not in `wanted`: what settling the
    split would delete (the newest row of each such record, as `finalize_split` counts them)."""
    rows = index.latest()
    gone = rows[~_member(index.keys[rows], wanted)]
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


def _preload(module: str) -> threading.Thread:
    """Import `module` on a thread now, so a later import finds it done. Settling the shards
    runs mostly in Arrow's C++ code without the GIL and leaves a core idle; an import there
    costs no wall time. A failed import is left for the real one to report."""
    def load() -> None:
        try:
            importlib.import_module(module)
        except Exception:
            pass

    thread = threading.Thread(target=load, name=f"preload-{module}", daemon=True)
    thread.start()
    return thread


async def _fetch_all(opts: FetchOptions, root: Path, sources: list[Source], scan: ScanResult,
                     done: dict[str, np.ndarray], journal: Journal, counters: Counters, total: int,
                     part: tuple[int, int] = (0, 1),
                     on_tick: Callable[[Counters], None] | None = None) -> dict[str, int]:
    """Fetch every record without a row; with `part=(k, n)`, only those whose key is k mod n."""
    _return_freed_bodies_to_os()
    workers = opts.workers or default_workers()
    pool = ImagePool(workers, opts.max_side, opts.max_pixels, opts.resize_filter, batch=opts.image_batch)
    await pool.start()
    pending = asyncio.Semaphore(opts.pending or max(2 * opts.net.concurrency, 64))
    # A body counts against it from before its request until its row is built, so it also
    # bounds what the pool's queue, its sockets and the workers hold (their copies of a body
    # come on top: see download.DEFAULT_MEMORY).
    budget = ByteBudget(opts.net.memory)
    tasks: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []

    async def one(split: str, rec: Record, key: int) -> None:
        d: Download | None = None
        try:
            d = await fetcher.fetch(rec.url or "")
            if d.status == "ok" and d.body is not None:
                res = await pool.process(d.body)
                row = image_row(split, rec, key, d, res)
            else:
                row = failure_row(split, rec, key, d)
            d.release()  # the row is built: the body's bytes go back now, not after the flush below
            journal.add(split, row)
            counters.count(split, row["status"])
            if journal.heavy():
                await journal.flush()
        except Exception as exc:  # a bug, not a network problem: stop the run, keep the journal
            failures.append(exc)
        finally:
            if d is not None:
                d.release()
            pending.release()

    async def ticker(progress: Progress) -> None:
        while True:
            await asyncio.sleep(0.25)
            progress.update(counters)
            if on_tick is not None:
                on_tick(counters)
            if journal.due():
                await journal.flush()

    with Progress(total, opts.quiet) as progress:
        tick = asyncio.create_task(ticker(progress))
        try:
            async with Fetcher(opts.net, budget=budget) as fetcher:
                for scanned in scan.sources:
                    src = scanned.source
                    split_done = done[src.split]
                    skipped = 0
                    for rec in read_records(src, opts.limit):
                        if failures:
                            raise failures[0]
                        problem = scanned.invalid.get(rec.index)
                        key = (invalid_key(src.split, src.path.name, rec.index) if problem is not None
                               else record_key(src.split, rec.id))
                        if (part[1] > 1 and key % part[1] != part[0]) or _contains(split_done, key):
                            skipped += 1
                            if skipped % 2048 == 0:
                                await asyncio.sleep(0)  # resuming a long list: let the loop breathe
                            continue
                        if problem is not None:
                            row = base_row(src.split, rec, key)
                            row.update(status="invalid", error=problem)
                            journal.add(src.split, row)
                            counters.count(src.split, "invalid")
                            continue
                        await pending.acquire()
                        task = asyncio.create_task(one(src.split, rec, key))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        if journal.due():
                            await journal.flush()
                if tasks:
                    await asyncio.gather(*tasks)
                if failures:
                    raise failures[0]
                stats = fetcher.stats
            await journal.flush()
            progress.update(counters)
            if on_tick is not None:
                on_tick(counters)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            journal.flush_now()  # keep every finished row: the rerun resumes after them
            raise
        finally:
            tick.cancel()
            await pool.close()
    return {"requests": stats.requests, "retries": stats.retries, "host_pauses": stats.host_pauses,
            "hosts_given_up": stats.hosts_given_up, "bytes_in": stats.bytes_in}


def _return_freed_bodies_to_os() -> None:
    """Make glibc give a freed body's memory back to the OS at once.

    glibc serves allocations above its mmap threshold with mmap (returned on free), but it
    raises that threshold to the size of each such block freed, up to 32 MiB; after the first
    large body, the next ones come from the heap, where freed space stays resident. Holding
    the threshold at 1 MiB keeps large bodies in mmap, so the resident size follows the
    bodies held (--memory) rather than the most ever held. No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD; setting it turns off the raising
    except (OSError, AttributeError):
        pass  # not glibc (musl has no mallopt): nothing to tune


# --- several loops ------------------------------------------------------------------------------


def _loop_count(opts: FetchOptions, remaining: int) -> int:
    """Loops for this run: as asked (or `default_loops`, for runs of some size), but never more
    than there are image workers, per-host or global request slots, or MiBs of --memory to
    share out."""
    workers = opts.workers or default_workers()
    if opts.loops is not None:
        wanted = opts.loops
    else:  # not worth the processes for a small run
        wanted = min(default_loops(default_workers()), max(1, remaining // 256))
    return max(1, min(wanted, workers, opts.net.per_host, opts.net.concurrency, opts.net.memory // MIN_MEMORY))


def _fetch_parallel(opts: FetchOptions, root: Path, sources: list[Source], scan: ScanResult,
                    done: dict[str, np.ndarray], counters: Counters, total: int, loops: int) -> dict[str, int]:
    """Run `loops` event loops in child processes, loop k taking the records whose key is k
    mod `loops`, with its share of --concurrency, --per-host, the pending bound and the image
    workers (so every cap still holds for the run as a whole). Each writes its own journal
    files; this process shows the progress and merges what they report.

    A failing loop stops the others (they flush their journals first, so a rerun resumes).
    Each host's failure history is per loop: a dead host is detected by every loop."""
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")  # no forked copies of this process's threads
    workers = opts.workers or default_workers()
    pending = opts.pending or max(2 * opts.net.concurrency, 64)
    shared = ctx.Array("q", 3 * loops, lock=False)  # done, ok, failed per loop
    run = new_run_id()
    procs, conns = [], []
    try:
        for k in range(loops):
            net = replace(opts.net, concurrency=_share(opts.net.concurrency, k, loops),
                          per_host=_share(opts.net.per_host, k, loops), memory=_share(opts.net.memory, k, loops))
            child = replace(opts, net=net, workers=_share(workers, k, loops), loops=1, quiet=True,
                            pending=max(1, _share(pending, k, loops)), stats=False)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_loop_process, name=f"imatdata-fetch-loop-{k}",
                               args=(child, root, sources, scan, done, run, k, loops, shared, send, os.getpid()))
            with safe_path_children():  # no struct.py from the working directory in a loop
                proc.start()
            send.close()
            procs.append(proc)
            conns.append(recv)
        results: dict[int, tuple[Any, ...]] = {}
        with Progress(total, opts.quiet) as progress:
            live = {conn: k for k, conn in enumerate(conns)}
            while live:
                for conn in wait(list(live), timeout=0.25):
                    k = live.pop(conn)
                    try:
                        results[k] = conn.recv()
                    except EOFError:
                        procs[k].join(5)
                        results[k] = ("died", procs[k].exitcode)
                    if results[k][0] != "done":
                        _raise_for(results[k])
                view = Counters()
                view.done, view.ok, view.failed = (sum(shared[i::3]) for i in range(3))
                progress.update(view)
    except BaseException:
        _stop_loops(procs)
        raise
    for proc in procs:
        proc.join()
    stats: Counter[str] = Counter()
    for _, part, part_stats in results.values():
        counters.done += part.done
        counters.ok += part.ok
        counters.failed += part.failed
        counters.by_status.update(part.by_status)
        for split, by in part.by_split.items():
            counters.by_split.setdefault(split, Counter()).update(by)
        stats.update(part_stats)
    return dict(stats)


def _raise_for(result: tuple[Any, ...]) -> None:
    kind = result[0]
    if kind == "interrupted":
        raise KeyboardInterrupt
    if kind == "error":
        raise UserError(result[1])
    if kind == "died":
        raise UserError(f"a fetch loop process died (exit code {result[1]}); rerun the same command "
                        "to resume")
    raise RuntimeError(f"a fetch loop failed: {result[1]} (its traceback is printed above)")


def _stop_loops(procs: list[Any]) -> None:
    """Interrupt the loops still running (each flushes its journal), then reap them."""
    for proc in procs:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


def _loop_process(opts: FetchOptions, root: Path, sources: list[Source], scan: ScanResult,
                  done: dict[str, np.ndarray], run: str, k: int, loops: int, shared: Any, conn: Any,
                  parent: int) -> None:
    """One loop's process: its share of the records, reported through `shared` and `conn`."""
    journal = Journal(root, opts.journal_rows, opts.journal_seconds, run=run, tag=f"{k:03d}-",
                      flush_bytes=opts.journal_bytes)
    counters = Counters()

    def tick(c: Counters) -> None:
        shared[3 * k:3 * k + 3] = [c.done, c.ok, c.failed]
        if os.getppid() != parent:  # the fetch was killed (kill -9): keep what is done, stop
            os.kill(os.getpid(), signal.SIGINT)

    def report(*message: Any) -> None:
        try:
            conn.send(message)
        except OSError:
            pass  # the fetch is gone; the journal holds the rows

    try:
        stats = asyncio.run(_fetch_all(opts, root, sources, scan, done, journal, counters, 0,
                                       part=(k, loops), on_tick=tick))
        report("done", counters, stats)
    except UserError as exc:
        report("error", str(exc))
    except KeyboardInterrupt:
        report("interrupted")
    except BaseException as exc:
        traceback.print_exc()
        report("bug", f"{type(exc).__name__}: {exc}")


def _contains(sorted_keys: np.ndarray, key: int) -> bool:
    if sorted_keys.size == 0:
        return False
    k = np.uint64(key)
    i = int(np.searchsorted(sorted_keys, k))
    return i < sorted_keys.size and sorted_keys[i] == k


# --- finalising -----------------------------------------------------------------------------------


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
    in_input = _member(index.keys[rows], wanted)
    keep_rows = np.sort(rows[in_input])
    missing = int(wanted.size - keep_rows.size)
    if missing:
        raise UserError(f"raw/{split}: {missing} records have no result yet; rerun the same command to fetch them")
    stale = int(np.count_nonzero(~in_input))
    keep = np.zeros(index.keys.size, dtype=bool)
    keep[keep_rows] = True
    folder = split_dir(root, "raw", split)
    journal = [p for p in index.files if p.parent == journal_dir(root, split)]
    shards = len(index.files) - len(journal)
    total = np.bincount(index.file_of, minlength=len(index.files))
    kept = np.bincount(index.file_of[keep_rows], minlength=len(index.files))
    starts = np.concatenate([[0], np.cumsum(total)])
    for n, path in enumerate(index.files[:shards]):
        if kept[n] == total[n]:
            continue
        if kept[n] == 0:
            path.unlink()
            continue
        with ShardWriter(folder, RAW_SCHEMA, shard_rows=int(kept[n]), start_index=_shard_index(path)) as writer:
            for batch in _kept_batches(path, keep[starts[n]:starts[n + 1]]):
                writer.write_batch(batch)
    if kept[shards:].any():
        with ShardWriter(folder, RAW_SCHEMA, shard_rows=shard_rows, start_index=_next_shard_index(folder)) as writer:
            for n in range(shards, len(index.files)):
                for batch in _kept_batches(index.files[n], keep[starts[n]:starts[n + 1]]):
                    writer.write_batch(batch)
    paths = _renumber_shards(folder)
    if not paths:  # an empty split still gets one (empty) shard so readers see the split exists
        write_table_atomic(RAW_SCHEMA.empty_table(), folder / shard_name(0))
        paths = [folder / shard_name(0)]
    for p in journal:
        p.unlink(missing_ok=True)
    counts = Counter(STATUSES[c] for c in index.status[keep_rows].tolist())
    return {s: counts.get(s, 0) for s in STATUSES if counts.get(s, 0)} | {"records": int(keep_rows.size)}, paths, stale


def _kept_batches(path: Path, mask: np.ndarray) -> Iterator[pa.RecordBatch]:
    """The rows of one stored file where `mask` (one bool per row) is set, batch by batch."""
    if not mask.any():
        return
    with pq.ParquetFile(path) as pf:
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
            os.replace(path, folder / shard_name(i))
        paths.append(folder / shard_name(i))
    if paths:
        fsync_dir(folder)
    return paths


# --- CLI helpers ----------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(text: str | int, flag: str = "--max-bytes") -> int:
    """'20MiB', '512KB', '1.5GB', '1048576' -> bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    if isinstance(text, int):
        return text
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise UserError(f"{flag} {text!r}: use a number of bytes with an optional unit, e.g. 20MiB, 512KB, 1000000")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def render_summary(summary: FetchSummary, console: Any) -> None:
    """The end-of-run table: rows by status, one column per split, plus this run's figures."""
    from rich.table import Table

    splits = list(summary.splits)
    table = Table(title=f"imatdata fetch: {summary.records} records in {summary.root}/raw")
    table.add_column("status")
    for split in splits:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    for status in STATUSES:
        values = [summary.splits[s].get(status, 0) for s in splits]
        if any(values):
            table.add_row(status, *(str(v) for v in values), str(sum(values)))
    table.add_row("[bold]records", *(str(summary.splits[s]["records"]) for s in splits), str(summary.records))
    console.print(table)
    console.print(
        f"this run: {summary.attempted} records in {summary.elapsed_s:.1f}s "
        f"({summary.already_done} already done), {summary.this_run.get('ok', 0)} ok, "
        f"{summary.images_per_s:.1f} images/s, {summary.requests} requests, {summary.retries} retries"
        + (f", {summary.hosts_given_up} hosts given up" if summary.hosts_given_up else ""))
    if summary.rows_dropped_not_in_input:
        console.print(f"dropped {summary.rows_dropped_not_in_input} rows of earlier runs whose records are not in "
                      "this input")
    console.print(f"shards: {summary.root}/raw/<split>/part-*.parquet; summary: {summary.root}/raw/{SUMMARY_NAME}")
