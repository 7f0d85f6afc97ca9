"""The figures of `imatdata stats` and the files under `stats/` (see the package doc)."""


from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imatdata import storage
from imatdata.errors import UserError
from imatdata.manifest import (
    DROP_REASONS,
    DROPPED_SCHEMA,
    STATUSES,
    list_shards,
    list_splits,
    order_splits,
    read_table,
)
from imatdata.stats.config import StatsOptions
from imatdata.storage import write_bytes_atomic
from imatdata.tree import ProductTree

STAGES = ("raw", "clean")
STATS_DIR = "stats"
PERCENTILES = (("min", 0), ("p5", 5), ("p25", 25), ("p50", 50), ("p75", 75), ("p95", 95), ("max", 100))
SIZE_COLUMNS = ("width", "height", "orig_width", "orig_height", "orig_bytes")
FETCH_FAILED = "fetch_failed"
# The authority (userinfo@host:port) of an absolute URL. Kept this simple because RE2 runs a
# plain pattern like this several times faster than one that also splits the authority.
_AUTHORITY_RE = r"^[A-Za-z][A-Za-z0-9+.\-]*://(?P<authority>[^/?#]*)"
NO_HOST = "(no host)"


@dataclass
class StatsResult:
    """stats.json's figures plus the arrays the plots need (kept out of the JSON)."""

    data: dict[str, Any]
    class_counts: dict[str, dict[int, int]]  # labelled split -> class -> usable rows
    all_classes: list[int]
    tree: ProductTree | None
    orig_short: np.ndarray = field(default_factory=lambda: np.zeros(0))
    stored_short: np.ndarray = field(default_factory=lambda: np.zeros(0))
    served_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))


# --- entry points ---------------------------------------------------------------------------


def write_stats(root: Path, stage: str | None = None, tree: Path | None = None, quiet: bool = True,
                *, options: StatsOptions | None = None, console: Any = None) -> dict:
    """Compute the stats of `root`, write everything under `root/stats/`, return stats.json's dict.

    With `quiet=False` the tables are printed (to `console`, a rich Console, or stdout).
    `tree` is a product-tree JSON file, the word "packaged", or None for no hierarchy.
    """
    root = storage.as_location(root)
    result = compute_stats(root, stage, tree, options=options)
    write_outputs(result, root)
    if not quiet:
        from rich.console import Console

        from imatdata.stats.render import render_stats

        render_stats(result.data, console or Console())
    return result.data


