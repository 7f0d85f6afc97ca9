"""`imattrain audit` (out-of-fold label audit) and `imatdata clean --drop-ids` (its feedback).

The end-to-end audit trains on synthetic colour-coded classes (trivially learnable, so the
flips planted in their labels are what the models disagree with); the benchmark on real
photos is bench/audit.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from imatsample.shards import jpeg, manifest_row, write_shards
from PIL import Image
from typer.testing import CliRunner

from imatdata.cli import app as data_app
from imatdata.clean import label_noise
from imatdata.errors import UserError
from imatdata.manifest import RAW_SCHEMA, read_table
from imatdata.tree import ProductTree
from imattrain.audit import (
    SUSPECT_COLUMNS,
    _whole_counts,
    assign_folds,
    confident_joint,
    rank_suspects,
    read_oof,
    tree_distance,
)
from imattrain.cli import app as train_app

runner = CliRunner()
torch.set_num_threads(1)

COLOURS = ((220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 210, 30))


def colour_image(label: int, rng: random.Random, size: int = 16) -> Image.Image:
    """A class's colour with per-image brightness jitter and pixel noise."""
    base = np.array(COLOURS[label], dtype=np.float64) * rng.uniform(0.8, 1.1)
    g = np.random.default_rng(rng.randrange(1 << 30))
    pixels = np.clip(base + g.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def colour_rows(split: str, per_class: int, *, seed: int, flip_rate: float = 0.0,
                size: int = 16) -> tuple[list[dict], set[str]]:
    """Rows of 4 colour classes; `flip_rate` of them get another class's label."""
    rng = random.Random(f"{seed}-{split}")
    rows, flipped = [], set()
    for k in range(per_class):
        for label in range(len(COLOURS)):
            row_id = f"{split}-{label}-{k:03d}"
            given = label
            if rng.random() < flip_rate:
                given = (label + rng.randrange(1, len(COLOURS))) % len(COLOURS)
                flipped.add(row_id)
            rows.append(manifest_row(row_id, split, given, jpeg(colour_image(label, rng, size)),
                                     size=(size, size)))
    rng.shuffle(rows)
    return rows, flipped


# --- ranking: pure numpy ----------------------------------------------------------------------


def _planted_probs(n: int = 400, c: int = 4, flips: int = 40, seed: int = 0):
    """Confident, mostly right probabilities of the true classes, and labels with `flips`
    rows changed."""
    g = np.random.default_rng(seed)
    truth = g.integers(0, c, n)
    logits = g.normal(0, 1, (n, c))
    logits[np.arange(n), truth] += 4
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = truth.copy()
    flipped = g.choice(n, flips, replace=False)
    labels[flipped] = (truth[flipped] + g.integers(1, c, flips)) % c
    return probs, labels, truth, set(flipped.tolist())


@pytest.mark.parametrize("method", ["margin", "cl", "self-confidence"])
def test_rankings_find_planted_flips_and_spare_clean_labels(method: str) -> None:
    probs, labels, truth, flipped = _planted_probs()
    r = rank_suspects(probs, labels, method)
    found = set(np.flatnonzero(r.flagged).tolist())
    assert len(found & flipped) >= 0.9 * len(flipped)  # recall
    assert len(found & flipped) >= 0.8 * len(found)  # precision
    top = np.argsort(-r.score, kind="stable")[:len(flipped)]
    assert len(set(top.tolist()) & flipped) >= 0.85 * len(flipped)  # chance: 10%
    # The suggested class of a planted flip is its true class.
    hits = sorted(found & flipped)
    assert (r.suggested[hits] == truth[hits]).mean() >= 0.9
    # Clean labels: few suspects.
    clean = rank_suspects(probs, truth, method)
    assert clean.flagged.sum() <= 0.03 * len(truth)


def test_confident_joint_counts_and_thresholds() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.85, 0.15]])
    labels = np.array([0, 0, 1, 1, 1])  # the last row looks like class 0
    joint, thresholds = confident_joint(probs, labels)
    assert thresholds == pytest.approx([0.85, (0.7 + 0.8 + 0.15) / 3])
    # Row 1 (p0 0.8 < 0.85, p1 0.2 < 0.55) counts nowhere; row 4 counts at (1, 0).
    assert joint.tolist() == [[1, 0], [1, 2]]
    cl = rank_suspects(probs, labels, "cl")
    assert np.flatnonzero(cl.flagged).tolist() == [4] and cl.suggested[4] == 0


