"""The knobs of `imatdata clean`.

Kept free of image and Parquet imports (no PIL, pyarrow, imagehash): the CLI reads this
module to build its flags, and `imatdata --help` should not pay for the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

from imatdata.errors import UserError
from imatdata.procs import available_cpus

DEDUP_MODES = ("near", "exact", "off")
# Half the bits of a 64-bit hash: beyond that "near" means nothing.
MAX_HASH_DISTANCE = 32


@dataclass(frozen=True)
class CleanConfig:
    """The knobs of `imatdata clean`; defaults are SPEC.md's."""

    min_size: int = 64
    max_aspect: float = 0.0
    dedup: str = "near"
    hash_distance: int = 4
    placeholder_min_urls: int = 10
    placeholder_min_classes: int = 3
    workers: int | None = None  # None: every core this process may use; 1: hash in this process
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
        return self.workers if self.workers is not None else available_cpus()
