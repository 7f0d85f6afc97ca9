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
from imatdata.clean import close, dedup
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


@dataclass
class Nodes:
    """Rows that are one picture for sure: the same sha256 or, with `--dedup near`, the same
    phash, signature and whole fine hash (the looks could only confirm them). Node k is
    `rows[starts[k]:starts[k + 1]]`, ascending; its rows share one phash and signature."""

    rows: np.ndarray
    starts: np.ndarray

    def of(self, k: int) -> np.ndarray:
        return self.rows[self.starts[k]:self.starts[k + 1]]

    @property
    def lead(self) -> np.ndarray:
        """Each node's first row."""
        return self.rows[self.starts[:-1]]

    def any(self, row_mask: np.ndarray) -> np.ndarray:
        """Per node, whether any of its rows is set in `row_mask` (indexed by row)."""
        return np.logical_or.reduceat(row_mask[self.rows], self.starts[:-1]) if self.rows.size else np.zeros(0, bool)


@dataclass
class Links:
    """The duplicate structure among the rows that take part in grouping (global indices):
    nodes, the links between nodes that the second look confirmed, and the groups. A group is
    a star of nodes (`dedup.star_groups`: a representative and the nodes confirmed against it,
    never a neighbour's neighbour) or a lone node of several rows."""

    nodes: Nodes = field(default_factory=lambda: Nodes(np.empty(0, np.int64), np.zeros(1, np.int64)))
    i: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # confirmed node links
    j: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    groups: list[np.ndarray] = field(default_factory=list)  # rows, the representative's first
    pairs: dedup.PairCount = field(default_factory=dedup.PairCount)
    node_of: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # by row; -1: none
    link_set: set[tuple[int, int]] = field(default_factory=set)  # (i, j) with i < j

    def linked(self, a: int, b: int) -> bool:
        """Whether rows `a` and `b` are one picture without a third: one node, or nodes whose
        link the second look confirmed."""
        x, y = int(self.node_of[a]), int(self.node_of[b])
        return x == y or (min(x, y), max(x, y)) in self.link_set


def find_links(raw: Path, rows: Rows, cfg: CleanConfig) -> Links:
    """Nodes, confirmed links and groups among the rows that passed checks 1-4 (`raw`: where
    the close look reads the few rows it decodes again)."""
    if cfg.dedup == "off":
        return Links()
    is_test = np.zeros(len(rows.splits), bool)
    if TEST_SPLIT in rows.splits:
        is_test[rows.splits.index(TEST_SPLIT)] = True
    # Test rows take part even when flagged: a train row that duplicates one still leaks.
    pool = np.flatnonzero(rows.has_hash & ((rows.reason == KEEP) | is_test[rows.split_code]))
    if pool.size < 2:
        return Links()
    links = Links(nodes=_nodes(rows, pool, near=cfg.dedup == "near"))
    lead = links.nodes.lead
    links.node_of = np.full(rows.reason.size, -1, np.int64)
    links.node_of[links.nodes.rows] = np.repeat(np.arange(lead.size), np.diff(links.nodes.starts))
    if cfg.dedup == "near":
        links.i, links.j, _ = dedup.confirmed_pairs(rows.phash[lead], rows.signature[lead], cfg.hash_distance,
                                                    windows=rows.windows[lead],
                                                    crop_signatures=rows.crop_signatures[lead], fine=rows.fine[lead],
                                                    count=links.pairs)
        agree = close.agree_pairs(raw, rows, lead[links.i], lead[links.j])
        links.i, links.j = links.i[agree], links.j[agree]
        links.pairs.confirmed = int(agree.sum())
        links.link_set = set(zip(links.i.tolist(), links.j.tolist()))
    # The representative is the node the keeper would come from: largest original, then
    # the larger body as served, then input order.
    rank = np.empty(lead.size, np.int64)
    rank[np.lexsort((lead, -rows.served_bytes[lead], -rows.area[lead]))] = np.arange(lead.size)
    stars = dedup.star_groups(lead.size, links.i, links.j, rank)
    in_star = np.zeros(lead.size, bool)
    for star in stars:
        in_star[star] = True
    links.groups = [np.concatenate([links.nodes.of(k) for k in star.tolist()]) for star in stars]
    lone = np.flatnonzero((np.diff(links.nodes.starts) > 1) & ~in_star)
    links.groups += [links.nodes.of(int(k)) for k in lone]
    return links


