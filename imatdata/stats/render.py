"""The terminal tables of `imatdata stats`, from a stats.json dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imatdata.manifest import DROP_REASONS, STATUSES
from imatdata.stats.compute import STATS_DIR, _ranked


def render(data: dict[str, Any], console: Any) -> None:
    """Rich tables of a stats.json dict."""
    from rich.table import Table

    splits = data["splits"]
    names = list(splits)
    clean = data["stage"] == "clean"

    t = Table(title=f"Splits ({data['stage']} stage, {data['root']})", title_justify="left")
    for col in ("split", "records", "ok", "ok %", "failed", *(["dropped"] if clean else []),
                "stored", "served"):
        t.add_column(col, justify="left" if col == "split" else "right")
    for s, v in splits.items():
        t.add_row(s, _n(v["records"]), _n(v["ok"]), _pct(v["ok"], v["records"]), _n(v["failed"]),
                  *([_n(v["dropped"])] if clean else []), _bytes(v["bytes"]["stored"]),
                  _bytes(v["bytes"]["served"]))
    console.print(t)

    failures = _ranked({k for v in splits.values() for k in v["failures"]}, STATUSES)
    if failures:
        t = Table(title=f"Fetch failures by status (from {data['fetch_source']} rows)", title_justify="left")
        t.add_column("status")
        for s in names:
            t.add_column(s, justify="right")
        for status in failures:
            t.add_row(status, *(_n(splits[s]["failures"].get(status, 0)) for s in names))
        console.print(t)

    if clean:
        reasons = _ranked({k for v in splits.values() for k in (v["drops"] or {})}, DROP_REASONS)
        t = Table(title="Dropped by clean, by reason", title_justify="left")
        t.add_column("reason")
        for s in names:
            t.add_column(s, justify="right")
        for reason in reasons:
            t.add_row(reason, *(_n((splits[s]["drops"] or {}).get(reason, 0)) for s in names))
        if reasons:
            console.print(t)

    t = Table(title="Image sizes of usable rows", title_justify="left")
    for col in ("split", "measure", "min", "p5", "median", "p95", "max"):
        t.add_column(col, justify="left" if col in ("split", "measure") else "right")
    measures = (("width", "stored width"), ("height", "stored height"), ("orig_width", "served width"),
                ("orig_height", "served height"), ("orig_bytes", "served size"))
    for s, v in splits.items():
        for i, (column, label) in enumerate(measures):
            z = v["sizes"][column]
            fmt = _bytes if column == "orig_bytes" else (lambda x: f"{x:,.0f}")
            cells = ["–"] * 5 if z is None else [fmt(z[k]) for k in ("min", "p5", "p50", "p95", "max")]
            t.add_row(s if i == 0 else "", label, *cells, end_section=i == len(measures) - 1)
    console.print(t)

    per_split = data["classes"]["per_split"]
    if per_split:
        t = Table(title=f"Images per class (usable rows; rare = under {data['min_count']})", title_justify="left")
        for col in ("split", "classes", "min", "median", "mean", "max", "max/min", "rare",
                    "miss/train", "miss/tree"):
            t.add_column(col, justify="left" if col == "split" else "right")
        for s, c in per_split.items():
            t.add_row(s, _n(c["classes"]), _n(c["min"]), _n(c["median"]), _n(c["mean"]), _n(c["max"]),
                      _n(c["imbalance_ratio"]), _n(c["below_min_count"]), _len(c["missing_vs_train"]),
                      _len(c["missing_vs_tree"]))
        console.print(t)
        for s, c in per_split.items():
            t = Table(title=f"Most and least frequent classes in {s}", title_justify="left")
            for col in ("rank", "most frequent", "images", "least frequent", "images "):
                t.add_column(col, justify="right")
            most, least = c["most_frequent"], c["least_frequent"]
            for i in range(max(len(most), len(least))):
                m = most[i] if i < len(most) else None
                l = least[i] if i < len(least) else None
                t.add_row(str(i + 1), "" if m is None else str(m["class"]), "" if m is None else _n(m["count"]),
                          "" if l is None else str(l["class"]), "" if l is None else _n(l["count"]))
            console.print(t)

    hierarchy = data["hierarchy"]
    if hierarchy:
        for level in ("level1", "level2"):
            source = "the packaged tree" if hierarchy["tree"] == "packaged" else hierarchy["tree"]
            t = Table(title=f"Images per {level} node: images (classes with images)",
                      caption=f"tree: {source}", title_justify="left", caption_justify="left")
            t.add_column("node")
            t.add_column("leaves", justify="right")
            for s in per_split:
                t.add_column(s, justify="right")
            for key, node in hierarchy[level].items():
                t.add_row(key, _n(node["leaves"]),
                          *(f"{_n(node['counts'][s])} ({node['classes_present'][s]})" for s in per_split))
            console.print(t)

    hosts = data["hosts"]
    t = Table(title=f"Hosts by failure rate ({hosts['hosts_with_failures']:,} of {hosts['hosts']:,} hosts "
                    f"had failures)", title_justify="left")
    for col in ("host", "records", "failed", "rate", "statuses"):
        t.add_column(col, justify="left" if col in ("host", "statuses") else "right")
    for h in hosts["top"]:
        t.add_row(h["host"], _n(h["records"]), _n(h["failed"]), f"{100 * h['failure_rate']:.1f}%",
                  _top_statuses(h["failures"]))
    if hosts["top"]:
        console.print(t)
    if data["files"]:
        folder = Path(data["root"]) / STATS_DIR
        console.print(f"Wrote {folder}: " + ", ".join(Path(f).name for f in data["files"]))


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
