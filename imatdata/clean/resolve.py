"""Passes 2 and 3 of clean: what is dropped, and the new clean/ that says so.

Pass 2 forms duplicate groups among the rows pass 1 kept (exact: equal sha256; near:
confirmed phash neighbours, see `dedup`) and gives their members checks 5-8: placeholder,
leak, label_conflict, duplicate / near_duplicate. Pass 3 streams raw/ again and writes the
kept rows plus `phash` to `clean/<split>/`, and returns the dropped and flagged rows.

The whole new clean/ is built in `.clean.staging` beside the old one and swapped in by two
renames (`clean` -> `.clean.old`, `.clean.staging` -> `clean`), so readers see the old stage
or the new one, whole; `recover` undoes what a crash between the two renames leaves.
raw/ is only ever read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from imatdata import storage
from imatdata.clean import dedup
from imatdata.clean.config import CleanConfig
from imatdata.clean.report import ProgressFn, SplitReport
from imatdata.clean.rows import KEEP, REASON_NAMES, Rows, raw_batches
from imatdata.errors import UserError
from imatdata.manifest import CLEAN_SCHEMA, DROPPED_SCHEMA, ShardWriter, shard_name, write_table_atomic

TRAIN_SPLIT = "train"
TEST_SPLIT = "test"
# Splits whose images a train image must not duplicate.
HELD_OUT_SPLITS = ("val", "test")
# Rows handled per step of the writing pass (a row group is in memory whole either way).
_WRITE_BATCH_ROWS = 512


# --- pass 2: groups and their resolution ----------------------------------------------------


def find_groups(rows: Rows, cfg: CleanConfig) -> list[np.ndarray]:
    """Duplicate groups (global row indices) among rows that passed checks 1-4."""
    if cfg.dedup == "off":
        return []
    is_test = np.zeros(len(rows.splits), bool)
    if TEST_SPLIT in rows.splits:
        is_test[rows.splits.index(TEST_SPLIT)] = True
    # Test rows take part even when flagged: a train row that duplicates one still leaks.
    pool = np.flatnonzero(rows.has_hash & ((rows.reason == KEEP) | is_test[rows.split_code]))
    if pool.size < 2:
        return []
    uf = dedup.UnionFind(pool.size)
    uf.union(*dedup.equal_value_pairs(rows.sha[pool]))
    if cfg.dedup == "near":
        dedup.near_groups(rows.phash[pool], cfg.hash_distance, uf=uf)
    return [pool[g] for g in dedup.groups_from_roots(uf.roots())]


def _distance(rows: Rows, a: int, b: int) -> int:
    return int(dedup.hamming(rows.phash[a], rows.phash[b]))


def resolve_group(rows: Rows, members: np.ndarray, cfg: CleanConfig) -> None:
    """Assign checks 5-8 to the members of one duplicate group."""
    if _is_placeholder(rows, members, cfg):
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


def _is_placeholder(rows: Rows, members: np.ndarray, cfg: CleanConfig) -> bool:
    """Check 5: the whole group goes when it is one image behind many unrelated URLs."""
    labels = {rows.label_of(int(g)) for g in members} - {None}
    urls = len(set(rows.url_key[members].tolist()))
    if urls < cfg.placeholder_min_urls or len(labels) < cfg.placeholder_min_classes:
        return False
    detail = f"urls={urls} classes={len(labels)} rows={members.size}"
    for g in members:
        rows.set_reason(int(g), "placeholder", detail)
    return True


def _resolve_split_group(rows: Rows, members: list[int]) -> None:
    """Checks 7-8 within one split's part of a duplicate group."""
    counts = Counter(rows.label_of(g) for g in members)
    ranked = counts.most_common()
    top = ranked[0][1]
    leaders = sorted((lab for lab, n in ranked if n == top), key=lambda x: (x is None, x or 0))
    if len(leaders) > 1:
        detail = f"tie labels={','.join(str(x) for x in leaders)} rows={len(members)}"
        for g in members:
            rows.set_reason(g, "label_conflict", detail)
        return
    majority = leaders[0]
    candidates = [g for g in members if rows.label_of(g) == majority]
    # The largest original wins; then the larger body as served; then input order.
    keep = max(candidates, key=lambda g: (int(rows.area[g]), int(rows.served_bytes[g]), -g))
    kept_id = rows.id_of(keep)
    for g in members:
        if g == keep:
            continue
        d = _distance(rows, g, keep)
        if rows.label_of(g) != majority:
            rows.set_reason(g, "label_conflict",
                            f"kept={kept_id} distance={d} label={rows.label_of(g)} majority={majority}")
        elif rows.sha[g] == rows.sha[keep] and rows.sha[g] != b"":
            rows.set_reason(g, "duplicate", f"kept={kept_id} distance={d}")
        else:
            rows.set_reason(g, "near_duplicate", f"kept={kept_id} distance={d}")


# --- pass 3: writing the kept rows ------------------------------------------------------------


