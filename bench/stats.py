"""Benchmark `imatdata stats` on a generated million-row manifest root.

Generates (in seconds: columns drawn vectorised, rows made by imatsample.shards.manifest_row)
a raw stage of N rows shaped like iMaterialist 2019 — 2,019 classes with 157 to 1,045 train
images each, a small val and test split, a few hundred hosts with their own failure rates,
image column null (metadata only) — plus a clean stage and clean/dropped.parquet derived
from it. Then times, in one run:

  * `stats.compute_stats` on the clean stage and on the raw stage (the figures only),
  * `stats.write_stats` (figures + stats.json + csv + three PNGs),
  * a plain-Python baseline that computes only the class counts and per-host failure counts
    by looping over the same metadata rows (what the vectorised code replaces).

    .venv/bin/python bench/stats.py [--rows 1000000] [--keep DIR] [--no-baseline]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
from imatsample.shards import manifest_row, write_shards

from imatdata import stats
from imatdata.manifest import (
    CLEAN_SCHEMA,
    DROPPED_SCHEMA,
    RAW_SCHEMA,
    STATUSES,
    ShardWriter,
    read_table,
    write_table_atomic,
)

N_CLASSES = 2019


def generate(root: Path, rows: int, seed: int = 0) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    # Train dominates; val and test are ~3 % and ~2 % as in the competition.
    n_val, n_test = int(rows * 0.03), int(rows * 0.02)
    n_train = rows - n_val - n_test
    per_class = rng.integers(157, 1046, N_CLASSES).astype(np.float64)
    per_class = per_class / per_class.sum()
    n_hosts = 400
    host_names = np.array([f"img{i}.shop{i % 37}.example.com" for i in range(n_hosts)], dtype=object)
    host_weight = 1.0 / np.arange(1, n_hosts + 1) ** 1.1  # a few hosts serve most images
    host_weight /= host_weight.sum()
    host_fail = rng.beta(1, 12, n_hosts)  # most hosts fail rarely, some badly
    fail_status = np.array(STATUSES[1:], dtype=object)

    sizes = {}
    dropped_parts = []
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = None if split == "test" else rng.choice(N_CLASSES, n, p=per_class).astype(np.int32)
        host_idx = rng.choice(n_hosts, n, p=host_weight)
        failed = rng.random(n) < host_fail[host_idx]
        status = np.where(failed, fail_status[rng.integers(0, len(fail_status), n)], "ok")
        ow = rng.integers(80, 3000, n).astype(np.int32)
        oh = (ow * rng.uniform(0.6, 1.6, n)).astype(np.int32)
        served = rng.lognormal(11.5, 0.8, n).astype(np.int64)
        scale = np.minimum(1.0, 512 / np.maximum(ow, oh))
        width, height = (ow * scale).astype(np.int32), (oh * scale).astype(np.int32)
        ok = ~failed
        columns = zip([None] * n if labels is None else labels.tolist(), status.tolist(),
                      host_names[host_idx].tolist(), width.tolist(), height.tolist(),
                      ow.tolist(), oh.tolist(), served.tolist())
        # Metadata only: ok rows have sizes and a served byte count but no image.
        raw_rows = (manifest_row(f"{split}-{k}", split, label, status=state,
                                 url=f"http://{host}/p/{split}-{k}.jpg?w=750",
                                 size=(w, h), orig=(o_w, o_h), orig_bytes=nbytes)
                    for k, (label, state, host, w, h, o_w, o_h, nbytes) in enumerate(columns))
        write_shards(root / "raw" / split, raw_rows, schema=RAW_SCHEMA)
        table = read_table(root / "raw" / split)

        # clean: test keeps everything; elsewhere failures and ~4 % of the rest are dropped.
        drop_other = ok & (rng.random(n) < 0.04) if split != "test" else np.zeros(n, bool)
        drop = (failed | drop_other) if split != "test" else drop_other
        kept = table.filter(pa.array(~drop)).append_column(
            "phash", pa.array(rng.integers(-(2**62), 2**62, int((~drop).sum())), pa.int64()))
        with ShardWriter(root / "clean" / split, schema=CLEAN_SCHEMA) as w:
            w.write_batch(kept)
        other = np.array(["duplicate", "undersized", "near_duplicate"])[rng.integers(0, 3, n)]
        reasons = np.where(failed, "fetch_failed", other)
        gone = table.filter(pa.array(drop))
        dropped_parts.append(pa.table({"id": gone["id"], "split": gone["split"], "label": gone["label"],
                                       "url": gone["url"], "reason": pa.array(reasons[drop].astype(str)),
                                       "detail": pa.nulls(gone.num_rows, pa.string())}, schema=DROPPED_SCHEMA))
        sizes[split] = n
    write_table_atomic(pa.concat_tables(dropped_parts), root / "clean" / "dropped.parquet")
    return sizes


def baseline(root: Path) -> tuple[Counter, Counter, Counter]:
    """The same class counts and host failures, one Python iteration per row."""
    classes: Counter = Counter()
    records: Counter = Counter()
    failed: Counter = Counter()
    for split in ("train", "val", "test"):
        t = read_table(root / "raw" / split, columns=["label", "url", "status"])
        for label, url, status in zip(t["label"].to_pylist(), t["url"].to_pylist(), t["status"].to_pylist()):
            host = url.split("://", 1)[1].split("/", 1)[0].lower()
            records[host] += 1
            if status == "ok":
                if label is not None:
                    classes[label] += 1
            else:
                failed[host] += 1
    return classes, records, failed


def timed(label: str, fn, *args, **kwargs):
    # CPU time beside wall time: on a shared machine the wall figure mostly measures the others.
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"  {label:<46} {dt:7.2f} s wall {cpu:7.2f} s CPU")
    return out, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--keep", type=Path, help="generate into this folder and keep it")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp) / "root"
        print(f"imatdata stats benchmark: {args.rows:,} raw rows under {root}")
        sizes, _ = timed("generate raw + clean + dropped", generate, root, args.rows)
        print("  splits: " + ", ".join(f"{s} {n:,}" for s, n in sizes.items()))
        clean, t_clean = timed("stats.compute_stats (clean stage, fetch from raw)", stats.compute_stats, root)
        timed("stats.compute_stats (raw stage)", stats.compute_stats, root, "raw")
        timed("stats.compute_stats (clean, --tree packaged)", stats.compute_stats, root, None, "packaged")
        timed("stats.write_stats (figures, json, csv, PNGs)", stats.write_stats, root, None, Path("packaged"))
        if not args.no_baseline:
            (classes, records, failed), t_base = timed("plain-Python loop: class + host counts only", baseline, root)
            raw = stats.compute_stats(root, "raw").data
            top = raw["hosts"]["top"][0]
            assert failed[top["host"]] == top["failed"] and records[top["host"]] == top["records"]
            assert sum(classes.values()) == sum(raw["classes"]["per_split"][s]["images"] for s in ("train", "val"))
            print(f"  wall time, loop (two figures) / compute (all figures): {t_base / t_clean:.1f}x")
        d = clean.data
        print(f"  clean stage: {d['totals']['ok']:,} usable of {d['totals']['records']:,} records; "
              f"train classes {d['classes']['per_split']['train']['classes']:,}, "
              f"imbalance {d['classes']['per_split']['train']['imbalance_ratio']}")


if __name__ == "__main__":
    main()
