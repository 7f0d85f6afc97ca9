"""`imatdata clean`: verify, size-check, hash and deduplicate the raw manifest in one pass.

Reads `raw/<split>/` shards and writes, for the whole stage at once:

* `clean/<split>/part-NNNNN.parquet` - the kept rows, bytes copied unchanged, plus `phash`;
* `clean/dropped.parquet` - every row left out: `id, split, label, url, reason, detail`;
* `clean/flags.parquet` - same columns: the **test** rows that a check would have dropped.
  Test rows are never dropped (predict must answer every test id); they all stay in
  `clean/test`, failed fetches included, and what was wrong with them is recorded here.

Per split, rows in clean + rows in dropped = rows in raw, always.

Checks, in order of precedence (a row gets the first reason that applies):

1. `fetch_failed` - status is not `ok`. detail: `status=<status>: <error>`.
2. `broken` - the stored bytes do not decode to the end, or decode to a size other than the
   manifest's width x height. detail: the decoder's message.
3. `undersized` - the shorter side of the image as served (`orig_width/orig_height`, else the
   stored size) is below `--min-size`. detail: `original <w>x<h>, shorter side <s> < <min>`.
4. `bad_aspect` - long side / short side of the original above `--max-aspect` (0 = off).
5. `placeholder` - a duplicate group (see below) holding at least `--placeholder-min-urls`
   distinct URLs with at least `--placeholder-min-classes` distinct labels: one image behind
   many unrelated URLs, such as a dead-link picture. Every row of the group goes.
   detail: `urls=<n> classes=<k> rows=<r>`.
6. `leak` - a train row in a group that also holds a val or test row: the train row goes.
   detail: `twin=<id> split=<split> distance=<d>` naming the closest held-out image.
7. `label_conflict` - in a group (per split) whose labels disagree, the majority label's
   representative is kept and the other labels' rows go, detail
   `kept=<id> distance=<d> label=<own> majority=<label>`; when the top labels tie, every
   row of the group goes, detail `tie labels=<a>,<b> rows=<n>`.
8. `duplicate` / `near_duplicate` - the other rows of a group (per split) go, keeping the
   largest original (area, then bytes served, then input order). `duplicate` when the row's
   sha256 equals the kept row's, `near_duplicate` otherwise. detail `kept=<id> distance=<d>`.

Duplicate groups. Two rows are *exact* duplicates when the sha256 of the body as served is
equal (fetch's `sha256` column; when it is missing, the sha256 of the stored bytes). They
are *near* duplicates when their 64-bit perceptual hashes differ in at most
`--hash-distance` bits. Groups are the connected components of these links (union-find),
within and across classes and splits, restricted to rows that passed checks 1-4 (test rows
take part whenever they could be hashed, flagged or not). `--dedup exact` links exact
duplicates only; `--dedup off` forms no groups, so checks 5-8 are all off. A group is
resolved per split for checks 7-8; `leak` is what links train to val/test.

The perceptual hash is imagehash's `phash` (DCT of a 32x32 grayscale), packed MSB first as
`int(str(imagehash.phash(img)), 16)` and stored as a signed int64. For JPEG the image is
decoded with Pillow's `draft()` at the smallest DCT scale that keeps both sides >= 64 px:
every entropy-coded byte is still decoded (so truncation is still caught), only the inverse
DCT is done at reduced size (2-3x faster than a full decode). The hash can thus differ from
`phash` of a full-resolution decode by a few bits (none for most photos; 2, sometimes 4 or
8, where a DCT coefficient sits at the median phash thresholds on); every hash within imat
is computed the same way (`image_phash`), so distances between them are consistent.

Speed and memory: hashing runs in a process pool (spawn-safe: the worker is a top-level
function over plain bytes) fed with batches streamed one row group at a time, with at most
two batches per worker in flight, so only ids, labels, sizes and hashes of a split are held
in memory, never its image bytes; a second streaming pass writes the kept rows. The whole
new `clean/` is built beside the old one and swapped in by rename, so readers see the old
stage or the new one, whole; `raw/` is only ever read.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import shutil
import signal
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from imatdata.clean import dedup
from imatdata.errors import UserError
from imatdata.fetch.imagepool import safe_path_children
from imatdata.manifest import (
    CLEAN_SCHEMA,
    DROP_REASONS,
    DROPPED_SCHEMA,
    RunLock,
    ShardWriter,
    list_shards,
    list_splits,
    read_row_group,
    row_groups,
    shard_name,
    write_table_atomic,
)

DEDUP_MODES = ("near", "exact", "off")
TRAIN_SPLIT = "train"
TEST_SPLIT = "test"
# Splits whose images a train image must not duplicate.
HELD_OUT_SPLITS = ("val", "test")
# JPEG draft target for hashing: phash looks at 32x32, so 64 px leaves margin for resampling.
HASH_DRAFT_SIDE = 64
MAX_HASH_DISTANCE = 32

_KEEP = 0
_SPLIT_ORDER = {TRAIN_SPLIT: 0, "val": 1, TEST_SPLIT: 2}
_REASON_CODE = {reason: k + 1 for k, reason in enumerate(DROP_REASONS)}
_PASS1_COLUMNS = ["id", "label", "url", "status", "error", "image", "width", "height",
                  "orig_width", "orig_height", "orig_bytes", "sha256"]

ProgressFn = Callable[[str, int, int], None]


# --- configuration and results -------------------------------------------------------------


@dataclass(frozen=True)
class CleanConfig:
    """The knobs of `imatdata clean`; defaults are SPEC.md's."""

    min_size: int = 64
    max_aspect: float = 0.0
    dedup: str = "near"
    hash_distance: int = 4
    placeholder_min_urls: int = 10
    placeholder_min_classes: int = 3
    workers: int | None = None  # None: every core; 1: hash in this process
    batch_rows: int = 256  # rows per hashing task (bytes of ~256 images in flight per worker)
    # Spawned workers behave the same on Linux, macOS and Windows, and a fork beside the
    # progress bar's refresh thread could inherit a held lock; start-up costs ~1 s, once.
    start_method: str = "spawn"

    def __post_init__(self) -> None:
        if self.min_size < 0:
            raise UserError("--min-size must be zero or more (pixels of the shorter side)")
        if self.max_aspect != 0 and self.max_aspect < 1:
            raise UserError("--max-aspect must be 0 (off) or at least 1 (long side / short side)")
        if self.dedup not in DEDUP_MODES:
            raise UserError(f"--dedup must be one of {', '.join(DEDUP_MODES)}, not {self.dedup!r}")
        if not 0 <= self.hash_distance <= MAX_HASH_DISTANCE:
            raise UserError(f"--hash-distance must be between 0 and {MAX_HASH_DISTANCE} bits")
        if self.placeholder_min_urls < 2:
            raise UserError("--placeholder-min-urls must be at least 2")
        if self.placeholder_min_classes < 1:
            raise UserError("--placeholder-min-classes must be at least 1")
        if self.workers is not None and self.workers < 1:
            raise UserError("--workers must be at least 1")
        if self.batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")

    @property
    def n_workers(self) -> int:
        return self.workers if self.workers is not None else max(1, os.cpu_count() or 1)


