"""ResNet-50 training throughput from the shards: images/s and data-wait, CPU vs GPU decode.

Runs the real `imattrain run` engine for two epochs over generated shards of ~512 px
photo-like JPEGs and reports the second epoch (the first pays for worker start-up and
cuDNN autotuning), once with CPU decoding in the DataLoader workers and once with
`--gpu-decode` (batched nvjpeg, augmentation on the GPU). Target on one H200: at least
2,500 images/s with under 5% of step time waiting for data.

    .venv/bin/python bench/gpu_train.py                       # on a CUDA machine
    .venv/bin/python bench/gpu_train.py --device cpu --steps 2 --model resnet18 \\
        --image-size 64 --batch-size 8 --workers 1            # smoke run anywhere

Self-contained: it writes its shards to a temporary folder (or `--keep DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

TARGET_IPS = 2500.0
TARGET_WAIT = 0.05


def make_shards(root: Path, n: int, classes: int) -> Path:
    from imatsample import photo_corpus
    from imatsample.shards import manifest_row, write_shards

    photos = photo_corpus(n, seed=0, min_side=448, max_side=512, lazy=True)
    rows = (manifest_row(f"{i:08d}.jpg", "train", i % classes, photos[i]) for i in range(n))
    # Every photo is distinct bytes: hand them over a row group at a time, not 10,000.
    write_shards(root / "train", rows, row_group_rows=512, chunk_rows=512)
    return root


def run_mode(data: Path, out: Path, args: argparse.Namespace, gpu_decode: bool) -> dict:
    from imattrain.config import TrainConfig
    from imattrain.engine import train

    cfg = TrainConfig(
        data=str(data), out=str(out), model=args.model, image_size=args.image_size,
        # A throughput run on random labels: a modest constant rate, so no divergence (lr 0.1
        # with no warm-up reached NaN by step 20 on an H200) stops it before it is measured.
        epochs=2, batch_size=args.batch_size, workers=args.workers, lr=0.02,
        schedule="constant", amp=args.amp, channels_last=True, compile=args.compile,
        device=args.device, val_split="", quiet=True, gpu_decode=gpu_decode,
        num_classes=args.classes, prefetch=args.prefetch, shuffle_buffer=1024,
    ).validate()
    started = time.perf_counter()
    train(cfg)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    return {"images_per_s": last["images_per_s"], "data_wait_frac": last["data_wait_frac"],
            "wall_s": time.perf_counter() - started}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps per epoch")
    ap.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)))
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--classes", type=int, default=2019)
    ap.add_argument("--modes", default="cpu-decode,gpu-decode")
    ap.add_argument("--keep", type=Path, help="write the shards and runs here and keep them")
    args = ap.parse_args()

    import torch

    from imatdata.errors import UserError

    if args.device in ("auto", "cuda") and not torch.cuda.is_available():
        print("gpu_train: no CUDA device here; this benchmark measures GPU training. For a "
              "smoke run on CPU: --device cpu --steps 2 --model resnet18 --image-size 64 "
              "--batch-size 8", file=sys.stderr)
        return 2
    if args.device == "auto":
        args.device = "cuda"
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    root = args.keep or Path(tempfile.mkdtemp(prefix="imat-bench-gpu-"))
    try:
        # Every worker gets the same number of full batches: size the epoch to `steps`.
        n = args.steps * args.batch_size
        t0 = time.perf_counter()
        data = make_shards(root / "clean", n, args.classes)
        print(f"shards: {n} JPEGs of ~512 px ({time.perf_counter() - t0:.1f}s to build); "
              f"{args.model} at {args.image_size}px, batch {args.batch_size}, amp {args.amp}, "
              f"channels_last, {args.workers} workers, device {args.device}")
        rows = []
        for mode in modes:
            gpu = mode == "gpu-decode"
            if gpu and args.device != "cuda":
                rows.append((mode, None, None, None, "skipped: needs CUDA"))
                continue
            try:
                res = run_mode(data, root / f"run-{mode}", args, gpu)
            except UserError as exc:
                rows.append((mode, None, None, None, f"failed: {exc}"))
                continue
            ok = res["images_per_s"] >= TARGET_IPS and res["data_wait_frac"] < TARGET_WAIT
            rows.append((mode, res["images_per_s"], res["data_wait_frac"], res["wall_s"],
                         "meets target" if ok else "below target"))
        print()
        print(f"{'mode':12s} {'images/s':>10s} {'data wait':>10s} {'wall s':>8s}  note")
        for mode, ips, wait, wall, note in rows:
            if ips is None:
                print(f"{mode:12s} {'-':>10s} {'-':>10s} {'-':>8s}  {note}")
            else:
                print(f"{mode:12s} {ips:10.1f} {100 * wait:9.1f}% {wall:8.1f}  {note}")
        print(f"(second epoch of two; target: >= {TARGET_IPS:.0f} images/s with data wait "
              f"< {100 * TARGET_WAIT:.0f}% on one H200)")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if any(row[4].startswith("failed") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
