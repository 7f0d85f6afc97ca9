"""The default recipe: `imattrain run` with no recipe flags learns, and the auto values follow
the run's length (config.auto_recipe); flags and config files still win."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from imattrain.cli import app
from imattrain.config import AUTO_FIELDS, TrainConfig, auto_recipe, load_toml
from train_shards import make_dataset

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def test_auto_recipe_follows_the_run_length() -> None:
    short, mid, long_ = (auto_recipe(e, False, "cosine") for e in (3, 20, 40))
    assert short["augment"] == "none" and mid["augment"] == long_["augment"] == "basic"
    assert short["crop_scale"] > mid["crop_scale"] > long_["crop_scale"] == pytest.approx(0.35)
    assert short["rotation"] < mid["rotation"] < long_["rotation"] == pytest.approx(10)
    assert short["color_jitter"] < long_["color_jitter"] == pytest.approx(0.3)
    assert short["warmup_epochs"] == pytest.approx(0.3) and long_["warmup_epochs"] == 2.0
    # From pretrained weights each strength comes twice as soon.
    assert auto_recipe(15, True, "cosine")["crop_scale"] == pytest.approx(0.35)
    assert auto_recipe(5, True, "cosine")["augment"] == "basic"
    assert auto_recipe(6, False, "cosine")["augment"] == "none"
    assert TrainConfig().resolved().augment == "basic"  # the default 10 epochs
    assert auto_recipe(12, True, "cosine")["crop_scale"] < auto_recipe(12, False, "cosine")["crop_scale"]
    # Schedules with a shape of their own get no warm-up (SGDR's snapshots stay put).
    for schedule in ("sgdr", "onecycle", "cyclic", "step", "constant"):
        assert auto_recipe(24, True, schedule)["warmup_epochs"] == 0.0


def test_given_values_win_and_resolution_is_idempotent() -> None:
    cfg = TrainConfig(epochs=6, rotation=15.0).validate()
    assert cfg.auto_fields() == [f for f in AUTO_FIELDS if f != "rotation"]
    done = cfg.resolved()
    assert done.rotation == 15.0 and done.crop_scale == auto_recipe(6, False, "cosine")["crop_scale"]
    assert done.resolved() is done and done.auto_fields() == []
    assert TrainConfig().label_smoothing == 0.1
    # A basic-preset value given on a short run means the basic preset.
    assert TrainConfig(epochs=3, crop_scale=0.5).resolved().augment == "basic"
    assert TrainConfig(epochs=3).resolved().augment == "none"
    # `none` evaluates (and trains on) the whole image; cropping presets keep the 256/224 crop.
    assert TrainConfig(epochs=3, image_size=64).resolved().eval_resize == 64
    assert TrainConfig(epochs=30, image_size=64).resolved().eval_resize == 73
    assert TrainConfig(epochs=3, image_size=64, eval_resize=80).resolved().eval_resize == 80


def test_a_default_run_learns_well_above_chance(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "clean", train_per_class=24, val_per_class=8, size=40)
    out = tmp_path / "run"
    # Only the run's shape: model, size, epochs, batch size, and the machine's share (one
    # worker, one thread: in a test process torch's OpenMP threads spin, and on a shared
    # 2-core machine a tiny model then runs several times slower on two).
    result = runner.invoke(app, ["run", "--data", str(data), "--out", str(out), "--model",
                                 "resnet18", "--image-size", "32", "--epochs", "5",
                                 "--batch-size", "16", "--workers", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "recipe: augment none, warmup-epochs 0.5, weight-decay 0.0005, eval-resize 32 " \
           "(auto for 5 epochs from scratch" in result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["top1"] >= 0.5  # 4 classes: chance is 0.25
    # config.toml keeps them auto (a reuse with other --epochs derives them again); the
    # checkpoints hold the values used.
    saved = load_toml(out / "config.toml")
    assert saved["augment"] == "auto" and not any(name in saved for name in AUTO_FIELDS[1:])
    used = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["config"]
    assert used["augment"] == "none" and used["eval_resize"] == 32
    assert used["weight_decay"] == 5e-4 and used["warmup_epochs"] == 0.5