@dataclass
class SplitReport:
    split: str
    raw: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    flagged: Counter[str] = field(default_factory=Counter)


@dataclass
class CleanResult:
    root: Path
    config: CleanConfig
    splits: dict[str, SplitReport]
    clean_dir: Path
    dropped_path: Path
    flags_path: Path
    hashed: int = 0
    groups: int = 0
    hash_seconds: float = 0.0
    dedup_seconds: float = 0.0
    write_seconds: float = 0.0
    stats_written: bool = False

    @property
    def total_dropped(self) -> int:
        return sum(sum(r.dropped.values()) for r in self.splits.values())


# --- hashing (runs in worker processes) ----------------------------------------------------


def phash_int64(img: Image.Image) -> int:
    """imagehash's 64-bit phash of `img` as a signed int64 (bits MSB first)."""
    bits = np.packbits(imagehash.phash(img).hash.flatten())
    return int.from_bytes(bits.tobytes(), "big", signed=True)


def _decode_for_hash(data: bytes) -> tuple[Image.Image, int, int]:
    """Decode all of `data` (JPEG at reduced DCT scale); returns the image and its full size."""
    with warnings.catch_warnings():
        # A "possibly corrupt EXIF" or palette warning is not breakage; errors still raise.
        warnings.simplefilter("ignore")
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if img.format == "JPEG":
            img.draft("L", (HASH_DRAFT_SIDE, HASH_DRAFT_SIDE))
        img.load()
    return img, width, height