def compute_stats(root: Path, stage: str | None = None, tree: Path | str | ProductTree | None = None, *,
            options: StatsOptions | None = None) -> StatsResult:
    """All figures of stats.json, from metadata columns only. Writes nothing."""
    opts = options or StatsOptions()
    root = storage.as_location(root)
    stage = resolve_stage(root, stage)
    product_tree = tree if isinstance(tree, ProductTree) or tree is None else ProductTree.load(tree)
    stage_path = root / stage
    splits = order_splits(list_splits(stage_path))

    raw_splits = set(list_splits(root / "raw"))
    fetch_source = "raw" if stage == "raw" or raw_splits else "clean"
    dropped = _read_dropped(root) if stage == "clean" else None

    split_stats: dict[str, dict[str, Any]] = {}
    class_counts: dict[str, dict[int, int]] = {}
    seen_classes: set[int] = set()
    outcomes: list[pa.Table] = []
    short_orig, short_stored, served = [], [], []

    for split in splits:
        # The url column is only needed when raw/ cannot supply this split's fetch outcomes.
        needs_url = stage == "raw" or split not in raw_splits
        columns = ["label", "status", "width", "height", "orig_width", "orig_height", "orig_bytes"]
        shards = list_shards(stage_path / split)
        t = _read(stage_path / split, columns + (["url"] if needs_url else []))
        usable = pc.fill_null(pc.equal(t["status"], "ok"), False)
        n_usable = int(pc.sum(usable).as_py() or 0)

        mine = None if dropped is None else dropped.filter(pc.equal(dropped["split"], split))
        n_dropped = 0 if mine is None else mine.num_rows
        if mine is not None:
            seen_classes.update(_value_counts(mine["label"]))

        if needs_url:
            fetched = _outcomes(t["url"], t["status"])
            if mine is not None:
                # Without raw/, a fetch failure that clean dropped is known only by its reason.
                status = pc.if_else(pc.equal(mine["reason"], FETCH_FAILED), FETCH_FAILED, "ok")
                fetched = pa.concat_tables([fetched, _outcomes(mine["url"], status)])
        else:
            raw_rows = _read(root / "raw" / split, ["url", "status"])
            fetched = _outcomes(raw_rows["url"], raw_rows["status"])
        outcomes.append(fetched)
        statuses = _value_counts(fetched["status"])
        failures = {s: n for s, n in statuses.items() if s != "ok"}

        labels_all = _value_counts(t["label"])
        seen_classes.update(labels_all)
        labelled = bool(labels_all) or (mine is not None and mine.num_rows > mine["label"].null_count)
        usable_labels = pc.filter(t["label"], usable)
        if labelled:
            counts = _value_counts(usable_labels)
            class_counts[split] = counts
        unlabelled_usable = int(usable_labels.null_count) if labelled else 0

        ok_rows = t.filter(usable)
        sizes = {c: _percentiles(ok_rows[c]) for c in SIZE_COLUMNS}
        served_arr = _to_numpy(ok_rows["orig_bytes"])
        served.append(served_arr)
        short_orig.append(_shorter_side(ok_rows["orig_width"], ok_rows["orig_height"]))
        short_stored.append(_shorter_side(ok_rows["width"], ok_rows["height"]))

        split_stats[split] = {
            "records": t.num_rows + n_dropped,
            "rows": t.num_rows,
            "ok": n_usable,
            "labelled": labelled,
            "unlabelled_ok": unlabelled_usable,
            "statuses": _sorted_statuses(statuses),
            "failed": sum(failures.values()),
            "failures": _sorted_statuses(failures),
            "drops": None if mine is None else _sorted_reasons(_value_counts(mine["reason"])),
            "dropped": n_dropped,
            "bytes": {
                "stored": sum(storage.size(p) for p in shards),
                "images": _image_column_bytes(shards),
                "served": int(served_arr.sum()) if served_arr.size else 0,
            },
            "sizes": sizes,
        }

    usable_classes = sorted(set().union(*[set(c) for c in class_counts.values()]) if class_counts else set())
    all_classes = sorted(seen_classes | set(usable_classes) | (set(product_tree.classes) if product_tree else set()))

    data: dict[str, Any] = {
        "version": 1,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "root": str(root),
        "stage": stage,
        "min_count": opts.min_count,
        "fetch_source": fetch_source,
        "totals": {k: sum(s[k] for s in split_stats.values())
                   for k in ("records", "rows", "ok", "failed", "dropped")},
        "splits": split_stats,
        "classes": {
            "num_classes": len(usable_classes),
            "per_split": {split: _class_stats(counts, class_counts, product_tree, opts)
                          for split, counts in class_counts.items()},
        },
        "hierarchy": None if product_tree is None else _hierarchy(product_tree, class_counts),
        "hosts": _hosts(outcomes, opts),
        "files": [],
    }
    return StatsResult(
        data=data, class_counts=class_counts, all_classes=all_classes, tree=product_tree,
        orig_short=_concat(short_orig), stored_short=_concat(short_stored), served_bytes=_concat(served),
    )


def write_outputs(result: StatsResult, root: Path) -> list[Path]:
    """stats.json, class_counts.csv and the PNGs under `root/stats/`, each written atomically."""
    # matplotlib is imported here, not at module level, so `compute` and the CLI start fast.
    from imatdata.stats import plots

    out = storage.as_location(root) / STATS_DIR
    storage.make_dirs(out)
    data = result.data
    stage = data["stage"]
    paths = [
        plots.plot_class_counts({s: list(c.values()) for s, c in result.class_counts.items()},
                                out / "class_counts.png", min_count=data["min_count"], stage=stage),
        plots.plot_image_sizes(result.orig_short, result.stored_short, result.served_bytes,
                               out / "image_sizes.png", stage=stage),
        plots.plot_host_failures(data["hosts"]["top"], out / "host_failures.png",
                                 source=data["fetch_source"]),
    ]
    csv_path = out / "class_counts.csv"
    write_bytes_atomic(class_counts_csv(result).encode("utf-8"), csv_path)
    json_path = out / "stats.json"
    data["files"] = [f"{STATS_DIR}/{p.name}" for p in [json_path, csv_path, *paths]]  # relative to the root
    write_bytes_atomic(dumps(data).encode("utf-8"), json_path)
    return [json_path, csv_path, *paths]


