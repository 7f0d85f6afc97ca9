"""The flags of `imatdata stats` (light: the CLI imports this on every start)."""

from __future__ import annotations

from dataclasses import dataclass

from imatdata.errors import UserError
from imatdata.options import opt


@dataclass(frozen=True)
class StatsOptions:
    """The figures' knobs: `imatdata stats` flags (generated through `imatdata.options`).

    Kept apart from `compute`, so that the CLI reads it without numpy and pyarrow."""

    min_count: int = opt(20, "Classes with fewer usable images are counted as rare.")
    top: int = opt(10, "How many most and least frequent classes to list.")
    top_hosts: int = opt(20, "How many hosts to list, worst failure rate first.")
    host_min_records: int = opt(1, "Rank only hosts with at least this many rows.")

    def __post_init__(self) -> None:
        for name in ("min_count", "top", "top_hosts", "host_min_records"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be zero or more")
