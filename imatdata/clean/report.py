"""What a clean run reports: its figures, the table the CLI prints, and its progress bars."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imatdata.clean.config import CleanConfig
from imatdata.manifest import DROP_REASONS
from imatdata.terminal import Bars, table

# progress(phase, done, total): phase is "hash" (pass 1) or "write" (the kept rows).
ProgressFn = Callable[[str, int, int], None]


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
    candidate_pairs: int = 0  # phash neighbours (between distinct pictures) the search found
    confirmed_pairs: int = 0  # of them, those every look confirmed
    hash_seconds: float = 0.0
    dedup_seconds: float = 0.0
    write_seconds: float = 0.0
    stats_written: bool = False
    label_noise: Any = None  # label_noise.LabelNoiseReport with --drop-ids

    @property
    def total_dropped(self) -> int:
        return sum(sum(r.dropped.values()) for r in self.splits.values())


def render_report(result: CleanResult, console: Any) -> None:
    """The table of drops by reason and split (rows: reasons; columns: splits), with flags."""
    splits = list(result.splits)
    rows: list[list[str]] = []
    styles: list[str | None] = []

    def row(label: str, values: list[int], style: str | None = None) -> None:
        rows.append([label, *(f"{v:,}" for v in values), f"{sum(values):,}"])
        styles.append(style)

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
    out = table(f"imatdata clean: {result.clean_dir}", ["reason", *splits, "total"], rows)
    # terminal.table has no row styles; totals stand out in bold, kept in green, flags in yellow.
    for drawn, style in zip(out.rows, styles):
        drawn.style = style
    console.print(out)
    console.print(
        f"hashed {result.hashed:,} images in {result.hash_seconds:.1f} s, "
        f"{result.groups:,} duplicate groups in {result.dedup_seconds:.1f} s "
        f"({result.confirmed_pairs:,} of {result.candidate_pairs:,} phash candidate pairs confirmed), "
        f"written in {result.write_seconds:.1f} s (dedup={result.config.dedup}, "
        f"distance {result.config.hash_distance})"
    )
    if result.label_noise is not None:
        console.print(result.label_noise.line())
    console.print(f"dropped rows: {result.dropped_path}")
    console.print(f"flagged test rows: {result.flags_path}")


class RichProgress(Bars):
    """A `progress` callback that draws one transient bar per phase (hash, write)."""

    def __init__(self, console: Any) -> None:
        super().__init__(transient=True, out=console)

    def __call__(self, phase: str, done: int, total: int) -> None:
        self.update(phase, completed=done, total=total)