def dumps(data: dict[str, Any]) -> str:
    """The exact text of stats.json (also what `--json` prints)."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def class_counts_csv(result: StatsResult) -> str:
    splits = list(result.class_counts)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class", "level1", "level2", "level3", *splits])
    for cid in result.all_classes:
        path = result.tree.path(cid) if result.tree is not None else None
        writer.writerow([cid, *(path or ("", "", "")), *(result.class_counts[s].get(cid, 0) for s in splits)])
    return buf.getvalue()


# --- stage and splits -------------------------------------------------------------------------


def resolve_stage(root: Path, stage: str | None) -> str:
    """The stage to describe: as asked, else clean when clean/ holds shards, else raw."""
    if stage is not None and stage not in STAGES:
        raise UserError(f"--stage must be raw or clean, not {stage!r}")
    if stage is None:
        stage = "clean" if list_splits(root / "clean") else "raw"
        if not list_splits(root / "raw") and stage == "raw":
            raise UserError(f"no manifest shards under {root} (neither raw/ nor clean/ holds any): run "
                            f"`imatdata fetch` first, or point --root / IMAT_ROOT at a manifest root")
    if not list_splits(root / stage):
        step = "imatdata fetch" if stage == "raw" else "imatdata clean"
        raise UserError(f"no {stage} manifest shards under {root / stage}: run `{step}` first "
                        f"or choose the other --stage")
    return stage


# --- reading ------------------------------------------------------------------------------------


def _read(path: Path, columns: list[str]) -> pa.Table:
    try:
        return read_table(path, columns=columns)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise UserError(f"cannot read the manifest shards under {path}: {exc}".splitlines()[0]) from None


def _read_dropped(root: Path) -> pa.Table:
    path = root / "clean" / "dropped.parquet"
    columns = ["split", "label", "url", "reason"]
    if not storage.is_file(path):
        # Clean always writes it; a root without it simply has nothing dropped.
        return DROPPED_SCHEMA.empty_table().select(columns)
    try:
        with storage.parquet_file(path) as f:
            return f.read(columns=columns)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise UserError(f"cannot read {path}: {exc}".splitlines()[0]) from None


_OUTCOME_SCHEMA = pa.schema([pa.field("url", pa.string()), pa.field("status", pa.string())])


def _outcomes(url: Any, status: Any) -> pa.Table:
    """(url, status) with one schema whatever the source's nullability, so tables concatenate."""
    return pa.Table.from_arrays([url, status], schema=_OUTCOME_SCHEMA)


def _image_column_bytes(shards: Sequence[Path]) -> int:
    """Bytes of the image column as stored, from the Parquet footers (no image is read)."""
    total = 0
    for shard in shards:
        with storage.parquet_file(shard) as f:
            meta = f.metadata
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        if "image" not in names:
            continue
        idx = names.index("image")
        total += sum(meta.row_group(r).column(idx).total_compressed_size for r in range(meta.num_row_groups))
    return total


# --- figures -------------------------------------------------------------------------------------


def _value_counts(arr: pa.ChunkedArray | pa.Array) -> dict[Any, int]:
    """{value: occurrences}, nulls left out."""
    if len(arr) == 0:
        return {}
    vc = pc.value_counts(arr)
    return {v: int(c) for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())
            if v is not None}


def _ranked(names: Any, order: Sequence[str]) -> list[str]:
    """Names in a fixed order (statuses or reasons as listed in manifest.py), unknown ones last."""
    rank = {s: i for i, s in enumerate(order)}
    return sorted(names, key=lambda s: (rank.get(s, len(rank)), s))


def _sorted_statuses(counts: dict[str, int]) -> dict[str, int]:
    return {s: counts[s] for s in _ranked(counts, STATUSES)}


def _sorted_reasons(counts: dict[str, int]) -> dict[str, int]:
    return {s: counts[s] for s in _ranked(counts, DROP_REASONS)}


def _to_numpy(arr: pa.ChunkedArray) -> np.ndarray:
    return arr.drop_null().to_numpy().astype(np.float64, copy=False) if len(arr) else np.zeros(0)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)


def _shorter_side(w: pa.ChunkedArray, h: pa.ChunkedArray) -> np.ndarray:
    both = pc.min_element_wise(w, h, skip_nulls=False)
    return _to_numpy(both)


def _percentiles(arr: pa.ChunkedArray) -> dict[str, float | int] | None:
    values = _to_numpy(arr)
    if values.size == 0:
        return None
    qs = np.percentile(values, [q for _, q in PERCENTILES])
    out: dict[str, float | int] = {"count": int(values.size)}
    out.update({name: _num(v) for (name, _), v in zip(PERCENTILES, qs)})
    out["mean"] = _num(values.mean())
    return out


def _num(v: float) -> float | int:
    """Integers stay integers in the JSON; other figures keep two decimals."""
    f = float(v)
    return int(f) if f.is_integer() else round(f, 2)