def test_calibrated_counts_keep_each_class_total() -> None:
    # Rounded one by one, [2.5, 0.5, 0.5, 0.5] makes 2, not 4: cleanlab keeps the row totals.
    assert _whole_counts(np.array([2.5, 0.5, 0.5, 0.5]), 4).tolist() == [3, 1, 0, 0]
    rng = np.random.default_rng(0)
    for _ in range(200):
        total = int(rng.integers(1, 1000))
        shares = rng.dirichlet(np.ones(int(rng.integers(2, 12)))) * total
        whole = _whole_counts(shares, total)
        assert whole.sum() == total
        assert np.all((whole == np.floor(shares)) | (whole == np.ceil(shares)))


def test_folds_are_stratified_seeded_and_skip_unusable_rows() -> None:
    labels = np.repeat(np.arange(3), [10, 7, 5])
    usable = np.ones(len(labels), bool)
    usable[[0, 12]] = False
    folds = assign_folds(labels, usable, 3, seed=1)
    assert (folds[~usable] == -1).all() and (folds[usable] >= 0).all()
    sizes = np.bincount(folds[usable], minlength=3)
    assert sizes.max() - sizes.min() <= 1
    for c in range(3):
        per = np.bincount(folds[usable & (labels == c)], minlength=3)
        assert per.max() - per.min() <= 1  # stratified
    assert (assign_folds(labels, usable, 3, seed=1) == folds).all()
    assert not (assign_folds(labels, usable, 3, seed=2) == folds).all()


def test_tree_distance_counts_levels_to_the_shared_node() -> None:
    tree = ProductTree.from_mapping({"a": {"b": {"c": ["1", "2"], "d": ["3"]}, "e": {"f": ["4"]}},
                                     "g": {"h": {"i": ["5"]}}})
    assert tree_distance(tree, 1, 1) == 0
    assert tree_distance(tree, 1, 2) == 1
    assert tree_distance(tree, 1, 3) == 2
    assert tree_distance(tree, 1, 4) == 3
    assert tree_distance(tree, 1, 5) == 4
    assert tree_distance(tree, 1, 99) is None


# --- the audit command, end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    root = tmp_path_factory.mktemp("audit")
    train, flipped = colour_rows("train", 24, seed=0, flip_rate=0.12)
    write_shards(root / "clean" / "train", train, row_group_rows=16, shard_rows=64)
    write_shards(root / "clean" / "val", colour_rows("val", 5, seed=0)[0], row_group_rows=16)
    return root, flipped


