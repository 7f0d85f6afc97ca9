"""Learning-rate schedules, the optimiser's parameter groups, and config/CLI validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from imatdata.errors import UserError
from imattrain.cli import app
from imattrain.config import TrainConfig, build_config, config_fields, flag_name, load_toml, to_toml
from imattrain.runtime import build_optimizer
from imattrain.models import build_model
from imattrain.schedules import build_scheduler, lr_curve, sgdr_cycle_ends
from train_shards import make_dataset

runner = CliRunner()
SPE = 10  # steps per epoch


def curve(**kw: object) -> list[float]:
    return lr_curve(TrainConfig(lr=1.0, **kw).validate(), SPE)  # type: ignore[arg-type]


def test_cosine_with_warmup() -> None:
    lr = curve(schedule="cosine", epochs=5, warmup_epochs=1, min_lr=0.1)
    assert len(lr) == 50
    assert lr[0] == pytest.approx(0.01) and lr[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lr[:10], lr[1:11]))  # linear rise
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))  # then monotone decay
    assert lr[-1] == pytest.approx(0.1, abs=0.01)
    assert lr[30] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_sgdr_restarts_and_cycle_ends() -> None:
    cfg = TrainConfig(lr=1.0, schedule="sgdr", epochs=7, sgdr_t0=1, sgdr_tmult=2, min_lr=0.0)
    lr = lr_curve(cfg, SPE)
    restarts = [i for i in range(1, len(lr)) if lr[i] > lr[i - 1] + 0.5]
    assert restarts == [10, 30]  # cycles of 1, 2, 4 epochs
    assert lr[0] == lr[10] == lr[30] == pytest.approx(1.0)
    assert lr[9] < 0.05 and lr[29] < 0.01
    assert sgdr_cycle_ends(cfg, SPE) == [10, 30, 70]
    assert sgdr_cycle_ends(TrainConfig(schedule="cosine"), SPE) == []


def test_cyclic_is_triangular() -> None:
    lr = curve(schedule="cyclic", epochs=4, cycle_epochs=2, min_lr=0.2)
    assert lr[0] == pytest.approx(0.2) and lr[10] == pytest.approx(1.0)
    assert lr[20] == pytest.approx(0.2) and lr[30] == pytest.approx(1.0)
    assert lr[5] == pytest.approx(0.6)
    assert curve(schedule="cyclic", epochs=2, cycle_epochs=2)[0] == pytest.approx(0.1)  # lr/10


def test_onecycle_peaks_at_pct_start() -> None:
    lr = curve(schedule="onecycle", epochs=10, pct_start=0.3)
    peak = max(range(len(lr)), key=lr.__getitem__)
    assert peak == 30 and lr[30] == pytest.approx(1.0)
    assert lr[0] == pytest.approx(1 / 25)
    assert lr[-1] < 1e-3


def test_step_decays_by_gamma() -> None:
    lr = curve(schedule="step", epochs=6, step_epochs=2, step_gamma=0.1)
    assert lr[0] == lr[19] == pytest.approx(1.0)
    assert lr[20] == pytest.approx(0.1) and lr[40] == pytest.approx(0.01)


def test_scheduler_steps_per_optimiser_step_and_resumes_from_state() -> None:
    cfg = TrainConfig(lr=0.5, schedule="cosine", epochs=2, warmup_epochs=0.5)
    model = build_model("squeezenet1_1", 3)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, SPE)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer(cfg, model)
    sched2 = build_scheduler(cfg, opt2, SPE)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert seen == pytest.approx(lr_curve(cfg, SPE)[:7])


def test_no_weight_decay_on_norms_and_biases() -> None:
    model = build_model("resnet18", 5)
    opt = build_optimizer(TrainConfig(weight_decay=0.05), model)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    assert any(p is model.fc.bias for p in no_decay["params"])
    assert any(p is model.bn1.weight for p in no_decay["params"])
    assert opt.defaults["nesterov"] is True
    adamw = build_optimizer(TrainConfig(optimizer="adamw", lr=1e-3), model)
    assert isinstance(adamw, torch.optim.AdamW)


# --- config and CLI --------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["run", *args])
    return result.exit_code, result.output


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--epochs", "two"], "--epochs must be an integer"),
    (["--lr", "-0.1"], "--lr must be a positive number"),
    (["--optimizer", "adam"], "--optimizer must be one of sgd, adamw"),
    (["--schedule", "poly"], "--schedule must be one of"),
    (["--amp", "fp8"], "--amp must be one of"),
    (["--sampler", "uniform"], "--sampler must be one of instance, sqrt, balanced"),
    (["--loss", "hinge"], "--loss must be one of ce, focal, class-balanced"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
    (["--image-size", "64", "--eval-resize", "32"], "--eval-resize (32) must be at least"),
    (["--tree", "/nonexistent/tree.json"], "--tree /nonexistent/tree.json: no such file"),
    (["--device", "cpu", "--amp", "fp16"], "--amp fp16 needs CUDA"),
    (["--augment", "mixup"], "--augment must be one of"),
])
def test_bad_values_are_one_line_errors(args: list[str], message: str) -> None:
    code, text = cli(*args)
    assert code == 2
    lines = [s for s in text.splitlines() if s.strip()]
    assert len(lines) == 1 and lines[0].startswith("imattrain: error: ") and message in lines[0], text


def test_help_documents_every_config_key() -> None:
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0
    for f in config_fields():
        assert f"--{flag_name(f.name)}" in result.output, f.name
    for key in ("--model", "--pretrained", "--image-size", "--epochs", "--batch-size", "--lr",
                "--optimizer", "--schedule", "--augment", "--sampler", "--loss", "--amp",
                "--workers", "--seed", "--device", "--config", "--data", "--out"):
        assert key in result.output


def test_toml_config_flags_win_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('model = "resnet18"\nepochs = 7\nlr = 0.2\nema-decay = 0.99\n'
                    'two_stage = true\n')
    values = load_toml(path)
    cfg = build_config(values, {"epochs": 3})
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.ema_decay, cfg.two_stage) == \
        ("resnet18", 3, 0.2, 0.99, True)
    again = tmp_path / "again.toml"
    again.write_text(to_toml(cfg))
    assert build_config(load_toml(again)) == cfg
    path.write_text("epochz = 3\n")
    with pytest.raises(UserError, match="unknown key 'epochz'"):
        load_toml(path)
    path.write_text("epochs = \n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_toml(path)
    path.write_text('epochs = "many"\n')
    code, text = cli("--config", str(path))
    assert code == 2 and "epochs must be an integer" in text


def test_gpu_decode_without_cuda_and_resume_without_run_are_clear(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = make_dataset(tmp_path / "clean", train_per_class=2, val_per_class=1, size=16)
    code, text = cli("--data", str(data), "--device", "cpu", "--gpu-decode", "--quiet",
                     "--out", str(tmp_path / "r"))
    assert code == 2 and "--gpu-decode needs a CUDA device" in text
    code, text = cli("--data", str(data), "--resume", "--quiet", "--out", str(tmp_path / "r"))
    assert code == 2 and "no checkpoint at" in text
    code, text = cli("--data", str(tmp_path / "missing"), "--quiet")
    assert code == 2 and "no shards for split 'train'" in text
