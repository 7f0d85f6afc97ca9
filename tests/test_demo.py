"""`make demo`'s pipeline, end to end through the real command-line tools (shortened training)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def test_demo_pipeline_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--out", str(out),
                           "--epochs", "1", "--image-size", "32"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "where everything is" in proc.stdout

    lists = {split: json.loads((out / "data" / f"{split}.json").read_text())["images"]
             for split in ("train", "val", "test")}
    manifests = out / "manifests"
    for split, records in lists.items():
        raw = pq.read_table(manifests / "raw" / split, columns=["id", "status"])
        assert sorted(raw.column("id").to_pylist()) == sorted(r["id"] for r in records)
        assert "ok" in raw.column("status").to_pylist()
    failures = pq.read_table(manifests / "raw" / "train", columns=["status"]).column("status").to_pylist()
    assert {"http_error", "blocked"} <= set(failures)  # the planted faults were handled, not fatal

    dropped = pq.read_table(manifests / "clean" / "dropped.parquet").column("reason").to_pylist()
    assert {"fetch_failed", "placeholder", "undersized"} <= set(dropped)
    for name in ("stats.json", "class_counts.csv", "class_counts.png"):
        assert (manifests / "stats" / name).stat().st_size > 0

    run = out / "runs" / "demo"
    assert (run / "checkpoints" / "best.pt").exists() and (run / "metrics.jsonl").exists()
    with open(out / "submission.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "predicted"]
    assert sorted(r[0] for r in rows[1:]) == sorted(r["id"] for r in lists["test"])
    assert all(len(set(r[1].split())) == 3 for r in rows[1:])