def write_splits(raw: Path, staging: Path, rows: Rows,
                 progress: ProgressFn | None) -> tuple[dict[str, SplitReport], pa.Table, pa.Table]:
    """Write every split's kept rows under `staging`; returns the per-split figures, the
    dropped rows and the flagged (kept) test rows."""
    reports: dict[str, SplitReport] = {}
    dropped_parts: list[pa.Table] = []
    flag_parts: list[pa.Table] = []
    for code, split in enumerate(rows.splits):
        is_test = split == TEST_SPLIT
        notes = _write_split(raw, staging, rows, code, progress)
        report = reports[split] = SplitReport(split, raw=notes.raw, kept=notes.kept)
        for part in notes.parts:
            (flag_parts if is_test else dropped_parts).append(part)
            (report.flagged if is_test else report.dropped).update(part.column("reason").to_pylist())
        assert report.kept + sum(report.dropped.values()) == report.raw
    dropped = pa.concat_tables(dropped_parts) if dropped_parts else DROPPED_SCHEMA.empty_table()
    flags = pa.concat_tables(flag_parts) if flag_parts else DROPPED_SCHEMA.empty_table()
    return reports, dropped, flags


@dataclass
class _SplitNotes:
    """What writing one split found: its row counts and the rows it left out (or flagged)."""

    raw: int = 0
    kept: int = 0
    parts: list[pa.Table] = field(default_factory=list)


def _write_split(raw: Path, staging: Path, rows: Rows, code: int, progress: ProgressFn | None) -> _SplitNotes:
    split = rows.splits[code]
    is_test = split == TEST_SPLIT
    notes = _SplitNotes()
    g = rows.offsets[code]
    total = int(rows.reason.size)
    with ShardWriter(staging / split, schema=CLEAN_SCHEMA) as writer:
        for batch in raw_batches(raw / split, CLEAN_SCHEMA.names[:-1], _WRITE_BATCH_ROWS):
            n = batch.num_rows
            if not batch.column("id").equals(rows.ids[code].slice(g - rows.offsets[code], n)):
                raise UserError(f"raw/{split} changed while clean was reading it; run clean again")
            codes = rows.reason[g:g + n]
            keep = (codes == KEEP) | is_test  # test rows are only ever flagged
            phash = pa.array(rows.phash[g:g + n], pa.int64(), mask=~rows.has_hash[g:g + n])
            batch = batch.append_column(CLEAN_SCHEMA.field("phash"), phash)
            if keep.any():
                writer.write_batch(batch.filter(pa.array(keep)))
            noted = np.flatnonzero(codes != KEEP)
            if noted.size:
                notes.parts.append(_notes_table(batch, rows, g, codes, noted))
            notes.raw += n
            notes.kept += int(keep.sum())
            g += n
            if progress:
                progress("write", g, total)
    if not writer.written:
        # A split whose rows were all dropped still gets an (empty) shard.
        write_table_atomic(CLEAN_SCHEMA.empty_table(), staging / split / shard_name(0))
    return notes


def _notes_table(batch: pa.RecordBatch, rows: Rows, g: int, codes: np.ndarray, noted: np.ndarray) -> pa.Table:
    """dropped.parquet's rows for the `noted` positions of `batch` (its first row is `g`)."""
    return pa.table({
        "id": batch.column("id").take(noted),
        "split": batch.column("split").take(noted),
        "label": batch.column("label").take(noted),
        "url": batch.column("url").take(noted),
        "reason": pa.array(REASON_NAMES[codes[noted]].tolist(), pa.string()),
        "detail": pa.array([rows.detail.get(g + int(k)) for k in noted], pa.string()),
    }, schema=DROPPED_SCHEMA)


# --- replacing clean/ whole -------------------------------------------------------------------


def staging_paths(root: Path) -> tuple[Path, Path, Path]:
    """clean/, the folder the next one is built in, and where the previous one waits."""
    return root / "clean", root / ".clean.staging", root / ".clean.old"


def recover(root: Path) -> None:
    """Undo what a crash between the two renames of a previous run left behind."""
    final, staging, old = staging_paths(root)
    if storage.exists(old) and not storage.exists(final):
        storage.replace(old, final)
    for leftover in (staging, old):
        if storage.exists(leftover):
            storage.remove_tree(leftover, strict=True)  # a stale staging would be swapped in


@contextmanager
def new_clean_dir(root: Path) -> Iterator[Path]:
    """The staging folder to build the next clean/ in: swapped in when the block completes,
    removed (leaving the previous clean/ as it was) when it fails or is interrupted."""
    final, staging, old = staging_paths(root)
    try:
        yield staging
        _swap_in(staging, final, old)
    except BaseException:
        storage.remove_tree(staging)
        raise


def _swap_in(staging: Path, final: Path, old: Path) -> None:
    """Replace `final` by `staging` with two renames; `recover` handles a crash between them."""
    if storage.exists(final):
        storage.replace(final, old)
    storage.replace(staging, final)
    if storage.exists(old):
        storage.remove_tree(old, strict=True)
