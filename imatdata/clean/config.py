"""The knobs of `imatdata clean`.

A field declared with `opt(default, help)` is a flag (the CLI generates it through
`imatdata.options`); a plain field is an internal knob. Kept free of image and Parquet
imports (no PIL, pyarrow, imagehash): the CLI reads this module to build its flags, and
`imatdata --help` should not pay for the pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from imatdata.errors import UserError
from imatdata.options import opt
from imatdata.procs import available_cpus

DEDUP_MODES = ("near", "exact", "off")
# Half the bits of a 64-bit hash: beyond that "near" means nothing.
MAX_HASH_DISTANCE = 32


@dataclass(frozen=True)
class CleanConfig:
    """The knobs of `imatdata clean`; defaults are SPEC.md's."""

    min_size: int = opt(64, "Drop images whose shorter original side is below this.")
    max_aspect: float = opt(0.0, "Drop images whose long/short side ratio exceeds this (0: off).")
    dedup: str = opt("near", "near (exact + perceptual-hash duplicates), exact (identical bytes as "
                             "served) or off (no duplicate, placeholder, leak or label-conflict "
                             "checks).", metavar="|".join(DEDUP_MODES).upper())
    hash_distance: int = opt(4, "Near-duplicate candidates: phash Hamming distance at most this many "
                                "bits, also from a crop window of one image to the other's phash, and half "
                                "as many between top or bottom halves (each then confirmed by a "
                                "second look).")
    placeholder_min_urls: int = opt(10, "A duplicate group with at least this many URLs...")
    placeholder_min_classes: int = opt(3, "...over at least this many classes is a placeholder: "
                                          "all of it is dropped.")
    drop_ids: str | None = opt(None, "Also drop the train rows this file names (reason label_noise): "
                                     "`imattrain audit`'s suspects.parquet, or any Parquet with an "
                                     "id column.", metavar="FILE")
    min_score: float | None = opt(None, "With --drop-ids: only the rows whose score column is at "
                                        "least this (default: every row of the file).")
    # None: every core this process may use; 1: hash in this process.
    workers: int | None = opt(None, "Hashing processes (default: all cores).")
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
        if self.min_score is not None and self.drop_ids is None:
            raise UserError("--min-score needs --drop-ids FILE (the suspects it filters)")
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise UserError(f"--min-score must be a finite number (got {self.min_score})")
        if self.batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")

    @property
    def n_workers(self) -> int:
        return self.workers if self.workers is not None else available_cpus()
