"""What a fetch tells its user: counts as it goes, the progress bar, the summary at the end.

The bar and the table are `imatdata.terminal`'s (stderr, rich imported only when drawn);
the summary is also written to `<root>/raw/fetch_summary.json` for scripts.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imatdata.manifest import STATUSES
from imatdata.storage import write_bytes_atomic
from imatdata.terminal import Bars, table

SUMMARY_NAME = "fetch_summary.json"


@dataclass
class Counters:
    """Rows finished so far, by outcome (one loop's, or a run's once they are merged)."""

    done: int = 0
    ok: int = 0
    failed: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_split: dict[str, Counter[str]] = field(default_factory=dict)

    def count(self, split: str, status: str) -> None:
        self.done += 1
        if status == "ok":
            self.ok += 1
        else:
            self.failed += 1
        self.by_status[status] += 1
        self.by_split.setdefault(split, Counter())[status] += 1

    def merge(self, other: Counters) -> None:
        self.done += other.done
        self.ok += other.ok
        self.failed += other.failed
        self.by_status.update(other.by_status)
        for split, by in other.by_split.items():
            self.by_split.setdefault(split, Counter()).update(by)


class Progress:
    """The fetch bar: done/total, ok, failed, images/s, elapsed, ETA; silent with --quiet."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total = total
        self.started = time.monotonic()
        self._bars = Bars(enabled=not quiet, initial={"ok": 0, "failed": 0, "rate": "0.0"},
                          fields=("[green]ok {task.fields[ok]}", "[red]failed {task.fields[failed]}",
                                  "{task.fields[rate]} img/s"))

    def __enter__(self) -> Progress:
        self._bars.__enter__()
        self._bars.update("fetch", completed=0, total=self.total)  # shown from the start, at 0
        return self

    def update(self, c: Counters) -> None:
        elapsed = max(1e-6, time.monotonic() - self.started)
        self._bars.update("fetch", completed=c.done, ok=c.ok, failed=c.failed, rate=f"{c.ok / elapsed:.1f}")

    def __exit__(self, *exc: object) -> None:
        self._bars.close()


@dataclass
class FetchSummary:
    """What a run did (this run) and what raw/ now holds (all runs)."""

    root: str
    elapsed_s: float
    records: int
    already_done: int
    attempted: int
    this_run: dict[str, int]
    splits: dict[str, dict[str, int]]
    requests: int
    retries: int
    host_pauses: int
    hosts_given_up: int
    bytes_downloaded: int
    images_per_s: float
    rows_dropped_not_in_input: int
    shards: dict[str, list[str]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def write_summary(summary: FetchSummary, root: Path) -> None:
    write_bytes_atomic((json.dumps(summary.to_json(), indent=2) + "\n").encode(), root / "raw" / SUMMARY_NAME)


def render_summary(summary: FetchSummary, console: Any) -> None:
    """The end-of-run table: rows by status, one column per split, plus this run's figures."""
    splits = list(summary.splits)
    rows: list[list[Any]] = []
    for status in STATUSES:
        values = [summary.splits[s].get(status, 0) for s in splits]
        if any(values):
            rows.append([status, *values, sum(values)])
    rows.append(["records", *(summary.splits[s]["records"] for s in splits), summary.records])
    console.print(table(f"imatdata fetch: {summary.records} records in {summary.root}/raw",
                        ["status", *splits, "total"], rows))
    console.print(
        f"this run: {summary.attempted} records in {summary.elapsed_s:.1f}s "
        f"({summary.already_done} already done), {summary.this_run.get('ok', 0)} ok, "
        f"{summary.images_per_s:.1f} images/s, {summary.requests} requests, {summary.retries} retries"
        + (f", {summary.hosts_given_up} hosts given up" if summary.hosts_given_up else ""))
    if summary.rows_dropped_not_in_input:
        console.print(f"dropped {summary.rows_dropped_not_in_input} rows of earlier runs whose records are not in "
                      "this input")
    console.print(f"shards: {summary.root}/raw/<split>/part-*.parquet; summary: {summary.root}/raw/{SUMMARY_NAME}")
