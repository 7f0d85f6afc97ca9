"""eval / predict / lr-find end to end: a real tiny run (hierarchy heads, SGDR snapshots) on
generated shards, then the commands as a user types them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from imatdata.manifest import read_table
from imattrain.cli import app
from imattrain.predict import read_probs
from tricks_shards import single_thread_torch, write_dataset

COUNTS = [24, 12, 6, 4]
_one_thread = pytest.fixture(autouse=True)(single_thread_torch)
runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    from imattrain.config import TrainConfig
    from imattrain.engine import train

    base = tmp_path_factory.mktemp("tricks_cli")
    data = write_dataset(base / "clean", COUNTS, size=32, test_rows=14, test_missing=4)
    tree = base / "tree.json"
    tree.write_text(json.dumps({"a": {"a1": {"x": ["0", "1"]}, "a2": {"y": ["2"]}}, "b": {"b1": {"z": ["3"]}}}))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(data=str(data), out=str(base / "run"), model="mobilenet_v3_small", image_size=32,
                          epochs=2, batch_size=16, workers=0, lr=0.05, schedule="sgdr", sgdr_t0=1.0,
                          sgdr_tmult=1.0, device="cpu", quiet=True, tree=str(tree)).validate()
        train(cfg)
    finally:
        torch.set_num_threads(before)
    return {"data": data, "run": base / "run", "ckpt": base / "run" / "checkpoints" / "last.pt", "base": base}


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_predict_answers_every_test_id_in_shard_order(run, tmp_path):
    out, probs = tmp_path / "submission.csv", tmp_path / "probs.parquet"
    r = invoke("predict", "--checkpoint", run["ckpt"], "--data", run["data"], "--out", out,
               "--probs", probs, "--workers", "0")
    assert r.exit_code == 0, r.output
    test = read_table(run["data"] / "test", columns=["id", "status"]).to_pylist()
    lines = out.read_text().split("\n")
    assert lines[0] == "id,predicted" and lines[-1] == ""
    rows = [line.split(",") for line in lines[1:-1]]
    assert [r_[0] for r_ in rows] == [t["id"] for t in test]  # every id, shard order
    for row_id, predicted in rows:
        labels = predicted.split(" ")
        assert len(labels) == 3 and len(set(labels)) == 3
        assert all(label.isdigit() and int(label) < len(COUNTS) for label in labels)
    missing = [i for i, t in enumerate(test) if t["status"] != "ok"]
    assert len(missing) == 4
    assert all(rows[i][1] == "0 1 2" for i in missing)  # the prior's top 3 (counts 24, 12, 6, 4)
    ids, p = read_probs(probs)
    assert ids == [t["id"] for t in test] and p.dtype == np.float32 and p.shape == (14, 4)
    assert pq.read_schema(probs).field("probs").type.list_size == 4
    np.testing.assert_allclose(p[missing[0]], np.array(COUNTS) / sum(COUNTS), rtol=1e-6)
    seen = [i for i in range(14) if i not in missing]
    np.testing.assert_allclose(p[seen].sum(1), 1.0, rtol=1e-5)
    # Top 3 in the file are the top 3 of the probabilities, best first.
    for i in seen:
        assert rows[i][1] == " ".join(str(c) for c in np.argsort(-p[i], kind="stable")[:3])


def test_a_run_folder_means_its_chosen_checkpoint_and_each_command_says_which(run, tmp_path):
    best = run["run"] / "checkpoints" / "best.pt"
    r = invoke("predict", "-c", run["run"], "--data", run["data"], "--out", tmp_path / "s.csv",
               "--workers", "0", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["checkpoints"] == [str(best)]
    (note,) = summary["notes"]
    assert note in r.output  # also said on stderr, one line
    assert str(best) in note and "the run's choice" in note and "epoch 2/2" in note
    assert "val top-3 error" in note  # why: the selection rule's reason
    r = invoke("eval", "-c", run["ckpt"], "--data", run["data"], "--json", "--workers", "0")
    assert r.exit_code == 0, r.output
    (note,) = json.loads(r.stdout)["checkpoint_notes"]
    assert note.startswith(f"checkpoint {run['ckpt']} (as given): epoch 2/2") and note in r.output
    r = invoke("eval", "-c", tmp_path, "--data", run["data"])
    assert r.exit_code == 2 and "without checkpoints/best.pt or last.pt" in r.output


def test_ensemble_of_identical_checkpoints_equals_the_single_model(run, tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    r1 = invoke("predict", "-c", run["ckpt"], "--data", run["data"], "--out", a, "--probs", tmp_path / "a.pq",
                "--workers", "0")
    # Two loader workers interleave batches; the file must still follow the shard order.
    r2 = invoke("predict", "-c", run["ckpt"], run["ckpt"], "--data", run["data"], "--out", b,
                "--probs", tmp_path / "b.pq", "--workers", "2", "--batch-size", "4")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert a.read_bytes() == b.read_bytes()
    np.testing.assert_allclose(read_probs(tmp_path / "a.pq")[1], read_probs(tmp_path / "b.pq")[1], atol=1e-6)


def test_eval_reports_and_tunes_tau(run, tmp_path):
    out = tmp_path / "eval.json"
    r = invoke("eval", "--checkpoint", run["ckpt"], "--data", run["data"], "--tune-tau", "--tta", "flip",
               "--out", out, "--workers", "0")
    assert r.exit_code == 0, r.output
    assert "chosen tau" in r.output and "worst" in r.output
    report = json.loads(out.read_text())
    assert report["n"] == 16 and report["tta"] == "flip"
    grid = {row["tau"]: row for row in report["tau_search"]}
    assert grid[report["tau"]]["top3_error"] <= grid[0.0]["top3_error"]
    assert report["top3_error"] == pytest.approx(grid[report["tau"]]["top3_error"])
    assert len(report["per_class"]) == 4 and len(report["worst_classes"]) == 4
    assert 0 <= report["balanced_accuracy"] <= 1
    # tau given explicitly: both the adjusted and the plain figures are reported.
    r = invoke("eval", "-c", run["ckpt"], "--data", run["data"], "--tau", "1.0", "--json", "--workers", "0")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["tau"] == 1.0 and "without_tau" in payload


def test_eval_snapshots_ensemble(run):
    snaps = sorted((run["run"] / "checkpoints").glob("snapshot-cycle*.pt"))
    assert len(snaps) == 2
    r = invoke("eval", "--snapshots", run["run"], "--data", run["data"], "--json", "--workers", "0",
               "--tta", "five-crop")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["checkpoints"] == [str(s) for s in snaps]


def test_user_errors_are_one_line(run, tmp_path):
    r = invoke("predict", "-c", tmp_path / "nope.pt", "--data", run["data"], "--out", tmp_path / "s.csv")
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    r = invoke("eval", "-c", run["ckpt"], "--data", run["data"], "--tta", "ten-crop")
    assert r.exit_code == 2 and "--tta" in r.output
    r = invoke("eval", "--data", run["data"])
    assert r.exit_code == 2 and "--checkpoint" in r.output
    assert not (tmp_path / "s.csv").exists()


def test_lr_find_command(run, tmp_path):
    plot = tmp_path / "lr.png"
    r = invoke("lr-find", "--data", run["data"], "--model", "mobilenet_v3_small", "--image-size", "32",
               "--batch-size", "8", "--workers", "0", "--device", "cpu", "--steps", "10", "--start-lr", "1e-4",
               "--end-lr", "10", "--plot", plot, "--sampler", "sqrt", "--loss", "focal")
    assert r.exit_code == 0, r.output
    assert "suggested lr:" in r.stdout
    assert plot.read_bytes()[:4] == b"\x89PNG"
    curve = json.loads(plot.with_suffix(".json").read_text())
    assert 2 <= len(curve["lrs"]) <= 10 and curve["suggested_lr"] > 0
