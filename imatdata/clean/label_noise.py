"""`imatdata clean --drop-ids FILE [--min-score S]`: drop the train rows an audit suspects.

The file is `imattrain audit`'s suspects.parquet (id, given, suggested, score, ...), or any
Parquet file with a string `id` column; `--min-score` keeps only its rows whose `score` is at
least S. It is read and checked before clean takes its lock or writes anything, so a
malformed file is one line and exit 2 with clean/ untouched.

Only rows of the `train` split are dropped (reason `label_noise`, detail `score=<s>
suggested=<c>` when the file has them); val and test were labelled by annotators, and test
rows are never dropped anyway. A row another check already dropped keeps that reason
(precedence: label_noise comes last). Ids the file names that train does not hold are
counted and reported, never an error: the suspects may come from an older clean.

`read_relabels` reads the same file for `imattrain run --relabel`, which trains on the
suggested class of the rows it names instead of dropping them.

Reads with pyarrow only (no torch: imatdata never imports the trainer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imatdata import storage
from imatdata.clean.rows import KEEP, REASON_CODE, Rows
from imatdata.errors import UserError

REASON = "label_noise"
TRAIN_SPLIT = "train"


@dataclass
class Suspects:
    """The rows a suspects file asks to drop (after --min-score)."""

    path: Path
    ids: pa.Array  # string, unique
    details: dict[str, str]
    in_file: int  # rows of the file, before --min-score
    suggested: dict[str, int] = field(default_factory=dict)  # id -> class (classes_needed)


@dataclass
class LabelNoiseReport:
    """What --drop-ids did: rows dropped, and the named ids it could not drop."""

    path: Path
    named: int  # ids left after --min-score
    in_file: int
    dropped: int = 0
    already_dropped: int = 0  # train rows another check had dropped first
    not_in_train: int = 0  # ids of another split or of no row at all

    def line(self) -> str:
        parts = [f"label noise ({self.path}): {self.dropped:,} train rows dropped of {self.named:,} "
                 f"ids named"]
        if self.named != self.in_file:
            parts.append(f"{self.in_file - self.named:,} rows of the file under --min-score")
        if self.already_dropped:
            parts.append(f"{self.already_dropped:,} already dropped for another reason")
        if self.not_in_train:
            parts.append(f"{self.not_in_train:,} not in train (ignored)")
        return "; ".join(parts)


def read_suspects(path: str | Path, min_score: float | None = None, *,
                  flag: str = "--drop-ids", classes_needed: bool = False) -> Suspects:
    """Read and check a suspects file; every problem is one UserError line naming `flag`.
    With `classes_needed`, its `suggested` column must hold a class (an integer >= 0) on
    every row kept."""
    import pyarrow.parquet as pq

    where = f"{flag} {path}"
    path = storage.location(str(path), flag)
    if not storage.is_file(path):
        raise UserError(f"{where}: no such file")
    try:
        with storage.open_read(path) as f:
            table = pq.read_table(f)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{where}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    if "id" not in table.column_names:
        raise UserError(f"{where}: no id column (columns: {', '.join(table.column_names) or 'none'}); "
                        "give the suspects.parquet `imattrain audit` wrote")
    ids = table.column("id")
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        raise UserError(f"{where}: column id is {ids.type}, not a string")
    if ids.null_count:
        raise UserError(f"{where}: {ids.null_count} rows without an id")
    in_file = table.num_rows
    score = None
    if "score" in table.column_names:
        col = table.column("score")
        if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
            raise UserError(f"{where}: column score is {col.type}, not a number")
        score = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
        if np.isnan(score).any():
            raise UserError(f"{where}: {int(np.isnan(score).sum())} rows without a score")
    if classes_needed:
        if "suggested" not in table.column_names:
            raise UserError(f"{where}: no suggested column (the class to train on); give the "
                            "suspects.parquet `imattrain audit` wrote")
        col = table.column("suggested")
        if not pa.types.is_integer(col.type):
            raise UserError(f"{where}: column suggested is {col.type}, not a class number")
    if min_score is not None:
        if score is None:
            minimum = "--min-score" if flag == "--drop-ids" else f"{flag}-min-score"
            raise UserError(f"{where}: {minimum} needs a score column, and the file has none")
        table = table.filter(pa.array(score >= min_score))
        score = score[score >= min_score]
    if classes_needed:
        col = table.column("suggested")
        if col.null_count:
            raise UserError(f"{where}: {col.null_count} rows without a suggested class")
        if len(col) and pc.min(col).as_py() < 0:
            raise UserError(f"{where}: column suggested holds a negative class")
    id_list = [str(v) for v in table.column("id").to_pylist()]
    suggested = (table.column("suggested").to_pylist() if "suggested" in table.column_names
                 else [None] * len(id_list))
    details: dict[str, str] = {}
    classes: dict[str, int] = {}
    for k, row_id in enumerate(id_list):
        if row_id in details:
            continue  # a repeated id is dropped once, with its first (highest) score
        if classes_needed:
            classes[row_id] = int(suggested[k])
        bits = []
        if score is not None and math.isfinite(score[k]):
            bits.append(f"score={score[k]:.4f}")
        if suggested[k] is not None:
            bits.append(f"suggested={suggested[k]}")
        details[row_id] = " ".join(bits)
    return Suspects(path=path, ids=pa.array(list(details), pa.string()), details=details,
                    in_file=in_file, suggested=classes)


def read_relabels(path: str | Path, min_score: float | None = None) -> dict[str, int]:
    """`--relabel FILE [--relabel-min-score S]`: id -> the class to train on, from a suspects
    file's `suggested` column (rows without one are an error: there is nothing to use)."""
    return read_suspects(path, min_score, flag="--relabel", classes_needed=True).suggested


def mark(rows: Rows, suspects: Suspects) -> LabelNoiseReport:
    """Give every train row the file names the reason label_noise (unless another check
    dropped it first)."""
    report = LabelNoiseReport(path=suspects.path, named=len(suspects.ids), in_file=suspects.in_file)
    if TRAIN_SPLIT not in rows.splits or not len(suspects.ids):
        report.not_in_train = len(suspects.ids)
        return report
    s = rows.splits.index(TRAIN_SPLIT)
    train_ids = rows.ids[s]
    hit = pc.is_in(train_ids, value_set=suspects.ids).to_numpy(zero_copy_only=False)
    found: set[str] = set()
    for local in np.flatnonzero(hit):
        g = rows.offsets[s] + int(local)
        row_id = rows.id_of(g)
        found.add(row_id)
        if rows.reason[g] == KEEP:
            rows.set_reason(g, REASON, suspects.details.get(row_id, ""))
            report.dropped += 1
        else:
            report.already_dropped += 1
    report.not_in_train = len(suspects.ids) - len(found)
    assert REASON in REASON_CODE
    return report
