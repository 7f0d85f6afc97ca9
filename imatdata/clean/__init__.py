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
6. `leak` - a train row that is the same picture as a val or test row (exact, or confirmed
   directly against it: never through a third image): the train row goes.
   detail: `twin=<id> split=<split> distance=<d>` naming the closest such held-out image.
7. `label_conflict` - in a group (per split) whose labels disagree, the majority label's
   representative is kept and the other labels' rows go, detail
   `kept=<id> distance=<d> label=<own> majority=<label>`; when the top labels tie, every
   row of the group goes, detail `tie labels=<a>,<b> rows=<n>`.
8. `duplicate` / `near_duplicate` - the other rows of a group (per split) go, keeping the
   largest original (area, then bytes served, then input order). `duplicate` when the row's
   sha256 equals the kept row's, `near_duplicate` otherwise. detail `kept=<id> distance=<d>`.
9. `label_noise` - with `--drop-ids FILE` (`imattrain audit`'s suspects.parquet): the train
   rows it names (`--min-score S`: those scoring at least S). detail `score=<s>
   suggested=<class>`. See `label_noise`.

Duplicate groups. Two rows are *exact* duplicates when the sha256 of the body as served is
equal (fetch's `sha256` column; when it is missing, the sha256 of the stored bytes). They
are *near* duplicates when their 64-bit perceptual hashes differ in at most
`--hash-distance` bits (the candidates; also when a crop window of one is that close to the
other's hash, or their top or bottom halves are within half as many bits, see
`dedup.confirmed_pairs`) *and* a second look confirms them: their signatures
(luma 8x8 and chroma 4x4 thumbnails from the same decode) agree within what a re-encode,
resize, small crop, brightness change or overlaid text leaves (`dedup.confirm_pairs`),
and so do their fine hashes (the next octave of the phash's DCT, `dedup.fine_hashes`);
then the two pictures, decoded again, agree pixel by pixel once aligned (`close`).
A group is one representative (the largest original) and the rows exact or confirmed
against it, never a chain of neighbours, within and across classes and splits, restricted
to rows that passed checks 1-4 (test rows take part whenever they could be hashed, flagged
or not). `--dedup exact` links exact duplicates only; `--dedup off` forms no groups, so
checks 5-8 are all off. A group is resolved per split for checks 7-8.

The work is split by concern: `config` (the knobs), `checks` (pass 1: checks 1-4, the
perceptual hash, the signature and the fine hashes, in a process pool), `dedup` (the
near-duplicate index, the second and third looks, star groups), `close` (the fourth look,
on the few confirmed pairs' rows read again), `resolve` (passes
2 and 3: checks 5-8, then the new clean/ built beside the old one and swapped in whole),
`rows` (what passes 1-3 share), `report` (figures, table, progress bars).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from imatdata.clean.config import DEDUP_MODES, CleanConfig
from imatdata.errors import UserError
from imatdata.lazy import exports

if TYPE_CHECKING:
    from imatdata.clean import label_noise, resolve
    from imatdata.clean.checks import check_rows as _pass1
    from imatdata.clean.checks import hash_batch, image_phash, image_signature, phash_int64
    from imatdata.clean.report import CleanResult, ProgressFn, RichProgress, SplitReport, render_report
    from imatdata.clean.resolve import recover as _recover
    from imatdata.manifest import list_splits, write_table_atomic
    from imatdata.storage import RunLock

# The pipeline's modules load on first use (PEP 562): importing `imatdata.clean.config`, as
# the CLI does for the flags of every command, runs this file, and they would add ~0.5 s of
# numpy, pyarrow, PIL and imagehash to each start.
# The pipeline reads these names from this module's namespace, so a test may replace
# `_pass1` (to pause a run holding the lock) or `write_table_atomic` (to fail a write).
_LAZY = {
    "resolve": "imatdata.clean.resolve",
    "label_noise": "imatdata.clean.label_noise",
    "_pass1": "imatdata.clean.checks:check_rows",
    "_recover": "imatdata.clean.resolve:recover",
    "hash_batch": "imatdata.clean.checks:hash_batch",
    "image_phash": "imatdata.clean.checks:image_phash",
    "image_signature": "imatdata.clean.checks:image_signature",
    "phash_int64": "imatdata.clean.checks:phash_int64",
    "CleanResult": "imatdata.clean.report:CleanResult",
    "RichProgress": "imatdata.clean.report:RichProgress",
    "SplitReport": "imatdata.clean.report:SplitReport",
    "render_report": "imatdata.clean.report:render_report",
    "list_splits": "imatdata.manifest:list_splits",
    "write_table_atomic": "imatdata.manifest:write_table_atomic",
    "RunLock": "imatdata.storage:RunLock",
}
__getattr__, __dir__ = exports(globals(), _LAZY)


def _load() -> None:
    """Bind every lazy name the pipeline uses, keeping any that a caller has replaced."""
    for name in _LAZY:
        if name not in globals():
            __getattr__(name)


# train, val, test first (the table reads in pipeline order), then any others by name. Not
# stats' SPLIT_ORDER, which also ranks "validation" before test: that would reorder the rows of
# dropped.parquet and the table's columns for a root with a "validation" split.
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def clean(root: Path, config: CleanConfig | None = None, *, progress: ProgressFn | None = None,
          write_stats: bool = True) -> CleanResult:
    """Run every check over `root/raw` and replace `root/clean` with the result."""
    _load()
    cfg = config or CleanConfig()
    from imatdata.storage import as_location

    root = as_location(root)  # a Path, or an S3Path for s3://
    raw = root / "raw"
    splits = _raw_splits(raw)
    # Checked before the lock and before anything is written: a bad file changes nothing.
    suspects = (label_noise.read_suspects(cfg.drop_ids, cfg.min_score)
                if cfg.drop_ids is not None else None)
    # One clean per root at a time: a second one would delete the first's staging folder.
    # The root folder itself is locked, so no lock file is ever left in it.
    with RunLock(root, f"another imatdata clean is running on {root}; wait for it to finish, "
                       "or stop it, and run clean again"):
        result = _clean_locked(root, raw, splits, cfg, progress, suspects)
        if write_stats:
            from imatdata.stats import write_stats as refresh_stats

            refresh_stats(root, stage="clean")
            result.stats_written = True
    return result


def _raw_splits(raw: Path) -> list[str]:
    """The splits of raw/, in pipeline order; hidden folders (fetch's .journal) never are."""
    splits = sorted((s for s in list_splits(raw) if not s.startswith(".")),
                    key=lambda s: (_SPLIT_ORDER.get(s, len(_SPLIT_ORDER)), s))
    if not splits:
        raise UserError(f"no raw manifest under {raw}: run `imatdata fetch` first, "
                        "or point --root (or IMAT_ROOT) at the folder that holds raw/")
    return splits


def _clean_locked(root: Path, raw: Path, splits: list[str], cfg: CleanConfig,
                  progress: ProgressFn | None, suspects: label_noise.Suspects | None = None,
                  ) -> CleanResult:
    _recover(root)
    t0 = time.perf_counter()
    rows = _pass1(raw, splits, cfg, progress)
    t1 = time.perf_counter()
    links = resolve.find_links(raw, rows, cfg)
    resolve.resolve_groups(rows, links, cfg)
    noise = label_noise.mark(rows, suspects) if suspects is not None else None
    t2 = time.perf_counter()
    with resolve.new_clean_dir(root) as staging:
        reports, dropped, flags = resolve.write_splits(raw, staging, rows, progress)
        write_table_atomic(dropped, staging / "dropped.parquet")
        write_table_atomic(flags, staging / "flags.parquet")
    t3 = time.perf_counter()
    final, _, _ = resolve.staging_paths(root)
    return CleanResult(
        root=root, config=cfg, splits=reports, clean_dir=final,
        dropped_path=final / "dropped.parquet", flags_path=final / "flags.parquet",
        hashed=int(rows.has_hash.sum()), groups=len(links.groups),
        candidate_pairs=links.pairs.candidates, confirmed_pairs=links.pairs.confirmed,
        hash_seconds=t1 - t0, dedup_seconds=t2 - t1, write_seconds=t3 - t2, label_noise=noise,
    )


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
    "image_signature",
    "phash_int64",
]