def image_phash(data: bytes) -> int:
    """The phash clean stores for these image bytes (raises if they do not decode)."""
    img, _, _ = _decode_for_hash(data)
    return phash_int64(img)


@dataclass(frozen=True)
class HashedRow:
    phash: int | None
    width: int | None  # decoded size
    height: int | None
    error: str | None  # why the bytes are broken
    sha256: bytes | None  # digest of the stored bytes, when asked for


def hash_batch(images: Sequence[bytes | None], want_sha: Sequence[bool]) -> list[HashedRow]:
    """Decode and hash a batch of stored images. A top-level function: spawn-safe."""
    out = []
    for data, sha in zip(images, want_sha):
        if data is None:
            out.append(HashedRow(None, None, None, "status is ok but the row has no image bytes", None))
            continue
        digest = hashlib.sha256(data).digest() if sha else None
        try:
            img, width, height = _decode_for_hash(data)
            ph = phash_int64(img)
        except Exception as exc:  # any decoder failure is the finding, not a crash
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            out.append(HashedRow(None, None, None, f"does not decode: {msg}", digest))
            continue
        out.append(HashedRow(ph, width, height, None, digest))
    return out


def _ignore_sigint() -> None:
    """Hashing workers leave Ctrl-C to the parent, which stops the run with one line (each
    worker would otherwise print a KeyboardInterrupt traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- pass 1: per-row checks and hashes ------------------------------------------------------


@dataclass
class _Rows:
    """Everything pass 1 keeps per row of all splits (no image bytes), indexed globally."""

    splits: list[str]
    offsets: list[int]  # global index of each split's first row
    ids: list[pa.Array] = field(default_factory=list)
    split_code: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    label: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    has_label: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    url_key: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    area: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    served_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sha: np.ndarray = field(default_factory=lambda: np.zeros(0, "S32"))
    phash: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    has_hash: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    reason: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    detail: dict[int, str] = field(default_factory=dict)

    def allocate(self, n: int) -> None:
        self.split_code = np.zeros(n, np.int16)
        self.label = np.zeros(n, np.int64)
        self.has_label = np.zeros(n, bool)
        self.url_key = np.zeros(n, np.uint64)
        self.area = np.zeros(n, np.int64)
        self.served_bytes = np.zeros(n, np.int64)
        self.sha = np.zeros(n, "S32")
        self.phash = np.zeros(n, np.int64)
        self.has_hash = np.zeros(n, bool)
        self.reason = np.zeros(n, np.int8)

    def id_of(self, g: int) -> str:
        s = int(self.split_code[g])
        return str(self.ids[s][g - self.offsets[s]].as_py())

    def split_of(self, g: int) -> str:
        return self.splits[int(self.split_code[g])]

    def set_reason(self, g: int, reason: str, detail: str) -> None:
        """Record the first reason found for a row; later checks do not override it."""
        if self.reason[g] == _KEEP:
            self.reason[g] = _REASON_CODE[reason]
            self.detail[g] = detail


def _url_key(url: str | None) -> int:
    if url is None:
        return 0
    return int.from_bytes(hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _raw_batches(split_path: Path, columns: Sequence[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A split's rows in file order, one row group in memory at a time (at most 64 MiB as
    the manifest writer sizes them), whatever the size of the split."""
    for ref in row_groups(split_path):
        yield from read_row_group(ref, columns).to_batches(max_chunksize=batch_rows)


