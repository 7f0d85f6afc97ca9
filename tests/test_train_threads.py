"""The CPU thread rule: the model gets every core of its rank except those the loader workers
are measured to keep busy (runtime.cpu_threads, runtime.LoaderLoad, engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from imattrain import runtime
from imattrain.cli import app
from imattrain.runtime import LoaderLoad, cpu_threads
from train_shards import make_dataset

runner = CliRunner()


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores", [2, 16])
def test_idle_workers_leave_the_model_every_core(cores: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "available_cpus", lambda: cores)
    # Before any measurement, and with workers measured (nearly) idle: all cores.
    assert cpu_threads(0, workers=2) == cores
    assert cpu_threads(0, workers=2, loader_cores=0.04) == cores
    assert cpu_threads(0, workers=0) == cores
    # Requested wins; ranks share the cores.
    assert cpu_threads(3, workers=2, loader_cores=1.9) == 3
    assert cpu_threads(0, workers=2, ranks=2) == cores // 2


def test_busy_workers_get_the_cores_they_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "available_cpus", lambda: 16)
    assert cpu_threads(0, workers=4, loader_cores=2.4) == 14
    assert cpu_threads(0, workers=2, loader_cores=7.0) == 14  # never more than the workers
    monkeypatch.setattr(runtime, "available_cpus", lambda: 2)
    assert cpu_threads(0, workers=2, loader_cores=0.8) == 1
    assert cpu_threads(0, workers=2, loader_cores=2.0) == 1  # at least one thread


def test_loader_load_is_worker_cpu_over_wall_time_after_start_up() -> None:
    meter = LoaderLoad(skip=2, window=4)
    t = 0.0
    done = []
    for cpu in (5.0, 5.0, 0.1, 0.1, 0.1, 0.1, 0.1):  # start-up batches are expensive: skipped
        t += 0.5
        done.append(meter.add(cpu, t))
    assert done == [False, False, False, False, False, True, False]
    assert meter.cores == pytest.approx(0.4 / 2.0)


def test_a_run_with_idle_workers_trains_on_every_core(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_dataset(tmp_path / "clean", train_per_class=12, val_per_class=2, size=32)
    monkeypatch.setattr("imattrain.engine.LoaderLoad", lambda: LoaderLoad(skip=2, window=4))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--data", str(data), "--out", str(out), "--model",
                                 "mobilenet_v3_small", "--image-size", "24", "--epochs", "1",
                                 "--batch-size", "4", "--workers", "2", "--val-split", "",
                                 "--lr", "0.01"])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 24x24 crops of 32 px JPEGs cost the workers next to nothing next to the model.
    assert record["threads"] == runtime.available_cpus()
    assert "model runs on" in result.output
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["data_state"]["threads"] == record["threads"]  # what --resume keeps
