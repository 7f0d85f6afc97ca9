"""The terminal tables of `imatdata stats`, from a stats.json dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imatdata.manifest import DROP_REASONS, STATUSES
from imatdata.stats.compute import STATS_DIR, _ranked
from imatdata.storage import as_location
from imatdata.terminal import table


def render_stats(data: dict[str, Any], console: Any) -> None:
    """Rich tables of a stats.json dict."""
    splits = data["splits"]
    names = list(splits)
    clean = data["stage"] == "clean"

    console.print(table(
        f"Splits ({data['stage']} stage, {data['root']})",
        ("split", "records", "ok", "ok %", "failed", *(["dropped"] if clean else []), "stored", "served"),
        [(s, _n(v["records"]), _n(v["ok"]), _pct(v["ok"], v["records"]), _n(v["failed"]),
          *([_n(v["dropped"])] if clean else []), _bytes(v["bytes"]["stored"]), _bytes(v["bytes"]["served"]))
         for s, v in splits.items()]))

    failures = _ranked({k for v in splits.values() for k in v["failures"]}, STATUSES)
    if failures:
        console.print(table(f"Fetch failures by status (from {data['fetch_source']} rows)", ("status", *names),
                            [(status, *(_n(splits[s]["failures"].get(status, 0)) for s in names))
                             for status in failures]))

    if clean:
        reasons = _ranked({k for v in splits.values() for k in (v["drops"] or {})}, DROP_REASONS)
        if reasons:
            console.print(table("Dropped by clean, by reason", ("reason", *names),
                                [(reason, *(_n((splits[s]["drops"] or {}).get(reason, 0)) for s in names))
                                 for reason in reasons]))

    console.print(table("Image sizes of usable rows", ("split", "measure", "min", "p5", "median", "p95", "max"),
                        _size_rows(splits), left=2))

    per_split = data["classes"]["per_split"]
    if per_split:
        console.print(table(
            f"Images per class (usable rows; rare = under {data['min_count']})",
            ("split", "classes", "min", "median", "mean", "max", "max/min", "rare", "miss/train", "miss/tree"),
            [(s, _n(c["classes"]), _n(c["min"]), _n(c["median"]), _n(c["mean"]), _n(c["max"]),
              _n(c["imbalance_ratio"]), _n(c["below_min_count"]), _len(c["missing_vs_train"]),
              _len(c["missing_vs_tree"])) for s, c in per_split.items()]))
        for s, c in per_split.items():
            console.print(table(f"Most and least frequent classes in {s}",
                                ("rank", "most frequent", "images", "least frequent", "images "),
                                _extremes_rows(c["most_frequent"], c["least_frequent"]), left=0))

    hierarchy = data["hierarchy"]
    if hierarchy:
        source = "the packaged tree" if hierarchy["tree"] == "packaged" else hierarchy["tree"]
        for level in ("level1", "level2"):
            console.print(table(
                f"Images per {level} node: images (classes with images)", ("node", "leaves", *per_split),
                [(key, _n(node["leaves"]),
                  *(f"{_n(node['counts'][s])} ({node['classes_present'][s]})" for s in per_split))
                 for key, node in hierarchy[level].items()],
                caption=f"tree: {source}"))

    hosts = data["hosts"]
    if hosts["top"]:
        console.print(table(
            f"Hosts by failure rate ({hosts['hosts_with_failures']:,} of {hosts['hosts']:,} hosts had failures)",
            ("host", "records", "failed", "rate", "statuses"),
            [(h["host"], _n(h["records"]), _n(h["failed"]), f"{100 * h['failure_rate']:.1f}%",
              _top_statuses(h["failures"])) for h in hosts["top"]]))
    if data["files"]:
        folder = as_location(data["root"]) / STATS_DIR
        console.print(f"Wrote {folder}: " + ", ".join(Path(f).name for f in data["files"]))


def _size_rows(splits: dict[str, Any]) -> list[tuple[str, ...] | None]:
    """Five measures per split, a rule under each split."""
    measures = (("width", "stored width"), ("height", "stored height"), ("orig_width", "served width"),
                ("orig_height", "served height"), ("orig_bytes", "served size"))
    rows: list[tuple[str, ...] | None] = []
    for s, v in splits.items():
        for i, (column, label) in enumerate(measures):
            z = v["sizes"][column]
            fmt = _bytes if column == "orig_bytes" else (lambda x: f"{x:,.0f}")
            cells = ["–"] * 5 if z is None else [fmt(z[k]) for k in ("min", "p5", "p50", "p95", "max")]
            rows.append((s if i == 0 else "", label, *cells))
        rows.append(None)
    return rows


def _extremes_rows(most: list[dict[str, Any]], least: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows = []
    for i in range(max(len(most), len(least))):
        m = most[i] if i < len(most) else None
        low = least[i] if i < len(least) else None
        rows.append((str(i + 1), "" if m is None else str(m["class"]), "" if m is None else _n(m["count"]),
                     "" if low is None else str(low["class"]), "" if low is None else _n(low["count"])))
    return rows


def _top_statuses(failures: dict[str, int], shown: int = 3) -> str:
    ranked = sorted(failures.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{k} {v:,}" for k, v in ranked[:shown])
    return text + (f", +{len(ranked) - shown} more" if len(ranked) > shown else "")


def _n(v: float | int | None) -> str:
    if v is None:
        return "–"
    return f"{v:,}" if isinstance(v, int) else f"{v:,.2f}"


def _len(v: list | None) -> str:
    return "–" if v is None else f"{len(v):,}"


def _pct(part: int, whole: int) -> str:
    return "–" if not whole else f"{100 * part / whole:.1f}%"


def _bytes(n: float | int | None) -> str:
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} TiB"