def _per_row_checks(rows: _Rows, g: int, meta: dict, hashed: HashedRow | None, cfg: CleanConfig) -> None:
    """Checks 1-4 for one row; records the hash of rows that decode."""
    status = meta["status"]
    if status != "ok":
        err = meta["error"]
        rows.set_reason(g, "fetch_failed", f"status={status}" + (f": {err}" if err else ""))
        return
    assert hashed is not None
    if hashed.sha256 is not None:
        rows.sha[g] = hashed.sha256
    if hashed.error is not None:
        rows.set_reason(g, "broken", hashed.error)
        return
    assert hashed.phash is not None and hashed.width is not None and hashed.height is not None
    rows.phash[g] = hashed.phash
    rows.has_hash[g] = True
    sw, sh = meta["width"], meta["height"]
    if (sw is not None and sw != hashed.width) or (sh is not None and sh != hashed.height):
        rows.has_hash[g] = False
        rows.set_reason(g, "broken", f"stored bytes decode to {hashed.width}x{hashed.height} "
                                     f"but the manifest says {sw}x{sh}")
        return
    ow = meta["orig_width"] if meta["orig_width"] is not None else hashed.width
    oh = meta["orig_height"] if meta["orig_height"] is not None else hashed.height
    rows.area[g] = int(ow) * int(oh)
    rows.served_bytes[g] = meta["orig_bytes"] if meta["orig_bytes"] is not None else 0
    short, long_ = min(ow, oh), max(ow, oh)
    if short < cfg.min_size:
        rows.set_reason(g, "undersized", f"original {ow}x{oh}, shorter side {short} < {cfg.min_size}")
    elif cfg.max_aspect and long_ > cfg.max_aspect * short:
        rows.set_reason(g, "bad_aspect", f"original {ow}x{oh}, aspect {long_ / short:.2f} > {cfg.max_aspect:g}")


