"""`imatdata stats` against figures computed independently, in plain Python, from the rows we wrote.

The manifests are real Parquet written with manifest.ShardWriter / write_table_atomic: a raw
stage with every status and a handful of hosts, and a clean stage derived from it the way
`imatdata clean` lays it out (kept rows in clean/<split>, the rest in clean/dropped.parquet,
test rows all kept).
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import random
import statistics
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pytest
from imatsample.shards import manifest_row
from PIL import Image
from typer.testing import CliRunner

from imatdata import stats
from imatdata.stats import plots
from imatdata.cli import app
from imatdata.errors import UserError
from imatdata.manifest import (
    CLEAN_SCHEMA,
    DROPPED_SCHEMA,
    STATUSES,
    ShardWriter,
    list_shards,
    write_table_atomic,
)

PACKAGED_TREE = Path(stats.__file__).parents[1] / "data" / "product_tree.json"
HOSTS = ["a.example.com", "B.Example.org", "cdn.shop.net:8080", "user@img.x.io", "[2001:db8::7]"]
DROP_MIX = ["undersized", "duplicate", "near_duplicate", "placeholder", "leak", "bad_aspect"]
MIN_COUNT = 5


# --- fixtures: generated manifests and their plain-Python truth --------------------------------


def _tree_leaves() -> list[int]:
    tree = json.loads(PACKAGED_TREE.read_text())
    return [int(c) for l2 in tree.values() for l3 in l2.values() for leaves in l3.values() for c in leaves]


def _make_rows(rng: random.Random, split: str, n: int, classes: list[int]) -> list[dict]:
    rows = []
    for i in range(n):
        status = "ok" if rng.random() < 0.75 else rng.choice(STATUSES[1:])
        ok = status == "ok"
        ow, oh = rng.randint(20, 1600), rng.randint(20, 1600)
        host = rng.choice(HOSTS[:4]) if rng.random() < 0.97 else HOSTS[4]
        url = f"http://{host}/p/{split}/{i}.jpg?w=750" if status != "invalid" or i % 2 else "not a url"
        # A skewed class distribution: a few big classes, a long tail.
        label = None if split == "test" else classes[min(int(rng.paretovariate(1.1)) - 1, len(classes) - 1)]
        image = rng.randbytes(40) if ok else None  # not a real image: the sizes are given
        served = rng.randint(500, 2_000_000) if ok else None
        rows.append(manifest_row(f"{split}-{i:05d}", split, label, image, status=status, url=url,
                                 error=None if ok else f"{status} happened", http_status=200 if ok else 503,
                                 size=(min(ow, 512), min(oh, 512)), orig=(ow, oh), orig_bytes=served))
    return rows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("root")
    classes = rng.sample(_tree_leaves(), 40) + [5000]  # 5000: a class the tree does not know
    raw = {"train": _make_rows(rng, "train", 1500, classes), "val": _make_rows(rng, "val", 300, classes[:25]),
           "test": _make_rows(rng, "test", 200, classes)}
    for split, rows in raw.items():
        # Small shards and row groups so the reader crosses file boundaries.
        with ShardWriter(root / "raw" / split, shard_rows=400, row_group_rows=128) as w:
            w.write_rows(rows)
    clean: dict[str, list[dict]] = {}
    dropped: list[dict] = []
    for split, rows in raw.items():
        kept = []
        for r in rows:
            if split != "test" and r["status"] != "ok":
                reason = "fetch_failed"
            elif split != "test" and rng.random() < 0.1:
                reason = rng.choice(DROP_MIX)
            else:
                kept.append({**r, "phash": rng.getrandbits(63)})
                continue
            dropped.append({"id": r["id"], "split": split, "label": r["label"], "url": r["url"],
                            "reason": reason, "detail": None})
        clean[split] = kept
        with ShardWriter(root / "clean" / split, schema=CLEAN_SCHEMA, shard_rows=500, row_group_rows=100) as w:
            w.write_rows(kept)
    write_table_atomic(pa.Table.from_pylist(dropped, schema=DROPPED_SCHEMA), root / "clean" / "dropped.parquet")
    return {"root": root, "raw": raw, "clean": clean, "dropped": dropped, "classes": classes}


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (the usual definition, numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _host(url: str) -> str:
    return urlsplit(url).hostname or stats.NO_HOST


def _class_counts(rows: list[dict]) -> Counter:
    return Counter(r["label"] for r in rows if r["status"] == "ok" and r["label"] is not None)


@pytest.fixture(scope="module")
def clean_result(dataset: dict) -> dict:
    return stats.write_stats(dataset["root"], tree=PACKAGED_TREE, options=stats.StatsOptions(min_count=MIN_COUNT))


# --- the contract ------------------------------------------------------------------------------


def test_write_stats_signature_is_the_team_contract() -> None:
    sig = inspect.signature(stats.write_stats)
    assert list(sig.parameters)[:4] == ["root", "stage", "tree", "quiet"]
    assert sig.parameters["stage"].default is None
    assert sig.parameters["tree"].default is None
    assert sig.parameters["quiet"].default is True


# --- per split -----------------------------------------------------------------------------------


def test_split_figures_clean_stage(dataset: dict, clean_result: dict) -> None:
    assert clean_result["stage"] == "clean"
    assert clean_result["fetch_source"] == "raw"
    assert list(clean_result["splits"]) == ["train", "val", "test"]
    for split, raw_rows in dataset["raw"].items():
        got = clean_result["splits"][split]
        kept = dataset["clean"][split]
        drops = [d for d in dataset["dropped"] if d["split"] == split]
        assert got["records"] == len(raw_rows) == len(kept) + len(drops)
        assert got["rows"] == len(kept)
        usable = [r for r in kept if r["status"] == "ok"]
        assert got["ok"] == len(usable)
        statuses = Counter(r["status"] for r in raw_rows)
        assert got["statuses"] == dict(statuses)
        assert got["failures"] == {s: n for s, n in statuses.items() if s != "ok"}
        assert got["failed"] == sum(n for s, n in statuses.items() if s != "ok")
        assert got["drops"] == dict(Counter(d["reason"] for d in drops))
        assert got["dropped"] == len(drops)
        assert got["labelled"] is (split != "test")
        assert got["bytes"]["served"] == sum(r["orig_bytes"] for r in usable)
        assert got["bytes"]["stored"] == sum(os.path.getsize(p) for p in list_shards(dataset["root"] / "clean" / split))
        assert 0 < got["bytes"]["images"] < got["bytes"]["stored"] + 1
        for column in stats.SIZE_COLUMNS:
            values = [r[column] for r in usable]
            z = got["sizes"][column]
            assert z["count"] == len(values)
            for name, q in stats.PERCENTILES:
                assert z[name] == pytest.approx(_percentile(values, q), abs=0.006), (split, column, name)
            assert z["mean"] == pytest.approx(statistics.fmean(values), abs=0.006)
    totals = clean_result["totals"]
    assert totals["records"] == sum(len(r) for r in dataset["raw"].values())
    assert totals["dropped"] == len(dataset["dropped"])


def test_split_figures_raw_stage(dataset: dict) -> None:
    data = stats.compute_stats(dataset["root"], "raw").data
    assert data["stage"] == "raw"
    for split, rows in dataset["raw"].items():
        got = data["splits"][split]
        assert got["records"] == got["rows"] == len(rows)
        assert got["ok"] == sum(r["status"] == "ok" for r in rows)
        assert got["drops"] is None and got["dropped"] == 0
        orig = [r["orig_width"] for r in rows if r["status"] == "ok"]
        assert got["sizes"]["orig_width"]["p50"] == pytest.approx(statistics.median(orig), abs=0.006)


# --- per class -----------------------------------------------------------------------------------


def test_class_figures(dataset: dict, clean_result: dict) -> None:
    per_split = clean_result["classes"]["per_split"]
    assert set(per_split) == {"train", "val"}  # test has no labels
    train_counts = _class_counts(dataset["clean"]["train"])
    leaves = set(_tree_leaves())
    for split in ("train", "val"):
        counts = _class_counts(dataset["clean"][split])
        got = per_split[split]
        values = list(counts.values())
        assert got["classes"] == len(counts)
        assert got["images"] == sum(values)
        assert got["min"] == min(values) and got["max"] == max(values)
        assert got["median"] == pytest.approx(statistics.median(values), abs=0.006)
        assert got["mean"] == pytest.approx(statistics.fmean(values), abs=0.006)
        assert got["imbalance_ratio"] == pytest.approx(max(values) / min(values), abs=0.006)
        assert got["below_min_count"] == sum(v < MIN_COUNT for v in values)
        most = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        least = sorted(counts.items(), key=lambda kv: (kv[1], kv[0]))[:10]
        assert [(d["class"], d["count"]) for d in got["most_frequent"]] == most
        assert [(d["class"], d["count"]) for d in got["least_frequent"]] == least
        assert got["missing_vs_train"] == sorted(set(train_counts) - set(counts))
        assert got["missing_vs_tree"] == sorted(leaves - set(counts))
        assert got["unknown_to_tree"] == sorted(set(counts) - leaves)
    assert per_split["train"]["unknown_to_tree"] == [5000]
    assert per_split["val"]["missing_vs_train"], "val draws from fewer classes, so some must be missing"
    all_usable = set().union(*(_class_counts(dataset["clean"][s]) for s in ("train", "val")))
    assert clean_result["classes"]["num_classes"] == len(all_usable)


def test_hierarchy_counts(dataset: dict, clean_result: dict) -> None:
    tree = json.loads(PACKAGED_TREE.read_text())
    h = clean_result["hierarchy"]
    assert h["leaves"] == 2019
    assert len(h["level1"]) == len(tree)
    assert len(h["level2"]) == sum(len(v) for v in tree.values())
    for split in ("train", "val"):
        counts = _class_counts(dataset["clean"][split])
        for l1, sub in tree.items():
            leaves1 = [int(c) for l3 in sub.values() for ls in l3.values() for c in ls]
            assert h["level1"][l1]["counts"][split] == sum(counts.get(c, 0) for c in leaves1)
            assert h["level1"][l1]["leaves"] == len(leaves1)
            for l2, sub2 in sub.items():
                leaves2 = [int(c) for ls in sub2.values() for c in ls]
                node = h["level2"][f"{l1}/{l2}"]
                assert node["counts"][split] == sum(counts.get(c, 0) for c in leaves2)
                assert node["classes_present"][split] == sum(counts.get(c, 0) > 0 for c in leaves2)
    # Every image of a known class lands under exactly one level-1 node.
    known = sum(n for c, n in _class_counts(dataset["clean"]["train"]).items() if c != 5000)
    assert sum(node["counts"]["train"] for node in h["level1"].values()) == known


# --- per host ------------------------------------------------------------------------------------


def test_hosts_worst_first(dataset: dict, clean_result: dict) -> None:
    records: Counter = Counter()
    failed: Counter = Counter()
    by_status: dict[str, Counter] = defaultdict(Counter)
    for rows in dataset["raw"].values():
        for r in rows:
            h = _host(r["url"])
            records[h] += 1
            if r["status"] != "ok":
                failed[h] += 1
                by_status[h][r["status"]] += 1
    expected = sorted((h for h in records if failed[h]),
                      key=lambda h: (-failed[h] / records[h], -failed[h], h))
    got = clean_result["hosts"]
    assert got["hosts"] == len(records)
    assert got["hosts_with_failures"] == len(expected)
    assert [t["host"] for t in got["top"]] == expected[:20]
    assert "2001:db8::7" in records and "b.example.org" in records and stats.NO_HOST in records
    for t in got["top"]:
        assert t["records"] == records[t["host"]] and t["failed"] == failed[t["host"]]
        assert t["failure_rate"] == pytest.approx(failed[t["host"]] / records[t["host"]], abs=1e-4)
        assert t["failures"] == dict(by_status[t["host"]])


def test_hosts_from_clean_and_dropped_without_raw(dataset: dict, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "clean").mkdir(parents=True)
    for item in (dataset["root"] / "clean").iterdir():
        target = root / "clean" / item.name
        if item.is_dir():
            target.mkdir()
            for shard in item.iterdir():
                (target / shard.name).write_bytes(shard.read_bytes())
        else:
            target.write_bytes(item.read_bytes())
    data = stats.compute_stats(root).data
    assert data["stage"] == "clean" and data["fetch_source"] == "clean"
    failed: Counter = Counter()
    for d in dataset["dropped"]:
        failed[_host(d["url"])] += d["reason"] == "fetch_failed"
    for r in dataset["clean"]["test"]:
        failed[_host(r["url"])] += r["status"] != "ok"
    assert {t["host"]: t["failed"] for t in data["hosts"]["top"]} == {h: n for h, n in failed.items() if n}
    train = data["splits"]["train"]
    assert train["failures"] == {"fetch_failed": sum(d["split"] == "train" and d["reason"] == "fetch_failed"
                                                     for d in dataset["dropped"])}
    # Without dropped.parquet nothing is known to be dropped: records are the kept rows.
    (root / "clean" / "dropped.parquet").unlink()
    train = stats.compute_stats(root).data["splits"]["train"]
    assert train["drops"] == {} and train["dropped"] == 0 and train["records"] == train["rows"]


# --- files ---------------------------------------------------------------------------------------


def test_class_counts_csv(dataset: dict, clean_result: dict) -> None:
    path = dataset["root"] / "stats" / "class_counts.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["class", "level1", "level2", "level3", "train", "val"]
    for split in ("train", "val"):
        assert sum(int(r[split]) for r in rows) == clean_result["splits"][split]["ok"]
        counts = _class_counts(dataset["clean"][split])
        assert {int(r["class"]): int(r[split]) for r in rows if int(r[split])} == dict(counts)
    tree = json.loads(PACKAGED_TREE.read_text())
    by_class = {int(r["class"]): r for r in rows}
    assert set(_tree_leaves()) <= set(by_class)  # every tree leaf has a row, images or not
    for l1, sub in tree.items():
        for l2, sub2 in sub.items():
            for l3, leaves in sub2.items():
                for c in leaves[:3]:
                    r = by_class[int(c)]
                    assert (r["level1"], r["level2"], r["level3"]) == (l1, l2, l3)
    assert (by_class[5000]["level1"], by_class[5000]["level2"], by_class[5000]["level3"]) == ("", "", "")


def test_pngs_open_with_the_expected_size(dataset: dict, clean_result: dict) -> None:
    for name in ("class_counts.png", "image_sizes.png", "host_failures.png"):
        with Image.open(dataset["root"] / "stats" / name) as im:
            im.load()
            assert im.format == "PNG"
            assert im.size == plots.FIGURE_PX
            # Not a blank canvas: a plot has many colours.
            assert len(im.convert("RGB").getcolors(1 << 20) or []) > 20
    assert clean_result["files"] == ["stats/stats.json", "stats/class_counts.csv", "stats/class_counts.png",
                                     "stats/image_sizes.png", "stats/host_failures.png"]
    leftovers = [p.name for p in (dataset["root"] / "stats").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_stats_json_on_disk_matches_the_returned_dict(dataset: dict, clean_result: dict) -> None:
    on_disk = json.loads((dataset["root"] / "stats" / "stats.json").read_text())
    assert on_disk == json.loads(json.dumps(clean_result))


# --- stage selection and errors ----------------------------------------------------------------


def test_stage_auto_detection(dataset: dict, tmp_path: Path) -> None:
    raw_only = tmp_path / "raw_only"
    with ShardWriter(raw_only / "raw" / "train") as w:
        w.write_rows(dataset["raw"]["train"][:50])
    assert stats.resolve_stage(raw_only, None) == "raw"
    assert stats.resolve_stage(dataset["root"], None) == "clean"
    assert stats.resolve_stage(dataset["root"], "raw") == "raw"
    (raw_only / "clean").mkdir()  # an empty clean/ (clean not run yet) does not win
    assert stats.resolve_stage(raw_only, None) == "raw"
    with pytest.raises(UserError, match="imatdata clean"):
        stats.resolve_stage(raw_only, "clean")
    with pytest.raises(UserError, match="raw or clean"):
        stats.resolve_stage(raw_only, "cooked")


def test_empty_split_and_raw_without_labels(tmp_path: Path) -> None:
    # A test-only root with nothing usable still gives figures, tables and plots.
    root = tmp_path / "r"
    rows = [manifest_row(str(i), "test", None, status="timeout", url=f"https://h{i % 2}.example/x",
                         attempts=3) for i in range(6)]
    with ShardWriter(root / "raw" / "test") as w:
        w.write_rows(rows)
    data = stats.write_stats(root, quiet=False)
    assert data["splits"]["test"]["ok"] == 0 and data["splits"]["test"]["sizes"]["width"] is None
    assert data["classes"]["per_split"] == {}
    assert data["hosts"]["top"][0]["failure_rate"] == 1.0
    with Image.open(root / "stats" / "class_counts.png") as im:
        assert im.size == plots.FIGURE_PX


def test_cli_json_and_tables(dataset: dict) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["stats", "--root", str(dataset["root"]), "--json", "--tree", "packaged",
                              "--min-count", str(MIN_COUNT)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    documented = {"version", "generated_at", "root", "stage", "min_count", "fetch_source", "totals", "splits",
                  "classes", "hierarchy", "hosts", "files"}
    assert set(data) == documented
    for key in documented:
        assert f"``{key}``" in stats.__doc__  # every key is documented in the module docstring
    assert data["hierarchy"]["tree"] == "packaged"
    assert set(data["splits"]["train"]) == {"records", "rows", "ok", "labelled", "unlabelled_ok",
                                            "statuses", "failed", "failures", "drops", "dropped", "bytes",
                                            "sizes"}
    res = runner.invoke(app, ["stats", "--root", str(dataset["root"]), "--stage", "raw"])
    assert res.exit_code == 0, res.output
    assert "Splits (raw stage" in res.stdout and "Hosts by failure rate" in res.stdout


def test_cli_empty_root_is_one_line_exit_2(tmp_path: Path) -> None:
    # A real subprocess, so what the user sees on stderr is exactly what is checked.
    env = {**os.environ, "IMAT_ROOT": str(tmp_path / "nothing")}
    proc = subprocess.run([sys.executable, "-m", "imatdata", "stats"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no manifest shards" in lines[0] and "Traceback" not in proc.stderr


def test_cli_bad_tree_is_a_user_error(dataset: dict, tmp_path: Path) -> None:
    bad = tmp_path / "tree.json"
    bad.write_text("{not json")
    res = CliRunner().invoke(app, ["stats", "--root", str(dataset["root"]), "--tree", str(bad)])
    assert res.exit_code == 2
    assert "not valid JSON" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_schema_mismatch_is_a_user_error(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "raw" / "train").mkdir(parents=True)
    write_table_atomic(pa.table({"id": ["a"], "something": [1]}), root / "raw" / "train" / "part-00000.parquet")
    with pytest.raises(UserError, match="cannot read"):
        stats.compute_stats(root)
