"""The CPU thread rule: the model gets every core of its rank except those the loader workers
are measured to keep busy (runtime.cpu_threads, runtime.LoaderLoad, engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from imattrain import runtime
from imattrain.cli import app
from imattrain.runtime import LoaderLoad, cpu_threads
from train_shards import make_dataset

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("restore_torch_threads")


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


# A fresh interpreter that imports `first`, then runs one torch operation so the OpenMP runtime
# is loaded, and prints the OMP_WAIT_POLICY its environment ends up with. With
# OMP_DISPLAY_ENV=VERBOSE, GNU OpenMP (torch's on Linux) prints the settings it read as it
# loads: GOMP_SPINCOUNT is 0 when idle threads sleep and 300000 (or more) when they spin.
_PROBE = """
import importlib, os, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
import torch
torch.ones(64, 64) @ torch.ones(64, 64)
print(os.environ.get("OMP_WAIT_POLICY", "<unset>"))
"""


def _probe(*first: str, policy: str | None) -> tuple[str, str | None]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_DISPLAY_ENV="VERBOSE", **({"OMP_WAIT_POLICY": policy} if policy else {}))
    done = subprocess.run([sys.executable, "-c", _PROBE, *first], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    spin = [line.split("=", 1)[1].strip(" '") for line in done.stderr.splitlines()
            if line.strip().startswith("GOMP_SPINCOUNT")]
    return done.stdout.strip(), (spin[0] if spin else None)


def test_importing_the_library_makes_idle_openmp_threads_sleep() -> None:
    # A library caller (no `imattrain` command): the package sets it before torch loads.
    policy, spin = _probe("imattrain.engine", policy=None)
    assert policy == "PASSIVE"
    if spin is not None:  # GNU OpenMP: the runtime itself read it
        assert spin == "0"


def test_the_users_wait_policy_wins_and_a_loaded_torch_is_left_alone() -> None:
    policy, spin = _probe("imattrain.engine", policy="ACTIVE")
    assert policy == "ACTIVE"
    if spin is not None:
        assert spin != "0"
    # torch loaded first: too late for this process; the environment is not changed.
    policy, spin = _probe("torch", "imattrain.engine", policy=None)
    assert policy == "<unset>"
    if spin is not None:
        assert spin != "0"
