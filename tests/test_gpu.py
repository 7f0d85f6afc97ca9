"""CUDA-only checks: nvjpeg batch decoding and a real `--gpu-decode` run on the GPU.

Skipped on machines without CUDA (CI); run on a GPU machine with
`python -m pytest tests/test_gpu.py`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from imatsample import photo_corpus
from imattrain.cli import app
from imattrain.data import gpu_decode_batch
from train_shards import make_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_gpu_decode_batch_matches_pil_and_falls_back() -> None:
    photos = list(photo_corpus(3, seed=1, min_side=200, max_side=320))
    img = Image.open(io.BytesIO(photos[0])).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85, progressive=True)
    progressive = buf.getvalue()
    buf = io.BytesIO()
    img.save(buf, "PNG")
    png = buf.getvalue()
    grey = io.BytesIO()
    img.convert("L").save(grey, "JPEG", quality=90)
    items = [*photos, progressive, png, grey.getvalue(), photos[1][: len(photos[1]) // 3],
             b"<html>not an image</html>", b""]
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else
            torch.empty(0, dtype=torch.uint8) for b in items]
    out = gpu_decode_batch(data, torch.device("cuda"))
    assert len(out) == len(items)
    for raw, dec in zip(items[:6], out[:6]):
        assert dec is not None and dec.is_cuda and dec.dtype == torch.uint8
        ref = _pil_rgb(raw)
        got = dec.permute(1, 2, 0).cpu().numpy()
        assert got.shape == ref.shape
        # nvjpeg and libjpeg-turbo differ in IDCT and upsampling rounding, never more.
        assert np.abs(got.astype(int) - ref.astype(int)).mean() < 3.0
    assert out[7] is None and out[8] is None  # HTML and empty bytes decode to nothing
    # A truncated JPEG either decodes partially (nvjpeg pads) or is None; never an exception.
    assert out[6] is None or out[6].shape[0] == 3


def test_gpu_decode_training_run_counts_corrupt_rows(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "clean", train_per_class=24, val_per_class=6, corrupt=2)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "run", "--quiet", "--data", str(data), "--out", str(out), "--model", "resnet18",
        "--image-size", "32", "--epochs", "2", "--batch-size", "16", "--workers", "2",
        "--device", "cuda", "--gpu-decode", "--amp", "bf16", "--channels-last",
        "--lr", "0.002", "--optimizer", "adamw"])
    assert result.exit_code == 0, result.output
    m = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in m] == [1, 2]
    assert all(r["corrupt_skipped"] == 2 for r in m)
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in m)
    assert (out / "checkpoints" / "last.pt").is_file()


def test_gpu_decode_does_not_corrupt_training_memory(tmp_path: Path) -> None:
    """The engine keeps the GPU busy (no host sync per step) while the next batch decodes.
    nvjpeg writing into blocks the queued backward pass still used turned ResNet-50's weights
    to NaN within 3 steps on an H200; decoding on its own stream must keep them finite."""
    import argparse
    import importlib.util
    import os

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_train.py"
    spec = importlib.util.spec_from_file_location("bench_gpu_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(model="resnet50", image_size=224, batch_size=128, workers=max(
        1, min(8, (os.cpu_count() or 2) - 1)), amp="bf16", compile=False, device="cuda",
        classes=2019, prefetch=4)
    data = bench.make_shards(tmp_path / "clean", 128 * 24, args.classes)
    res = bench.run_mode(data, tmp_path / "run", args, gpu_decode=True)  # raises on NaN
    assert res["images_per_s"] > 0