def _class_stats(counts: dict[int, int], all_counts: dict[str, dict[int, int]],
                 tree: ProductTree | None, opts: StatsOptions) -> dict[str, Any]:
    present = sorted(counts)
    values = np.array([counts[c] for c in present], dtype=np.int64)
    train = all_counts.get("train")
    stats: dict[str, Any] = {
        "classes": len(present),
        "images": int(values.sum()) if values.size else 0,
        "min": None, "max": None, "median": None, "mean": None, "imbalance_ratio": None,
        "below_min_count": int((values < opts.min_count).sum()),
        "most_frequent": [{"class": c, "count": counts[c]}
                          for c in sorted(present, key=lambda c: (-counts[c], c))[:opts.top]],
        "least_frequent": [{"class": c, "count": counts[c]}
                           for c in sorted(present, key=lambda c: (counts[c], c))[:opts.top]],
        "missing_vs_train": None if train is None else sorted(set(train) - set(counts)),
        "missing_vs_tree": None if tree is None else sorted(set(tree.leaf_paths) - set(counts)),
        "unknown_to_tree": None if tree is None else sorted(c for c in present if c not in tree),
    }
    if values.size:
        stats.update({
            "min": int(values.min()),
            "max": int(values.max()),
            "median": _num(np.median(values)),
            "mean": _num(values.mean()),
            "imbalance_ratio": _num(values.max() / values.min()),
        })
    return stats


def _hierarchy(tree: ProductTree, class_counts: dict[str, dict[int, int]]) -> dict[str, Any]:
    out: dict[str, Any] = {"tree": tree.source, "leaves": tree.num_classes}
    for level in (1, 2, 3):
        nodes: dict[str, Any] = {}
        for key in tree.nodes(level):
            leaves = tree.leaves_under(key)
            nodes[key] = {
                "leaves": len(leaves),
                "counts": {s: sum(c.get(l, 0) for l in leaves) for s, c in class_counts.items()},
                "classes_present": {s: sum(1 for l in leaves if c.get(l, 0) > 0)
                                    for s, c in class_counts.items()},
            }
        out[f"level{level}"] = nodes
    return out


def host_of_authority(authority: str) -> str:
    """The host of a URL's authority as urllib names it: no userinfo, no port, no IPv6
    brackets, lower case; NO_HOST when there is none."""
    host = authority.rpartition("@")[2]
    host = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
    return host.lower() or NO_HOST


def _host_codes(urls: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[str]]:
    """(per row: index into the host list, sorted host list).

    A simple anchored regex cuts out the authority of every URL; only the distinct
    authorities (hundreds or thousands, not millions) are then parsed in Python.
    """
    authority = pc.struct_field(pc.extract_regex(urls, _AUTHORITY_RE), [0])
    if isinstance(authority, pa.ChunkedArray):
        authority = authority.combine_chunks()
    encoded = pc.dictionary_encode(pc.fill_null(authority, ""))
    names = [host_of_authority(a) for a in encoded.dictionary.to_pylist()]
    hosts, inverse = np.unique(np.array(names, dtype=object), return_inverse=True)
    codes = inverse.reshape(-1)[encoded.indices.to_numpy(zero_copy_only=False)]
    return codes, [str(h) for h in hosts]


def _hosts(outcomes: list[pa.Table], opts: StatsOptions) -> dict[str, Any]:
    table = pa.concat_tables(outcomes) if outcomes else _OUTCOME_SCHEMA.empty_table()
    if table.num_rows == 0:
        return {"hosts": 0, "hosts_with_failures": 0, "min_records": opts.host_min_records, "top": []}
    codes, hosts = _host_codes(table["url"])
    failed_mask = pc.fill_null(pc.not_equal(table["status"], "ok"), True)
    failed = failed_mask.to_numpy(zero_copy_only=False) if isinstance(failed_mask, pa.Array) \
        else np.concatenate([c.to_numpy(zero_copy_only=False) for c in failed_mask.chunks])
    records = np.bincount(codes, minlength=len(hosts))
    fails = np.bincount(codes[failed], minlength=len(hosts))

    eligible = np.nonzero((fails > 0) & (records >= opts.host_min_records))[0]
    rate = fails[eligible] / records[eligible]
    # Worst rate first, then more failures, then host name (the host list is sorted).
    order = np.lexsort((eligible, -fails[eligible], -rate))
    top = eligible[order[:opts.top_hosts]]

    breakdown: dict[int, dict[str, int]] = {int(h): {} for h in top}
    if top.size:
        rows = failed & np.isin(codes, top)
        sub = pa.table({"code": codes[rows], "status": table["status"].filter(pa.array(rows))})
        for row in sub.group_by(["code", "status"]).aggregate([("code", "count")]).to_pylist():
            breakdown[row["code"]][row["status"] if row["status"] is not None else "unknown"] = row["code_count"]
    return {
        "hosts": len(hosts),
        "hosts_with_failures": int((fails > 0).sum()),
        "min_records": opts.host_min_records,
        "top": [{"host": hosts[h], "records": int(records[h]), "failed": int(fails[h]),
                 "failure_rate": round(float(fails[h] / records[h]), 4),
                 "failures": _sorted_statuses(breakdown[int(h)])} for h in top],
    }
