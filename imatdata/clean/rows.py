"""What clean knows about every raw row between its passes, and how it streams raw/.

Pass 1 (`checks`) fills a `Rows` table; `resolve` reads it to group duplicates, adds its
own reasons, and streams raw/ a second time to write the kept rows. The table holds ids,
labels, sizes, hashes and signatures only, never image bytes, so a million rows fit in
memory (~670 bytes a row besides the ids and details: 66 of them the signature, 56 the
window hashes, 330 the crop windows' signatures, 144 the fine hashes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from imatdata.clean.dedup import CROP_WINDOWS, FINE_BYTES, N_FINE_VIEWS, N_WINDOWS, SIG_BYTES
from imatdata.manifest import DROP_REASONS, read_row_group, row_groups

KEEP = 0  # reason code of a row no check has dropped (yet)
REASON_CODE = {reason: k + 1 for k, reason in enumerate(DROP_REASONS)}
# Reason code -> name, for whole arrays of codes at once.
REASON_NAMES = np.array([None, *DROP_REASONS], dtype=object)


@dataclass
class Rows:
    """Everything pass 1 keeps per row of all splits (no image bytes), indexed globally:
    split `s` holds rows `offsets[s]` onwards, in file order."""

    splits: list[str]
    offsets: list[int]
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
    signature: np.ndarray = field(default_factory=lambda: np.zeros((0, SIG_BYTES), np.uint8))
    windows: np.ndarray = field(default_factory=lambda: np.zeros((0, N_WINDOWS), np.uint64))
    crop_signatures: np.ndarray = field(default_factory=lambda: np.zeros((0, len(CROP_WINDOWS), SIG_BYTES), np.uint8))
    fine: np.ndarray = field(default_factory=lambda: np.zeros((0, N_FINE_VIEWS, FINE_BYTES), np.uint8))
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
        self.signature = np.zeros((n, SIG_BYTES), np.uint8)
        self.windows = np.zeros((n, N_WINDOWS), np.uint64)
        self.crop_signatures = np.zeros((n, len(CROP_WINDOWS), SIG_BYTES), np.uint8)
        self.fine = np.zeros((n, N_FINE_VIEWS, FINE_BYTES), np.uint8)
        self.reason = np.zeros(n, np.int8)

    def id_of(self, g: int) -> str:
        s = int(self.split_code[g])
        return str(self.ids[s][g - self.offsets[s]].as_py())

    def split_of(self, g: int) -> str:
        return self.splits[int(self.split_code[g])]

    def label_of(self, g: int) -> int | None:
        return int(self.label[g]) if self.has_label[g] else None

    def set_reason(self, g: int, reason: str, detail: str) -> None:
        """Record the first reason found for a row; later checks do not override it."""
        if self.reason[g] == KEEP:
            self.reason[g] = REASON_CODE[reason]
            self.detail[g] = detail


def raw_batches(split_path: Path, columns: Sequence[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A split's rows in file order, one row group in memory at a time (at most 64 MiB as
    the manifest writer sizes them), whatever the size of the split."""
    for ref in row_groups(split_path):
        yield from read_row_group(ref, columns).to_batches(max_chunksize=batch_rows)