def _nodes(rows: Rows, pool: np.ndarray, *, near: bool) -> Nodes:
    uf = dedup.UnionFind(pool.size)
    uf.union(*dedup.equal_value_pairs(rows.sha[pool]))
    if near:
        look = np.concatenate([rows.phash[pool].view(np.uint8).reshape(-1, 8), rows.signature[pool],
                               rows.fine[pool, 0]], axis=1)
        uf.union(*dedup.equal_value_pairs(look.view(f"V{look.shape[1]}").ravel()))
    roots = uf.roots()
    order = np.argsort(roots, kind="stable")
    starts = np.concatenate([[0], np.flatnonzero(np.diff(roots[order])) + 1, [pool.size]])
    return Nodes(rows=pool[order], starts=starts.astype(np.int64))


def _distance(rows: Rows, a: int, b: int) -> int:
    return int(dedup.hamming(rows.phash[a], rows.phash[b]))


def resolve_groups(rows: Rows, links: Links, cfg: CleanConfig) -> None:
    """Checks 5-8 over every group, in order of precedence: placeholders, leaks, then each
    split's part of each group (label_conflict, duplicate / near_duplicate)."""
    placeholder = [_is_placeholder(rows, members, cfg) for members in links.groups]
    leaked = _mark_leaks(rows, links)
    for members, gone in zip(links.groups, placeholder):
        if gone:
            continue
        by_split: dict[str, list[int]] = {}
        for g in members.tolist():
            if g not in leaked:
                by_split.setdefault(rows.split_of(g), []).append(g)
        for split_members in by_split.values():
            if len(split_members) > 1:
                _resolve_split_group(rows, split_members, links)


def _mark_leaks(rows: Rows, links: Links) -> set[int]:
    """Check 6: a train row goes when it is the same picture as a val or test row: in its own
    node, or in a node confirmed against its node (never through a third). Returns those rows."""
    if TRAIN_SPLIT not in rows.splits or links.nodes.rows.size == 0:
        return set()
    held_code = [rows.splits.index(s) for s in HELD_OUT_SPLITS if s in rows.splits]
    is_held = np.isin(rows.split_code, held_code)
    is_train = rows.split_code == rows.splits.index(TRAIN_SPLIT)
    has_held, has_train = links.nodes.any(is_held), links.nodes.any(is_train)
    partners: dict[int, list[int]] = {int(k): [int(k)] for k in np.flatnonzero(has_held & has_train)}
    for a, b in zip(links.i.tolist(), links.j.tolist()):
        for x, y in ((a, b), (b, a)):
            if has_train[x] and has_held[y]:
                partners.setdefault(x, []).append(y)
    leaked: set[int] = set()
    for k, twin_nodes in partners.items():
        twins = [int(h) for y in twin_nodes for h in links.nodes.of(y) if is_held[h]]
        for g in links.nodes.of(k).tolist():
            if not is_train[g] or rows.reason[g] != KEEP:
                continue
            twin = min(twins, key=lambda h: (_distance(rows, g, h), h))
            rows.set_reason(g, "leak", f"twin={rows.id_of(twin)} split={rows.split_of(twin)} "
                                       f"distance={_distance(rows, g, twin)}")
            leaked.add(g)
    return leaked


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


def _resolve_split_group(rows: Rows, members: list[int], links: Links) -> None:
    """Checks 7-8 within one split's part of a duplicate group. A row goes only for the kept
    row it is linked to itself: when the kept row is not the group's representative, a row
    linked to the representative alone stays (the two were never compared)."""
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
        if g == keep or not links.linked(g, keep):
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
    if storage.is_remote(root):  # S3: generations, see imatdata.storage
        storage.recover_generations(root / "clean")
        return
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
    if storage.is_remote(root):  # S3 has no rename: a new generation, see imatdata.storage
        with storage.new_generation(root / "clean") as generation:
            yield generation
        return
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