def audit(*args: str) -> tuple[int, str]:
    result = runner.invoke(train_app, ["audit", "--quiet", "--model", "resnet18", "--image-size",
                                       "16", "--batch-size", "8", "--threads", "1", "--workers",
                                       "0", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def audited(noisy: tuple[Path, set[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, _ = noisy
    out = tmp_path_factory.mktemp("runs") / "audit"
    # 6 epochs: at 4 the ranking hung on the CPU's float paths (12 of 12 flips on top on one
    # machine, 7 on another); at 6 all 12 head it there.
    code, text = audit("--data", str(root / "clean"), "--out", str(out), "--folds", "2",
                       "--epochs", "6", "--optimizer", "adamw", "--lr", "0.002",
                       "--weight-decay", "0.01")
    assert code == 0, text
    return out


def test_audit_finds_planted_flips(audited: Path, noisy: tuple[Path, set[str]]) -> None:
    _, flipped = noisy
    table = pq.read_table(audited / "suspects.parquet")
    assert tuple(table.column_names) == SUSPECT_COLUMNS  # no --tree: no tree_distance
    assert table.schema.metadata[b"method"] == b"cl"
    s = table.to_pydict()
    assert s["rank"] == list(range(1, len(s["id"]) + 1))
    assert s["score"] == sorted(s["score"], reverse=True)
    assert all(g != c for g, c in zip(s["given"], s["suggested"]))
    assert set(s["fold"]) <= {0, 1}
    found = set(s["id"]) & flipped
    n = 96
    assert len(flipped) >= 6
    assert len(found) >= 0.7 * len(flipped)  # recall
    top = set(s["id"][:len(flipped)])
    # Chance precision is len(flipped) / 96 (~12%).
    assert len(top & flipped) >= 0.6 * len(flipped)
    assert len(s["id"]) <= 3 * len(flipped)  # few false alarms

    oof = read_oof(audited / "oof_probs.parquet")
    assert len(oof.ids) == n and oof.probs.shape == (n, 4)
    # Against the true labels (the colour in each id) the same probabilities leave few suspects.
    truth = np.array([int(i.split("-")[1]) for i in oof.ids])
    assert (truth != oof.labels).sum() == len(flipped)
    assert rank_suspects(oof.probs, truth, "cl").flagged.sum() <= 0.03 * n
    assert np.allclose(oof.probs.sum(1), 1, atol=1e-4)
    assert sorted(np.bincount(oof.folds).tolist()) == [48, 48]
    report = json.loads((audited / "audit.json").read_text())
    assert report["audited"] == n and report["flagged"] == len(s["id"])
    assert (audited / "suspects.png").read_bytes()[:4] == b"\x89PNG"
    for k in (0, 1):
        assert (audited / f"fold-{k}" / "checkpoints" / "last.pt").is_file()
    # Every fold's model never saw its own rows: each fold file holds only its fold.
    fold0 = read_oof(audited / "fold-0" / "fold_probs.parquet")
    assert set(fold0.folds.tolist()) == {0} and len(fold0.ids) == 48


def test_audit_refuses_to_overwrite_and_probs_skips_training(
        audited: Path, noisy: tuple[Path, set[str]], tmp_path: Path) -> None:
    root, flipped = noisy
    code, text = audit("--data", str(root / "clean"), "--out", str(audited), "--folds", "2")
    assert code == 2 and "--force" in text and "Traceback" not in text
    # --resume finishes an audit: folds already predicted are not trained again.
    ckpt = audited / "fold-0" / "checkpoints" / "last.pt"
    stamp = ckpt.stat().st_mtime_ns
    before = pq.read_table(audited / "suspects.parquet")
    code, text = audit("--data", str(root / "clean"), "--out", str(audited), "--folds", "2",
                       "--resume", "--sheet", "0")
    assert code == 0, text
    assert ckpt.stat().st_mtime_ns == stamp
    assert pq.read_table(audited / "suspects.parquet").equals(before)

    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps({"l1a": {"l2a": {"l3a": ["0", "1"], "l3b": ["2"]}},
                                "l1b": {"l2b": {"l3c": ["3"]}}}))
    out = tmp_path / "again"
    code, text = audit("--data", str(root / "clean"), "--out", str(out), "--probs",
                       str(audited / "oof_probs.parquet"), "--method", "margin", "--tree", str(tree))
    assert code == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["audit.json", "suspects.parquet", "suspects.png"]
    s = pq.read_table(out / "suspects.parquet").to_pydict()
    assert list(s) == [*SUSPECT_COLUMNS, "tree_distance"]
    expected = {(0, 1): 1, (1, 0): 1, (0, 2): 2, (2, 0): 2, (1, 2): 2, (2, 1): 2}
    assert [expected.get((g, c), 4) for g, c in zip(s["given"], s["suggested"])] == s["tree_distance"]
    assert len(set(s["id"]) & flipped) >= 0.7 * len(flipped)

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a"], "probs": [[0.5, 0.5]]}), bad)
    code, text = audit("--probs", str(bad), "--out", str(tmp_path / "x"))
    assert code == 2 and "label" in text and "Traceback" not in text
    assert not (tmp_path / "x" / "suspects.parquet").exists()


# --- imattrain run --relabel ------------------------------------------------------------------


def test_relabel_trains_the_suspects_on_their_suggested_class(
        audited: Path, noisy: tuple[Path, set[str]], tmp_path: Path) -> None:
    from imattrain import distributed as D
    from imattrain.config import TrainConfig
    from imattrain.setup import Session

    root, flipped = noisy
    suspects = audited / "suspects.parquet"
    s = pq.read_table(suspects).to_pydict()
    suggested = dict(zip(s["id"], s["suggested"]))
    given = dict(zip(*read_table(root / "clean" / "train", columns=["id", "label"])
                     .to_pydict().values()))
    notes: list[str] = []
    cfg = TrainConfig(data=str(root / "clean"), model="resnet18", image_size=16, batch_size=8,
                      workers=0, relabel=str(suspects), quiet=True)
    session = Session.from_config(cfg, D.World(), torch.device("cpu"), notes.append)
    assert any(f"relabel ({suspects}): {len(suggested)} train rows take the suggested class"
               in n for n in notes), notes
    loader = session.train_loader()
    loader.dataset.set_epoch(0)
    seen: dict[str, int] = {}
    for batch in loader:
        seen.update(zip(batch["id"], batch["label"].tolist()))
    assert set(seen) == set(given)
    # What the model is fed: the suggested class where the file names the row, else its own.
    assert seen == {i: suggested.get(i, y) for i, y in given.items()}
    # The flips the audit found get their true class (the colour in the id) back.
    back = [i for i in flipped if i in suggested]
    assert len(back) >= 0.7 * len(flipped)
    assert sum(seen[i] == int(i.split("-")[1]) for i in back) >= 0.9 * len(back)
    assert session.class_counts.sum() == len(given)
    # --relabel-min-score keeps only the top of the file.
    from imattrain.audit import relabel_index
    from imattrain.data import scan_split

    index = scan_split(root / "clean", "train")
    top = s["score"][len(s["score"]) // 2]
    fewer = relabel_index(index, suspects, top)
    assert (relabel_index(index, suspects, 2.0).labels == index.labels).all()  # none left
    changed = int((fewer.labels != index.labels).sum())
    assert 0 < changed == sum(1 for v in s["score"] if v >= top) < len(suggested)


@pytest.mark.parametrize("case", ["missing", "no_suggested", "text_suggested", "null_suggested",
                                  "negative", "min_score_alone"])
def test_relabel_bad_input_is_one_line(noisy: tuple[Path, set[str]], tmp_path: Path,
                                       case: str) -> None:
    root, _ = noisy
    path = tmp_path / "s.parquet"
    args = ["--relabel", str(path)]
    if case == "no_suggested":
        pq.write_table(pa.table({"id": ["train-0-000"], "score": [0.9]}), path)
    elif case == "text_suggested":
        pq.write_table(pa.table({"id": ["train-0-000"], "suggested": ["coat"]}), path)
    elif case == "null_suggested":
        pq.write_table(pa.table({"id": ["train-0-000", "train-0-001"],
                                 "suggested": pa.array([1, None], pa.int64())}), path)
    elif case == "negative":
        pq.write_table(pa.table({"id": ["train-0-000"], "suggested": [-1]}), path)
    elif case == "min_score_alone":
        args = ["--relabel-min-score", "0.5"]
    out = tmp_path / "run"
    result = runner.invoke(train_app, ["run", "--quiet", "--data", str(root / "clean"), "--out",
                                       str(out), "--model", "resnet18", "--image-size", "16",
                                       "--epochs", "1", "--workers", "0", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "--relabel" in lines[0]
    assert not (out / "checkpoints").exists()


# --- imatdata clean --drop-ids ----------------------------------------------------------------


def _picture(seed: int) -> bytes:
    g = np.random.default_rng(seed)
    cells = (g.random((6, 6, 3)) * 255).astype(np.uint8)
    return jpeg(Image.fromarray(cells, "RGB").resize((80, 80), Image.Resampling.BICUBIC))


@pytest.fixture
def raw_root(tmp_path: Path) -> Path:
    rows = []
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        for k in range(n):
            seed = {"train": 0, "val": 100, "test": 200}[split] + k
            rows.append(manifest_row(f"{split}-{k}", split, k % 3, _picture(seed), size=(80, 80)))
    for split in ("train", "val", "test"):
        write_shards(tmp_path / "raw" / split, [r for r in rows if r["split"] == split],
                     schema=RAW_SCHEMA, row_group_rows=5)
    return tmp_path


def clean(root: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(data_app, ["clean", "--root", str(root), "--dedup", "off", "--workers",
                                      "1", "--quiet", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _suspects(path: Path, ids: list[str], scores: list[float]) -> Path:
    pq.write_table(pa.table({"rank": list(range(1, len(ids) + 1)), "id": ids,
                             "given": [0] * len(ids), "suggested": [2] * len(ids),
                             "score": scores, "fold": [0] * len(ids)}), path)
    return path


def test_drop_ids_drops_train_suspects_and_keeps_the_invariant(raw_root: Path) -> None:
    suspects = _suspects(raw_root / "suspects.parquet",
                         ["train-1", "train-5", "train-7", "val-0", "test-2", "nobody"],
                         [0.9, 0.6, 0.1, 0.95, 0.99, 0.8])
    code, text = clean(raw_root, "--drop-ids", str(suspects), "--min-score", "0.5")
    assert code == 0, text
    dropped = pq.read_table(raw_root / "clean" / "dropped.parquet").to_pydict()
    noise = {i: d for i, r, d in zip(dropped["id"], dropped["reason"], dropped["detail"])
             if r == "label_noise"}
    # train-7 is under --min-score; val, test and unknown ids are never dropped.
    assert sorted(noise) == ["train-1", "train-5"]
    assert noise["train-1"] == "score=0.9000 suggested=2"
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        kept = read_table(raw_root / "clean" / split).num_rows
        assert kept + dropped["split"].count(split) == n  # the invariant
    assert read_table(raw_root / "clean" / "test").num_rows == 4
    flags = pq.read_table(raw_root / "clean" / "flags.parquet")
    assert "label_noise" not in flags.column("reason").to_pylist()
    stats = json.loads(next((raw_root / "stats").glob("*.json")).read_text())
    assert "label_noise" in json.dumps(stats)

    # The report says what happened to every id named.
    loaded = label_noise.read_suspects(suspects, 0.5)
    assert loaded.in_file == 6 and len(loaded.ids) == 5
    assert "label_noise" in label_noise.REASON


def test_drop_ids_report_line_in_the_table(raw_root: Path) -> None:
    suspects = _suspects(raw_root / "s.parquet", ["train-2", "test-0", "gone"], [0.5, 0.5, 0.5])
    result = runner.invoke(data_app, ["clean", "--root", str(raw_root), "--dedup", "off",
                                      "--workers", "1", "--drop-ids", str(suspects)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "dropped: label_noise" in text
    assert "1 train rows dropped of 3 ids named; 2 not in train (ignored)" in text


@pytest.mark.parametrize("case", ["missing", "not_parquet", "no_id", "int_id", "null_id",
                                  "text_score", "min_score_without_score", "min_score_alone"])
def test_malformed_suspects_file_is_one_line_and_changes_nothing(raw_root: Path, case: str) -> None:
    code, text = clean(raw_root)  # a first clean: it must survive the failed one untouched
    assert code == 0, text
    before = {p: p.read_bytes() for p in sorted((raw_root / "clean").rglob("*")) if p.is_file()}
    path = raw_root / "bad.parquet"
    args = ["--drop-ids", str(path)]
    if case == "not_parquet":
        path.write_text("id,score\ntrain-1,0.9\n")
    elif case == "no_id":
        pq.write_table(pa.table({"name": ["train-1"], "score": [0.9]}), path)
    elif case == "int_id":
        pq.write_table(pa.table({"id": [1, 2]}), path)
    elif case == "null_id":
        pq.write_table(pa.table({"id": pa.array(["train-1", None], pa.string())}), path)
    elif case == "text_score":
        pq.write_table(pa.table({"id": ["train-1"], "score": ["high"]}), path)
    elif case == "min_score_without_score":
        pq.write_table(pa.table({"id": ["train-1"]}), path)
        args += ["--min-score", "0.5"]
    elif case == "min_score_alone":
        args = ["--min-score", "0.5"]
    code, text = clean(raw_root, *args)
    assert code == 2, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    assert ("--drop-ids" in lines[0]) or ("--min-score" in lines[0])
    after = {p: p.read_bytes() for p in sorted((raw_root / "clean").rglob("*")) if p.is_file()}
    assert after == before


def test_read_suspects_errors_are_user_errors(tmp_path: Path) -> None:
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": ["a", "a", "b"], "score": [0.9, 0.2, 0.4]}), path)
    s = label_noise.read_suspects(path)
    assert s.ids.to_pylist() == ["a", "b"] and s.details["a"] == "score=0.9000"
    with pytest.raises(UserError, match="no such file"):
        label_noise.read_suspects(tmp_path / "none.parquet")


# --- bench/audit.py's own arithmetic ----------------------------------------------------------


def _bench_module():
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "bench" / "audit.py"
    spec = importlib.util.spec_from_file_location("bench_audit", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_audit"] = bench
    spec.loader.exec_module(bench)
    return bench


def test_bench_recovery_uses_the_mean_over_seeds_and_subset_round_trips(tmp_path: Path) -> None:
    import gzip

    bench = _bench_module()
    runs = lambda *tops: {str(k): {"test_top1": t} for k, t in enumerate(tops)}  # noqa: E731
    done = {"clean": {"info": {}, "runs": runs(0.82, 0.84)},
            "noisy": {"info": {}, "runs": runs(0.79, 0.77)},
            "drop@0.95": {"info": {"changed": 5, "precision": 0.8, "recall": 0.4},
                          "runs": runs(0.81, 0.80)}}
    out = bench.summarise(done)
    assert out["clean"]["mean"] == pytest.approx(0.83) and "recovered" not in out["noisy"]
    assert out["drop@0.95"]["recovered"] == pytest.approx((0.805 - 0.78) / (0.83 - 0.78))
    assert bench._variant("relabel@0.9") == ("relabel", 0.9)
    assert bench._variant("oracle") == ("oracle", None)
    with pytest.raises(SystemExit):
        bench._variant("oracle@0.5")
    # Every training gets the same flags, --train-args split as a shell would.
    import argparse

    ns = argparse.Namespace(model="resnet18", image_size=32, epochs=3, batch_size=8, lr=0.05,
                            train_args="--augment none --label-smoothing 0", workers=None)
    flags = bench.train_flags(ns, seed=2)
    assert flags[-6:] == ["--lr", "0.05", "--augment", "none", "--label-smoothing", "0"]
    assert flags[flags.index("--seed") + 1] == "2" and "--workers" not in flags

    # A Fashion-MNIST-shaped source (idx files), and the subset prepare reads back.
    g = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for prefix, n in (("train", 60), ("t10k", 30)):
        images = g.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        with gzip.open(src / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write((2051).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28))
                    + images.tobytes())
        with gzip.open(src / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes())
    bench.write_subset(src, tmp_path / "sub", train=40, test=20)
    x, y, tx, ty = bench.recipes.load_fashion_mnist(tmp_path / "sub")
    assert x.shape == (40, 28, 28) and tx.shape == (20, 28, 28)
    assert np.bincount(y).tolist() == [4] * 10 and np.bincount(ty).tolist() == [2] * 10
    full, full_y, _, _ = bench.recipes.load_fashion_mnist(src)
    # Every image kept is one of the source's, with its own label.
    lookup = {full[i].tobytes(): int(full_y[i]) for i in range(len(full))}
    assert all(lookup[x[i].tobytes()] == y[i] for i in range(len(x)))