def _pass1(raw: Path, splits: list[str], cfg: CleanConfig, progress: ProgressFn | None) -> _Rows:
    shards = {s: list_shards(raw / s) for s in splits}
    counts = [sum(pq.ParquetFile(p).metadata.num_rows for p in shards[s]) for s in splits]
    offsets = [int(x) for x in np.cumsum([0] + counts[:-1])]
    rows = _Rows(splits=splits, offsets=offsets)
    total = sum(counts)
    rows.allocate(total)

    def tasks() -> Iterator[tuple[int, int, list[dict], list[bytes | None], list[bool]]]:
        for code, split in enumerate(splits):
            g = offsets[code]
            id_chunks = []
            for batch in _raw_batches(raw / split, _PASS1_COLUMNS, cfg.batch_rows):
                id_chunks.append(batch.column("id"))
                meta = batch.drop_columns(["image"]).to_pylist()
                images = batch.column("image").to_pylist()
                for k, m in enumerate(meta):
                    if m["status"] != "ok":
                        images[k] = None  # a failed row's bytes (if any) are not looked at
                want = [m["status"] == "ok" and not m["sha256"] for m in meta]
                yield code, g, meta, images, want
                g += len(meta)
            rows.ids.append(pa.concat_arrays(id_chunks) if id_chunks else pa.array([], pa.string()))

    def absorb(code: int, g0: int, meta: list[dict], hashed: list[HashedRow] | None) -> None:
        for k, m in enumerate(meta):
            g = g0 + k
            rows.split_code[g] = code
            if m["label"] is not None:
                rows.label[g] = m["label"]
                rows.has_label[g] = True
            rows.url_key[g] = _url_key(m["url"])
            if m["sha256"]:
                try:
                    rows.sha[g] = bytes.fromhex(m["sha256"])
                except ValueError:
                    rows.sha[g] = hashlib.sha256(m["sha256"].encode()).digest()
            _per_row_checks(rows, g, m, hashed[k] if m["status"] == "ok" else None, cfg)
        if progress:
            progress("hash", g0 + len(meta), total)

    # A pool is not worth starting for fewer batches than workers.
    workers = min(cfg.n_workers, max(1, -(-total // cfg.batch_rows)))
    if workers == 1:
        for code, g0, meta, images, want in tasks():
            absorb(code, g0, meta, hash_batch(images, want))
        return rows
    ctx = multiprocessing.get_context(cfg.start_method)
    with safe_path_children(), ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                                   initializer=_ignore_sigint) as pool:
        # Bounded: at most two batches per worker are in flight, so a million-row split
        # never has more than a few hundred images' bytes in memory.
        pending: deque[tuple[int, int, list[dict], Future[list[HashedRow]]]] = deque()
        for code, g0, meta, images, want in tasks():
            pending.append((code, g0, meta, pool.submit(hash_batch, images, want)))
            while len(pending) >= 2 * workers:
                c, g, m, fut = pending.popleft()
                absorb(c, g, m, fut.result())
        while pending:
            c, g, m, fut = pending.popleft()
            absorb(c, g, m, fut.result())
    return rows


# --- pass 2: groups and their resolution ----------------------------------------------------


def _find_groups(rows: _Rows, cfg: CleanConfig) -> list[np.ndarray]:
    """Duplicate groups (global row indices) among rows that passed checks 1-4."""
    if cfg.dedup == "off":
        return []
    is_test = np.zeros(len(rows.splits), bool)
    if TEST_SPLIT in rows.splits:
        is_test[rows.splits.index(TEST_SPLIT)] = True
    pool = np.flatnonzero(rows.has_hash & ((rows.reason == _KEEP) | is_test[rows.split_code]))
    if pool.size < 2:
        return []
    uf = dedup.UnionFind(pool.size)
    uf.union(*dedup.equal_value_pairs(rows.sha[pool]))
    if cfg.dedup == "near":
        dedup.near_groups(rows.phash[pool], cfg.hash_distance, uf=uf)
    return [pool[g] for g in dedup.groups_from_roots(uf.roots())]


def _distance(rows: _Rows, a: int, b: int) -> int:
    return int(dedup.hamming(rows.phash[a], rows.phash[b]))


def _label(rows: _Rows, g: int) -> int | None:
    return int(rows.label[g]) if rows.has_label[g] else None


def _resolve_group(rows: _Rows, members: np.ndarray, cfg: CleanConfig) -> None:
    """Assign checks 5-8 to the members of one duplicate group."""
    labels = {_label(rows, int(g)) for g in members} - {None}
    urls = len(set(rows.url_key[members].tolist()))
    if urls >= cfg.placeholder_min_urls and len(labels) >= cfg.placeholder_min_classes:
        detail = f"urls={urls} classes={len(labels)} rows={members.size}"
        for g in members:
            rows.set_reason(int(g), "placeholder", detail)
        return
    by_split: dict[str, list[int]] = {}
    for g in members.tolist():
        by_split.setdefault(rows.split_of(g), []).append(g)
    held_out = [g for s in HELD_OUT_SPLITS for g in by_split.get(s, [])]
    if held_out and TRAIN_SPLIT in by_split:
        for g in by_split.pop(TRAIN_SPLIT):
            twin = min(held_out, key=lambda h: (_distance(rows, g, h), h))
            rows.set_reason(g, "leak", f"twin={rows.id_of(twin)} split={rows.split_of(twin)} "
                                       f"distance={_distance(rows, g, twin)}")
    for split_members in by_split.values():
        if len(split_members) > 1:
            _resolve_split_group(rows, split_members)


def _resolve_split_group(rows: _Rows, members: list[int]) -> None:
    """Checks 7-8 within one split's part of a duplicate group."""
    counts = Counter(_label(rows, g) for g in members)
    ranked = counts.most_common()
    top = ranked[0][1]
    leaders = sorted((lab for lab, n in ranked if n == top), key=lambda x: (x is None, x or 0))
    if len(leaders) > 1:
        detail = f"tie labels={','.join(str(x) for x in leaders)} rows={len(members)}"
        for g in members:
            rows.set_reason(g, "label_conflict", detail)
        return
    majority = leaders[0]
    candidates = [g for g in members if _label(rows, g) == majority]
    # The largest original wins; then the larger body as served; then input order.
    keep = max(candidates, key=lambda g: (int(rows.area[g]), int(rows.served_bytes[g]), -g))
    kept_id = rows.id_of(keep)
    for g in members:
        if g == keep:
            continue
        d = _distance(rows, g, keep)
        if _label(rows, g) != majority:
            rows.set_reason(g, "label_conflict",
                            f"kept={kept_id} distance={d} label={_label(rows, g)} majority={majority}")
        elif rows.sha[g] == rows.sha[keep] and rows.sha[g] != b"":
            rows.set_reason(g, "duplicate", f"kept={kept_id} distance={d}")
        else:
            rows.set_reason(g, "near_duplicate", f"kept={kept_id} distance={d}")


# --- pass 3: writing ------------------------------------------------------------------------


def _staging_paths(root: Path) -> tuple[Path, Path, Path]:
    return root / "clean", root / ".clean.staging", root / ".clean.old"


def _recover(root: Path) -> None:
    """Undo what a crash between the two renames of a previous run left behind."""
    final, staging, old = _staging_paths(root)
    if old.exists() and not final.exists():
        os.replace(old, final)
    for leftover in (staging, old):
        if leftover.exists():
            shutil.rmtree(leftover)


def _write(raw: Path, staging: Path, rows: _Rows, cfg: CleanConfig,
           progress: ProgressFn | None) -> tuple[dict[str, SplitReport], pa.Table, pa.Table]:
    reasons = np.array([None, *DROP_REASONS], dtype=object)
    reports: dict[str, SplitReport] = {}
    dropped_parts: list[pa.Table] = []
    flag_parts: list[pa.Table] = []
    total = int(rows.reason.size)
    for code, split in enumerate(rows.splits):
        report = reports[split] = SplitReport(split)
        is_test = split == TEST_SPLIT
        g = rows.offsets[code]
        writer = ShardWriter(staging / split, schema=CLEAN_SCHEMA)
        with writer:
            for batch in _raw_batches(raw / split, CLEAN_SCHEMA.names[:-1], 512):
                n = batch.num_rows
                sl = slice(g, g + n)
                if not batch.column("id").equals(rows.ids[code].slice(g - rows.offsets[code], n)):
                    raise UserError(f"raw/{split} changed while clean was reading it; run clean again")
                codes = rows.reason[sl]
                keep = (codes == _KEEP) | is_test
                phash = pa.array(rows.phash[sl], pa.int64(), mask=~rows.has_hash[sl])
                batch = batch.append_column(CLEAN_SCHEMA.field("phash"), phash)
                if keep.any():
                    writer.write_batch(batch.filter(pa.array(keep)))
                noted = np.flatnonzero(codes != _KEEP)
                if noted.size:
                    notes = pa.table({
                        "id": batch.column("id").take(noted),
                        "split": batch.column("split").take(noted),
                        "label": batch.column("label").take(noted),
                        "url": batch.column("url").take(noted),
                        "reason": pa.array(reasons[codes[noted]].tolist(), pa.string()),
                        "detail": pa.array([rows.detail.get(g + int(k)) for k in noted], pa.string()),
                    }, schema=DROPPED_SCHEMA)
                    (flag_parts if is_test else dropped_parts).append(notes)
                    counter = report.flagged if is_test else report.dropped
                    counter.update(notes.column("reason").to_pylist())
                report.raw += n
                report.kept += int(keep.sum())
                g += n
                if progress:
                    progress("write", g, total)
        if not writer.written:
            # A split whose rows were all dropped still gets an (empty) shard.
            write_table_atomic(CLEAN_SCHEMA.empty_table(), staging / split / shard_name(0))
        assert report.kept + sum(report.dropped.values()) == report.raw
    dropped = pa.concat_tables(dropped_parts) if dropped_parts else DROPPED_SCHEMA.empty_table()
    flags = pa.concat_tables(flag_parts) if flag_parts else DROPPED_SCHEMA.empty_table()
    return reports, dropped, flags


def _swap_in(staging: Path, final: Path, old: Path) -> None:
    """Replace `final` by `staging` with two renames; `_recover` handles a crash between them."""
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)


# --- entry point ------------------------------------------------------------------------------


def clean(root: Path, config: CleanConfig | None = None, *, progress: ProgressFn | None = None,
          write_stats: bool = True) -> CleanResult:
    """Run every check over `root/raw` and replace `root/clean` with the result."""
    cfg = config or CleanConfig()
    root = Path(root)
    raw = root / "raw"
    # train, val, test first (the table reads in pipeline order), then any others by name.
    # Hidden folders (fetch's .journal) are never splits.
    splits = sorted((s for s in list_splits(raw) if not s.startswith(".")),
                    key=lambda s: (_SPLIT_ORDER.get(s, len(_SPLIT_ORDER)), s))
    if not splits:
        raise UserError(f"no raw manifest under {raw}: run `imatdata fetch` first, "
                        "or point --root (or IMAT_ROOT) at the folder that holds raw/")
    # One clean per root at a time: a second one would delete the first's staging folder.
    # The root folder itself is locked, so no lock file is ever left in it.
    with RunLock(root, f"another imatdata clean is running on {root}; wait for it to finish, "
                       "or stop it, and run clean again"):
        return _clean_locked(root, raw, splits, cfg, progress, write_stats)


def _clean_locked(root: Path, raw: Path, splits: list[str], cfg: CleanConfig, progress: ProgressFn | None,
                  write_stats: bool) -> CleanResult:
    _recover(root)
    final, staging, old = _staging_paths(root)

    t0 = time.perf_counter()
    rows = _pass1(raw, splits, cfg, progress)
    t1 = time.perf_counter()
    groups = _find_groups(rows, cfg)
    for members in groups:
        _resolve_group(rows, members, cfg)
    t2 = time.perf_counter()
    try:
        reports, dropped, flags = _write(raw, staging, rows, cfg, progress)
        write_table_atomic(dropped, staging / "dropped.parquet")
        write_table_atomic(flags, staging / "flags.parquet")
        _swap_in(staging, final, old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    t3 = time.perf_counter()
    result = CleanResult(
        root=root, config=cfg, splits=reports, clean_dir=final,
        dropped_path=final / "dropped.parquet", flags_path=final / "flags.parquet",
        hashed=int(rows.has_hash.sum()), groups=len(groups),
        hash_seconds=t1 - t0, dedup_seconds=t2 - t1, write_seconds=t3 - t2,
    )
    if write_stats:
        from imatdata.stats import write_stats as refresh_stats

        refresh_stats(root, stage="clean")
        result.stats_written = True
    return result


# --- rendering (used by the CLI) ----------------------------------------------------------


def render_report(result: CleanResult, console: Any) -> None:
    """The table of drops by reason and split (rows: reasons; columns: splits), with flags."""
    from rich.table import Table

    splits = list(result.splits)
    table = Table(title=f"imatdata clean: {result.clean_dir}", title_justify="left")
    table.add_column("reason")
    for split in splits:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")

    def row(label: str, values: list[int], style: str | None = None) -> None:
        table.add_row(label, *(f"{v:,}" for v in values), f"{sum(values):,}", style=style)

    row("raw rows", [result.splits[s].raw for s in splits], "bold")
    for reason in DROP_REASONS:
        values = [result.splits[s].dropped.get(reason, 0) for s in splits]
        if any(values):
            row(f"dropped: {reason}", values)
    row("dropped", [sum(result.splits[s].dropped.values()) for s in splits], "bold")
    row("kept", [result.splits[s].kept for s in splits], "bold green")
    for reason in DROP_REASONS:
        values = [result.splits[s].flagged.get(reason, 0) for s in splits]
        if any(values):
            row(f"flagged (kept): {reason}", values, "yellow")
    console.print(table)
    console.print(
        f"hashed {result.hashed:,} images in {result.hash_seconds:.1f} s, "
        f"{result.groups:,} duplicate groups in {result.dedup_seconds:.1f} s, "
        f"written in {result.write_seconds:.1f} s (dedup={result.config.dedup}, "
        f"distance {result.config.hash_distance})"
    )
    console.print(f"dropped rows: {result.dropped_path}")
    console.print(f"flagged test rows: {result.flags_path}")


class RichProgress:
    """A `progress` callback that draws one rich bar per phase (hash, write)."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), console=console, transient=True)
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=total)
        self._progress.update(self._tasks[phase], completed=done, total=total)


__all__ = [
    "CleanConfig",
    "CleanResult",
    "DEDUP_MODES",
    "RichProgress",
    "render_report",
    "SplitReport",
    "clean",
    "hash_batch",
    "image_phash",
    "phash_int64",
]
