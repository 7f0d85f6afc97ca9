"""PNG plots for `imatdata stats`, drawn headless.

Figures are built with matplotlib's object API on an Agg canvas (no pyplot), so nothing here
touches matplotlib's global backend or figure registry and the functions are safe to call
from any thread or process. Every figure has a fixed pixel size (`FIGURE_PX`) and is written
atomically.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from imatdata.storage import write_bytes_atomic

DPI = 100
FIGURE_PX = (1200, 600)  # width, height of every PNG written here
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_STATUS_COLORS = {
    "http_error": "#d62728", "timeout": "#ff7f0e", "connection_error": "#9467bd",
    "too_large": "#8c564b", "not_image": "#e377c2", "decode_error": "#bcbd22",
    "blocked": "#7f7f7f", "opted_out": "#17becf", "invalid": "#393b79", "fetch_failed": "#d62728",
}


def _figure() -> Figure:
    fig = Figure(figsize=(FIGURE_PX[0] / DPI, FIGURE_PX[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    # No bbox_inches="tight": it would change the pixel size from one dataset to the next.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    write_bytes_atomic(buf.getvalue(), path)
    return path


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, color="#555555",
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _thousands(x: float, _pos: int) -> str:
    return f"{x:,.0f}"


def _minor_log_label(span: float) -> Any:
    """Label the 2x and 5x minor ticks of a log axis spanning under three decades, so a short
    axis is not left with a single labelled tick; wider axes have enough major labels."""
    def label(x: float, _pos: int) -> str:
        if span >= 1000:
            return ""
        lead = round(x / 10 ** np.floor(np.log10(x)), 6)
        return f"{x:,.0f}" if lead in (2.0, 5.0) else ""
    return label


def plot_class_counts(counts: Mapping[str, Sequence[int] | np.ndarray], path: Path, *,
                      min_count: int, stage: str) -> Path:
    """Images per class for each split, classes sorted from most to least frequent (log scale)."""
    fig = _figure()
    ax = fig.add_subplot()
    drawn = False
    for i, (split, values) in enumerate(counts.items()):
        arr = np.sort(np.asarray(values, dtype=np.int64))[::-1]
        arr = arr[arr > 0]
        if arr.size == 0:
            continue
        drawn = True
        ranks = np.arange(1, arr.size + 1)
        label = f"{split}: {arr.size:,} classes, {int(arr.max()):,} to {int(arr.min()):,} images"
        ax.step(ranks, arr, where="mid", color=_COLORS[i % len(_COLORS)], linewidth=1.8, label=label)
    ax.set_title(f"Images per class, classes sorted by count ({stage} stage, usable rows)", fontsize=14)
    if not drawn:
        _empty(ax, "no labelled usable images")
        return _save(fig, path)
    ax.axhline(min_count, color="#555555", linestyle="--", linewidth=1,
               label=f"threshold: {min_count} images")
    positive = [int(v) for values in counts.values() for v in values if v > 0] + [max(min_count, 1)]
    log = max(positive) / min(positive) >= 20
    if log:
        # A long tail needs a log axis; a narrow range reads better on a linear one.
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_log_label(max(positive) / min(positive))))
    else:
        ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.set_xlabel("class rank (1 = most frequent)", fontsize=12)
    ax.set_ylabel("images per class" + (" (log scale)" if log else ""), fontsize=12)
    ax.set_xlim(left=0)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize=11)
    return _save(fig, path)


def plot_image_sizes(orig_short: np.ndarray, stored_short: np.ndarray, served_bytes: np.ndarray,
                     path: Path, *, stage: str) -> Path:
    """Left: shorter image side as served and as stored. Right: body size as served."""
    fig = _figure()
    left, right = fig.subplots(1, 2)
    fig.suptitle(f"Image sizes ({stage} stage, usable rows, all splits)", fontsize=14)

    sides = [a for a in (orig_short, stored_short) if a.size]
    if sides:
        # Clip the long tail into the last bin so a few huge images do not flatten the rest.
        top = max(float(np.percentile(np.concatenate(sides), 99.5)), 1.0)
        bins = np.linspace(0, top * 1.02, 51)
        for arr, label, color in ((orig_short, "as served", _COLORS[0]), (stored_short, "as stored", _COLORS[1])):
            if arr.size:
                left.hist(np.clip(arr, 0, bins[-1]), bins=bins, histtype="stepfilled", alpha=0.45,
                          color=color, edgecolor=color, linewidth=1.5,
                          label=f"{label} (median {np.median(arr):,.0f} px)")
        left.set_xlabel("shorter side (pixels; last bin holds the top 0.5 %)", fontsize=12)
        left.set_ylabel("images", fontsize=12)
        left.yaxis.set_major_formatter(FuncFormatter(_thousands))
        left.legend(fontsize=11)
        left.grid(True, alpha=0.3)
    else:
        _empty(left, "no usable images")
    left.set_title("Shorter side", fontsize=13)

    kib = served_bytes[served_bytes > 0] / 1024.0
    if kib.size:
        lo, hi = float(kib.min()), float(kib.max())
        bins = np.geomspace(lo, hi * 1.0001, 51) if hi > lo else np.array([lo * 0.9, lo * 1.1])
        right.hist(kib, bins=bins, histtype="stepfilled", alpha=0.6, color=_COLORS[2],
                   edgecolor=_COLORS[2], label=f"median {np.median(kib):,.1f} KiB")
        right.set_xscale("log")
        right.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:,.0f}" if x >= 1 else f"{x:g}"))
        right.set_xlabel("body size as served (KiB, log scale)", fontsize=12)
        right.set_ylabel("images", fontsize=12)
        right.yaxis.set_major_formatter(FuncFormatter(_thousands))
        right.legend(fontsize=11)
        right.grid(True, alpha=0.3)
    else:
        _empty(right, "no served sizes recorded")
    right.set_title("Download size", fontsize=13)
    return _save(fig, path)


def plot_host_failures(hosts: Sequence[Mapping[str, Any]], path: Path, *, source: str) -> Path:
    """Failure rate of the worst hosts, each bar split by failure status."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.set_title(f"Fetch failures by host, worst {len(hosts)} by failure rate (from {source} rows)",
                 fontsize=14)
    if not hosts:
        _empty(ax, "no fetch failures")
        return _save(fig, path)
    names = [_short(h["host"]) for h in hosts]
    y = np.arange(len(hosts))
    statuses = sorted({s for h in hosts for s in h["failures"]},
                      key=lambda s: -sum(h["failures"].get(s, 0) for h in hosts))
    left = np.zeros(len(hosts))
    for i, status in enumerate(statuses):
        share = np.array([100.0 * h["failures"].get(status, 0) / h["records"] for h in hosts])
        ax.barh(y, share, left=left, height=0.7, label=status,
                color=_STATUS_COLORS.get(status, _COLORS[i % len(_COLORS)]))
        left += share
    for yi, h, end in zip(y, hosts, left):
        ax.text(end + 0.5, yi, f"{h['failed']:,} / {h['records']:,}", va="center", fontsize=9)
    ax.set_yticks(y, names, fontsize=9 if len(hosts) > 12 else 11)
    ax.invert_yaxis()  # worst host on top
    # Room right of the longest bar for its "failed / records" label.
    ax.set_xlim(0, min(100.0, float(left.max())) * 1.18 + 2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:.0f}%" if x <= 100 else ""))
    ax.set_xlabel("failed rows, as a share of the host's rows", fontsize=12)
    ax.set_ylabel("host", fontsize=12)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(title="status", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=10)
    return _save(fig, path)


def _short(host: str, width: int = 38) -> str:
    return host if len(host) <= width else "…" + host[-(width - 1):]
