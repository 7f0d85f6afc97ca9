"""End-to-end trainer runs on generated shards: learning, files, resume, NaN, checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from imatdata.errors import UserError
from imattrain.checkpoint import load_checkpoint, load_model
from imattrain.cli import app
from imattrain.data import build_loader
from imattrain.runtime import evaluate
from imattrain.selection import noise_margin
from imattrain.models import build_model
from imattrain.transforms import build_eval_transform
from train_shards import make_dataset

runner = CliRunner()
# Tiny models on a shared 2-core machine run fastest on one thread; runs below get --threads 1
# too (tests/test_train_threads.py covers the default rule).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("clean"), train_per_class=24, val_per_class=6,
                        corrupt=2, failed=1)


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["run", "--quiet", "--image-size", "32", "--threads", "1", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_learns_writes_run_files_and_checkpoints_reload(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, text = run("--data", str(data), "--out", str(out), "--model", "resnet18",
                     "--image-size", "24", "--epochs", "2", "--batch-size", "16", "--optimizer", "adamw", "--lr", "0.002",
                     "--weight-decay", "0.01", "--crop-scale", "0.7", "--workers", "1",
                     "--schedule", "sgdr", "--sgdr-t0", "1", "--sgdr-tmult", "1",
                     "--ema-decay", "0.9", "--checkpoint-every", "2")
    assert code == 0, text
    m = metrics(out)
    assert [r["epoch"] for r in m] == [1, 2]
    # Below chance (ln 4). Not "25% below epoch 1": with 6 steps an epoch and a warm restart
    # between them, that ratio swings with any change to the augmented pixels.
    assert m[-1]["train_loss"] < math.log(4)
    assert max(r["top1"] for r in m) >= 0.5  # chance is 0.25 with 4 classes
    assert all(r["corrupt_skipped"] == 2 for r in m)  # counted, never a crash
    # 96 rows with status ok fill 6 batches of 16 exactly; the 2 corrupt ones are dropped.
    assert m[0]["train_images"] == 94
    for key in ("val_loss", "top3", "top5", "lr", "images_per_s", "data_wait_frac", "ema_top3"):
        assert key in m[-1]
    for name in ("config.toml", "curves.png", "checkpoints/last.pt", "checkpoints/best.pt",
                 "checkpoints/snapshot-cycle1.pt", "checkpoints/snapshot-cycle2.pt"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # The checkpoint contract other commands rely on, and a reload that scores the same.
    ckpt = load_checkpoint(out / "checkpoints" / "best.pt")
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "epoch", "step", "data_state",
                "config", "model_name", "num_classes", "image_size", "class_counts",
                "best_top3_err", "rng"):
        assert key in ckpt, key
    assert ckpt["num_classes"] == 4 and ckpt["class_counts"] == [24] * 4  # usable rows only
    model, _ = load_model(out / "checkpoints" / "best.pt", use_ema=True)
    loader = build_loader(data, "val", transform=build_eval_transform(24), batch_size=16,
                          workers=0, train=False)
    again = evaluate(model, loader, torch.device("cpu"), "none")
    # best.pt holds the latest epoch within noise of the lowest val top-3 error
    # (imattrain.selection), not necessarily the lowest itself.
    chosen = m[ckpt["epoch"] - 1]
    assert chosen["best_epoch"] == m[-1]["best_epoch"] == ckpt["epoch"]
    lowest = min(r["ema_top3_err"] for r in m)
    assert chosen["ema_top3_err"] <= lowest + noise_margin(lowest, chosen["val_images"]) + 1e-9
    assert again["top3_err"] == pytest.approx(chosen["ema_top3_err"])
    assert again["top3_err"] == pytest.approx(ckpt["best_top3_err"])

    # The saved config reproduces the run's settings through --config.
    code, text = run("--config", str(out / "config.toml"), "--out", str(out))
    assert code == 2 and "--resume" in text  # the folder already holds a run


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_resume_after_interruption_equals_uninterrupted_run(data: Path, tmp_path: Path) -> None:
    common = ["--data", str(data), "--model", "mobilenet_v3_small", "--epochs", "2",
              "--batch-size", "8", "--lr", "0.01", "--workers", "2", "--val-split", "",
              "--shuffle-buffer", "16"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run(*common, "--out", str(whole))[0] == 0
    # Stop mid-epoch 1 at an odd batch (so the resumed loader must start on worker 1) ...
    code, text = run(*common, "--out", str(parts), "--max-steps", "5")
    assert code == 0, text
    stopped = load_checkpoint(parts / "checkpoints" / "last.pt")
    assert stopped["step"] == 5 and stopped["data_state"]["samples"] == 40
    assert stopped["data_state"]["epoch"] == 0
    # ... and again in epoch 2, then finish.
    assert run(*common, "--out", str(parts), "--resume", "--max-steps", "17")[0] == 0
    assert load_checkpoint(parts / "checkpoints" / "last.pt")["data_state"]["epoch"] == 1
    assert run(*common, "--out", str(parts), "--resume")[0] == 0
    a, b = load_checkpoint(whole / "checkpoints" / "last.pt"), \
        load_checkpoint(parts / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 2 * 12  # 94 usable images -> 12 batches of 8 per epoch
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key  # same samples, same order, same crops
    ma, mb = metrics(whole), metrics(parts)
    assert [r["epoch"] for r in mb] == [1, 2]
    assert [r["train_loss"] for r in ma] == pytest.approx([r["train_loss"] for r in mb])
    # A changed batch size cannot continue exactly: a clear error instead.
    code, text = run(*common[:-6], "--batch-size", "16", "--workers", "2", "--val-split", "",
                     "--out", str(parts), "--resume", "--epochs", "3")
    assert code == 2 and "batch-size" in text


def test_accumulation_clipping_channels_last(data: Path, tmp_path: Path) -> None:
    # fp32: this CPU has no bf16 convolution kernels, so a bf16 training step falls back to
    # torch's naive conv backward and takes minutes (bf16 autocast is checked below).
    out = tmp_path / "acc"
    code, text = run("--data", str(data), "--out", str(out), "--model", "mobilenet_v3_small",
                     "--image-size", "24", "--epochs", "1", "--batch-size", "8", "--grad-accum",
                     "5", "--amp", "none", "--clip-grad", "1.0", "--channels-last", "--workers",
                     "0", "--schedule", "onecycle", "--lr", "0.01", "--val-split", "")
    assert code == 0, text
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 3  # 12 batches in steps of 5, 5 and the last 2
    (record,) = metrics(out)
    assert record["train_images"] == 94 and math.isfinite(record["train_loss"])
    assert "top1" not in record  # no validation split asked for


def test_bf16_autocast_on_cpu(data: Path) -> None:
    model = build_model("mobilenet_v3_small", 4).eval()
    loader = build_loader(data, "val", transform=build_eval_transform(24), batch_size=8, workers=0,
                          train=False)
    full = evaluate(model, loader, torch.device("cpu"), None, num_classes=4)
    half = evaluate(model, loader, torch.device("cpu"), "bf16", num_classes=4, channels_last=True)
    assert half["count"] == full["count"] > 0
    assert math.isfinite(half["loss"]) and abs(half["loss"] - full["loss"]) < 0.1 * abs(full["loss"]) + 0.05


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "nan"
    code, text = run("--data", str(data), "--out", str(out), "--model", "mobilenet_v3_small",
                     "--epochs", "1", "--batch-size", "8", "--lr", "1e12", "--momentum", "0",
                     "--weight-decay", "0", "--workers", "0", "--checkpoint-every", "1",
                     "--val-split", "")
    assert code == 2
    line = [s for s in text.splitlines() if s.strip()]
    assert len(line) == 1 and "NaN/inf" in line[0] and "last good checkpoint" in line[0]
    last = out / "checkpoints" / "last.pt"
    if last.exists():  # a step before the blow-up was saved: it must be all finite
        assert all(torch.isfinite(v).all() for v in _weights(last).values()
                   if v.dtype.is_floating_point)


def test_pretrained_local_file_skips_mismatched_head(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    source = build_model("resnet18", 10)
    path = tmp_path / "weights.pt"
    torch.save({"model": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    model = build_model("resnet18", 4, pretrained=str(path))
    assert "skipped" in capsys.readouterr().err
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 4
    with pytest.raises(UserError, match="no such file"):
        build_model("resnet18", 4, pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="unknown model 'resnet1800'"):
        build_model("resnet1800", 4)


def test_pretrained_torchvision_offline_is_one_clear_error(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setenv("IMAT_OFFLINE", "1")  # refuse before any connection is attempted
    with pytest.raises(UserError, match="not in the torch hub cache"):
        build_model("resnet18", 4, pretrained="torchvision")


def test_gpu_benchmark_script_starts_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_train.py"
    spec = importlib.util.spec_from_file_location("bench_gpu_train", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu_train", bench)  # its dataclasses look it up
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["gpu_train.py", "--device", "cpu", "--steps", "2",
                                      "--cases", "resnet18@64:4", "--workers", "1", "--amp", "none",
                                      "--classes", "4", "--keep", str(tmp_path)])
    assert bench.main() == 0
    out = capsys.readouterr().out
    assert "synthetic" in out and "cpu-decode" in out and "images/s" in out
    assert "skipped: needs CUDA" in out and "ceiling" in out
    if not torch.cuda.is_available():
        monkeypatch.setattr(sys, "argv", ["gpu_train.py"])
        assert bench.main() == 2
        assert "no CUDA device here" in capsys.readouterr().err
