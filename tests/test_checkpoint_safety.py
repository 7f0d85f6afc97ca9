"""Checkpoints are data, never code; commands never write over their inputs (issue #14).

A .pt file is a pickle: loaded carelessly it runs whatever its author put in it. Every
command that reads one (predict, eval, run --pretrained, run --resume) must refuse such a
file in one line, exit 2, and run nothing; checkpoints imattrain writes must still load.
"""

from __future__ import annotations

import os
import pickle
import random
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from imattrain.checkpoint import (
    load_checkpoint,
    load_model,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from imattrain.cli import app
from imattrain.models import build_model, load_pretrained
from tricks_shards import single_thread_torch, write_dataset

_one_thread = pytest.fixture(autouse=True)(single_thread_torch)
runner = CliRunner()
TRAIN = ["--model", "mobilenet_v3_small", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
         "--workers", "0", "--device", "cpu", "--quiet", "--schedule", "sgdr", "--sgdr-t0", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real (tiny) training run: 3 classes, 13 images, 1 epoch."""
    base = tmp_path_factory.mktemp("ckpt_safety")
    data = write_dataset(base / "clean", [6, 4, 3], val_per_class=2, test_rows=5, test_missing=1)
    r = runner.invoke(app, ["run", "--data", str(data), "--out", str(base / "run"), *TRAIN])
    assert r.exit_code == 0, r.output
    ckpts = base / "run" / "checkpoints"
    return {"data": data, "run": base / "run", "ckpt": ckpts / "last.pt",
            "snapshot": ckpts / "snapshot-cycle1.pt"}


def invoke(*args: Any):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(r: Any, *needles: str) -> str:
    """The result is exit 2 with exactly one line on stderr holding every needle."""
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and "Traceback" not in r.output, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- a real malicious checkpoint -------------------------------------------------------------


class _Touch:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class _Open:
    """Unpickling this creates `marker` through builtins.open."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


def write_evil(path: Path, marker: Path, kind: str = "zip") -> Path:
    """A checkpoint-shaped file whose unpickling would create `marker`."""
    payload = {"model": {}, "model_name": "mobilenet_v3_small", "num_classes": 3,
               "config": _Touch(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "zip":  # torch.save's own format
        torch.save(payload, path)
    elif kind == "open":
        torch.save({**payload, "config": _Open(marker)}, path)
    else:  # a bare pickle, as torch's legacy format starts
        path.write_bytes(pickle.dumps(payload, protocol=2))
    return path


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_the_payload_is_real(tmp_path: Path, kind: str) -> None:
    # What the guard prevents: an unrestricted load runs the command.
    marker = tmp_path / "pwned"
    path = write_evil(tmp_path / "evil.pt", marker, kind)
    torch.load(path, weights_only=False) if kind == "zip" else pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("kind", ["zip", "raw", "open"])
@pytest.mark.parametrize("command", ["predict", "eval", "run --pretrained", "run --resume"])
def test_malicious_checkpoint_never_runs(run: dict[str, Path], tmp_path: Path, command: str,
                                         kind: str) -> None:
    marker = tmp_path / "pwned"
    evil = write_evil(tmp_path / "evil.pt", marker, kind)
    named = evil  # the file the message must name
    if command == "predict":
        out = tmp_path / "sub.csv"
        r = invoke("predict", "-c", evil, "--data", run["data"], "--out", out, "--workers", "0")
        assert not out.exists()
    elif command == "eval":
        r = invoke("eval", "-c", evil, "--data", run["data"], "--workers", "0")
    elif command == "run --pretrained":
        r = invoke("run", "--data", run["data"], "--out", tmp_path / "new", "--pretrained", evil, *TRAIN)
        assert not (tmp_path / "new" / "checkpoints" / "last.pt").exists()
    else:
        resumed = tmp_path / "resumed"
        shutil.copytree(run["run"], resumed)
        named = shutil.copyfile(evil, resumed / "checkpoints" / "last.pt")
        r = invoke("run", "--data", run["data"], "--out", resumed, "--resume", *TRAIN)
        assert (resumed / "checkpoints" / "last.pt").read_bytes() == evil.read_bytes()
    assert not marker.exists(), "the checkpoint's code ran"
    line = one_line_error(r, str(named), "holds Python objects that could run code",
                          "plain tensors and values")
    if kind != "raw":
        assert "posix.system" in line or "builtins.open" in line or "open" in line


# --- ordinary checkpoints still load ---------------------------------------------------------


def test_checkpoints_of_a_real_run_load_with_weights_only(run: dict[str, Path]) -> None:
    for path in sorted((run["run"] / "checkpoints").glob("*.pt")):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], path
        torch.load(path, weights_only=True)  # torch's own check, no allow-list
        ckpt = load_checkpoint(path)
        assert ckpt["num_classes"] == 3 and ckpt["class_counts"] == [6, 4, 3]
    model, _ = load_model(run["ckpt"])
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_eval_and_predict_of_an_ordinary_checkpoint(run: dict[str, Path], tmp_path: Path) -> None:
    r = invoke("eval", "-c", run["ckpt"], "--data", run["data"], "--workers", "0", "--json")
    assert r.exit_code == 0, r.output
    out = tmp_path / "sub.csv"
    r = invoke("predict", "-c", run["ckpt"], "--data", run["data"], "--out", out, "--workers", "0")
    assert r.exit_code == 0, r.output
    assert len(out.read_text().splitlines()) == 1 + 5


def test_rng_state_survives_a_weights_only_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    save_checkpoint({"rng": rng_state()}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_checkpoint_from_before_weights_only_still_loads(run: dict[str, Path], tmp_path: Path) -> None:
    # Older imattrain saved numpy's RNG state as an ndarray: a plain array is allowed.
    ckpt = load_checkpoint(run["ckpt"])
    ckpt["rng"]["numpy"] = np.random.get_state()
    legacy = tmp_path / "legacy.pt"
    torch.save(ckpt, legacy)
    expected = np.random.rand(2)
    np.random.seed(0)
    set_rng_state(load_checkpoint(legacy)["rng"])
    assert np.array_equal(np.random.rand(2), expected)


def test_save_converts_numpy_values(tmp_path: Path) -> None:
    save_checkpoint({"best": np.float64(0.5), "counts": np.arange(3), "n": np.int64(4),
                     "where": tmp_path}, tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert back["best"] == 0.5 and type(back["best"]) is float and type(back["n"]) is int
    assert torch.equal(back["counts"], torch.arange(3)) and back["where"] == str(tmp_path)


def test_pretrained_plain_weights_and_own_checkpoints_load(run: dict[str, Path], tmp_path: Path) -> None:
    said: list[str] = []
    plain = tmp_path / "plain.pth"  # what torchvision's and timm's weight files are
    torch.save(build_model("mobilenet_v3_small", 10, log=said.append).state_dict(), plain)
    model = build_model("mobilenet_v3_small", 3, log=said.append)
    load_pretrained(model, plain, said.append)
    load_pretrained(model, run["ckpt"], said.append)
    assert said[-1].startswith("pretrained: loaded") and "skipped" not in said[-1]


def test_damaged_file_is_one_line(run: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    one_line_error(invoke("eval", "-c", bad, "--data", run["data"]), "cannot be read")
    one_line_error(invoke("run", "--data", run["data"], "--out", tmp_path / "r", "--pretrained", bad, *TRAIN),
                   "--pretrained", "cannot be read")
    # A bare pickle in a protocol torch's restricted reader does not parse is refused all the same.
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil4.pt"
    evil.write_bytes(pickle.dumps({"x": _Touch(marker)}, protocol=4))
    one_line_error(invoke("eval", "-c", evil, "--data", run["data"]), "cannot be read")
    assert not marker.exists()


# --- fields eval/predict/resume rely on ------------------------------------------------------


@pytest.mark.parametrize("change, needle", [
    ({"num_classes": None}, "num_classes"),
    ({"num_classes": -3}, "num_classes is -3"),
    ({"num_classes": 0}, "num_classes is 0"),
    ({"num_classes": "3"}, "num_classes is '3'"),
    ({"num_classes": 2.5}, "num_classes is 2.5"),
    ({"num_classes": True}, "num_classes is True"),
    ({"num_classes": torch.zeros(500, 500)}, "num_classes is Tensor"),
    ({"model_name": None}, "model_name"),
    ({"model_name": ""}, "model_name"),
    ({"model_name": 7}, "model_name is 7"),
    ({"model": [1, 2]}, "model is not a state dict"),
    ({"class_counts": [1, 2]}, "class_counts"),
])
def test_bad_fields_are_one_line(run: dict[str, Path], tmp_path: Path, change: dict[str, Any],
                                 needle: str) -> None:
    ckpt = load_checkpoint(run["ckpt"])
    for key, value in change.items():
        if value is None:
            del ckpt[key]
        else:
            ckpt[key] = value
    path = save_checkpoint(ckpt, tmp_path / "odd.pt")
    one_line_error(invoke("eval", "-c", path, "--data", run["data"], "--workers", "0"), needle)
    r = invoke("predict", "-c", path, "--data", run["data"], "--out", tmp_path / "s.csv", "--workers", "0")
    one_line_error(r, needle)
    assert not (tmp_path / "s.csv").exists()


# --- outputs never replace inputs, nor existing files without --force -------------------------


def test_predict_out_over_the_checkpoint_is_refused_even_with_force(run: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    before = run["ckpt"].read_bytes()
    link = tmp_path / "link.pt"
    link.symlink_to(run["ckpt"])
    hard = tmp_path / "hard.pt"
    os.link(run["ckpt"], hard)
    for out in (run["ckpt"], link, hard, run["ckpt"].parent / ".." / "checkpoints" / "last.pt"):
        for force in ([], ["--force"]):
            r = invoke("predict", "-c", run["ckpt"], "--data", run["data"], "--out", out, "--workers", "0",
                       *force)
            one_line_error(r, "--out", "an input of this command")
            r = invoke("predict", "-c", run["ckpt"], "--data", run["data"], "--out", tmp_path / "s.csv",
                       "--probs", out, "--workers", "0", *force)
            one_line_error(r, "--probs", "an input of this command")
    assert run["ckpt"].read_bytes() == before and not (tmp_path / "s.csv").exists()


def test_predict_out_over_a_snapshot_is_refused(run: dict[str, Path]) -> None:
    before = run["snapshot"].read_bytes()
    r = invoke("predict", "--snapshots", run["run"], "--data", run["data"], "--out", run["snapshot"],
               "--force", "--workers", "0")
    one_line_error(r, "an input of this command")
    assert run["snapshot"].read_bytes() == before


def test_predict_out_into_the_data_is_refused(run: dict[str, Path]) -> None:
    shard = sorted((run["data"] / "test").glob("*.parquet"))[0]
    before = shard.read_bytes()
    for flag, out in (("--out", shard), ("--probs", shard), ("--probs", run["data"] / "test" / "p.parquet")):
        extra = ["--out", run["data"].parent / "s.csv"] if flag == "--probs" else []
        r = invoke("predict", "-c", run["ckpt"], "--data", run["data"], flag, out, *extra, "--force",
                   "--workers", "0")
        one_line_error(r, flag, "inside the data folder")
    assert shard.read_bytes() == before and not (run["data"] / "test" / "p.parquet").exists()
    assert not (run["data"].parent / "s.csv").exists()


def test_predict_out_and_probs_the_same_file(run: dict[str, Path], tmp_path: Path) -> None:
    same = tmp_path / "both"
    r = invoke("predict", "-c", run["ckpt"], "--data", run["data"], "--out", same, "--probs", same,
               "--force", "--workers", "0")
    one_line_error(r, "--probs and --out are the same file")
    assert not same.exists()


def test_existing_outputs_need_force(run: dict[str, Path], tmp_path: Path) -> None:
    out, probs, report = tmp_path / "sub.csv", tmp_path / "p.parquet", tmp_path / "eval.json"
    for path in (out, probs, report):
        path.write_text("keep me")
    common = ["-c", run["ckpt"], "--data", run["data"], "--workers", "0"]
    one_line_error(invoke("predict", *common, "--out", out), "--out", "already exists", "--force")
    one_line_error(invoke("predict", *common, "--out", tmp_path / "new.csv", "--probs", probs),
                   "--probs", "already exists")
    one_line_error(invoke("eval", *common, "--out", report), "--out", "already exists", "--force")
    one_line_error(invoke("eval", *common, "--out", run["ckpt"], "--force"), "an input of this command")
    one_line_error(invoke("predict", *common, "--out", tmp_path), "is a folder")
    assert all(p.read_text() == "keep me" for p in (out, probs, report))
    assert not (tmp_path / "new.csv").exists()

    assert invoke("predict", *common, "--out", out, "--probs", probs, "--force").exit_code == 0
    assert out.read_text().startswith("id,predicted\n") and probs.read_bytes()[:4] == b"PAR1"
    r = invoke("eval", *common, "--out", report, "--force")
    assert r.exit_code == 0, r.output
    assert report.read_text().startswith("{")


def test_lr_find_plot_needs_force(run: dict[str, Path], tmp_path: Path) -> None:
    plot = tmp_path / "lr.png"
    plot.write_text("keep me")
    r = invoke("lr-find", "--data", run["data"], "--model", "mobilenet_v3_small", "--image-size", "32",
               "--device", "cpu", "--plot", plot)
    one_line_error(r, "--plot", "already exists", "--force")
    r = invoke("lr-find", "--data", run["data"], "--model", "mobilenet_v3_small", "--image-size", "32",
               "--device", "cpu", "--pretrained", run["ckpt"], "--plot", run["ckpt"], "--force")
    one_line_error(r, "--plot", "an input of this command")
    assert plot.read_text() == "keep me"
