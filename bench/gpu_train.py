"""Training throughput from the shards against the model's own speed, on one GPU, in one run.

For each case (model @ image size : batch; default ResNet-50 at 224 with batch 256, ResNet-50
at 448, the 2019 winners' size, and the wider ConvNeXt-Tiny at 224) it measures three modes:

  * `synthetic`: the model's own rate, on random batches already on the GPU (the same
    optimiser step, autocast, channels_last as a run): the ceiling no loader can beat;
  * `cpu-decode`: the real `imattrain run` engine reading generated shards of ~512 px
    photo-like JPEGs, decoding and augmenting in the DataLoader workers;
  * `gpu-decode`: the same with `--gpu-decode` (batched nvjpeg, augmentation on the GPU).

The loader modes run two epochs and report the second (the first pays for worker start-up
and cuDNN autotuning). Each row gives images/s, its share of the ceiling, the fraction of step
time spent waiting for data, the GPU's utilisation (nvidia-smi, sampled twice a second over
the second half of the mode's run) and what a 1,011,532-image epoch would take at that rate.
Target on one H200 (issue #22): every loader mode at >= 95% of its case's synthetic rate with
a data wait under 5%. The table ends the run; the exit status is 1 when a mode failed (an
exception, not a missed target), 2 when no CUDA device is here.

    .venv/bin/python bench/gpu_train.py                         # on a CUDA machine
    .venv/bin/python bench/gpu_train.py --cases resnet50@224:256 --modes synthetic,gpu-decode
    .venv/bin/python bench/gpu_train.py --device cpu --steps 2 --workers 1 \\
        --cases resnet18@64:8                                   # smoke run anywhere

Self-contained: it writes its shards to a temporary folder (or `--keep DIR`), built once for
the largest case.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGET_SHARE = 0.95
TARGET_WAIT = 0.05
EPOCH_IMAGES = 1_011_532
MODES = ("synthetic", "cpu-decode", "gpu-decode")
DEFAULT_CASES = "resnet50@224:256,resnet50@448:128,convnext_tiny@224:256"


@dataclass(frozen=True)
class Case:
    model: str
    image_size: int
    batch_size: int

    @property
    def name(self) -> str:
        return f"{self.model}@{self.image_size}"


def parse_cases(text: str) -> list[Case]:
    """`model@size:batch,...` (batch optional, default 256)."""
    cases = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        model, _, rest = part.partition("@")
        size, _, batch = rest.partition(":")
        try:
            cases.append(Case(model, int(size), int(batch or 256)))
        except ValueError:
            raise SystemExit(f"gpu_train: --cases {part!r}: expected model@size:batch") from None
    return cases


class UtilSampler:
    """GPU utilisation (%) from nvidia-smi twice a second, in a thread; `mean_late()` averages
    the samples of the second half of the sampled span (the measured epoch, roughly)."""

    def __init__(self, device_index: int) -> None:
        self.index, self.samples = device_index, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def __enter__(self) -> UtilSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        cmd = ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu",
               "--format=csv,noheader,nounits"]
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
                self.samples.append((time.perf_counter(), float(out.strip().splitlines()[0])))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                continue

    def mean_late(self) -> float | None:
        if len(self.samples) < 2:
            return None
        t0, t1 = self.samples[0][0], self.samples[-1][0]
        late = [u for t, u in self.samples if t >= (t0 + t1) / 2]
        return statistics.fmean(late) if late else None


def make_shards(root: Path, n: int, classes: int) -> Path:
    from imatsample import photo_corpus
    from imatsample.shards import manifest_row, write_shards

    photos = photo_corpus(n, seed=0, min_side=448, max_side=512, lazy=True)
    rows = (manifest_row(f"{i:08d}.jpg", "train", i % classes, photos[i]) for i in range(n))
    # Every photo is distinct bytes: hand them over a row group at a time, not 10,000.
    write_shards(root / "train", rows, row_group_rows=512, chunk_rows=512)
    return root


def train_config(case: Case, data: Path, out: Path, args: argparse.Namespace, gpu_decode: bool) -> Any:
    from imattrain.config import TrainConfig

    return TrainConfig(
        data=str(data), out=str(out), model=case.model, image_size=case.image_size,
        # A throughput run on random labels: a modest constant rate, so no divergence (lr 0.1
        # with no warm-up reached NaN by step 20 on an H200) stops it before it is measured.
        epochs=2, batch_size=case.batch_size, workers=args.workers, lr=0.02,
        schedule="constant", amp=args.amp, channels_last=True, compile=args.compile,
        device=args.device, val_split="", quiet=True, gpu_decode=gpu_decode,
        num_classes=args.classes, prefetch=args.prefetch, shuffle_buffer=1024,
    ).validate()


def run_synthetic(case: Case, args: argparse.Namespace) -> dict[str, float]:
    """The model's own rate: random batches already on the device, the run's own step."""
    import numpy as np
    import torch

    from imattrain.runtime import autocast_dtype, build_optimizer, forward_backward, grad_scaler, optimizer_step
    from imattrain.setup import build_model_and_loss

    cfg = train_config(case, Path("unused"), Path("unused"), args, False).resolved()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    model, loss_fn = build_model_and_loss(cfg, args.classes, np.ones(args.classes))
    model = model.to(device).to(memory_format=torch.channels_last)
    loss_fn = loss_fn.to(device)
    net = torch.compile(model) if args.compile else model
    optimizer = build_optimizer(cfg, model)
    dtype = autocast_dtype(cfg.amp, device)
    scaler = grad_scaler(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((case.batch_size, 3, case.image_size, case.image_size), device=device,
                    generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (case.batch_size,), device=device, generator=g)

    def steps(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            forward_backward(net, loss_fn, x, y, dtype, scaler)
            optimizer_step(optimizer, scaler)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    steps(max(2, args.steps // 4))  # warm-up: cuDNN autotuning, allocator, compile
    started = time.perf_counter()
    took = steps(args.steps)
    return {"images_per_s": args.steps * case.batch_size / took, "data_wait_frac": 0.0,
            "wall_s": time.perf_counter() - started}


def run_loader(case: Case, data: Path, out: Path, args: argparse.Namespace, gpu_decode: bool) -> dict[str, float]:
    from imattrain.engine import train

    cfg = train_config(case, data, out, args, gpu_decode)
    started = time.perf_counter()
    train(cfg)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    return {"images_per_s": last["images_per_s"], "data_wait_frac": last["data_wait_frac"],
            "wall_s": time.perf_counter() - started}


def measure(case: Case, mode: str, data: Path, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    index = torch.cuda.current_device() if args.device == "cuda" else 0
    with UtilSampler(index) if args.device == "cuda" else _NoSampler() as sampler:
        if mode == "synthetic":
            res = run_synthetic(case, args)
        else:
            res = run_loader(case, data, root / f"run-{case.name}-{mode}", args, mode == "gpu-decode")
    res["gpu_util"] = sampler.mean_late()
    return res


class _NoSampler:
    def __enter__(self) -> _NoSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def mean_late(self) -> None:
        return None


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'case':22s} {'mode':11s} {'images/s':>9s} {'of ceil':>8s} {'data wait':>9s} "
            f"{'GPU util':>8s} {'1M epoch':>9s} {'wall s':>7s}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("images_per_s") is None:
            lines.append(f"{r['case']:22s} {r['mode']:11s} {'-':>9s} {'-':>8s} {'-':>9s} {'-':>8s} "
                         f"{'-':>9s} {'-':>7s}  {r['note']}")
            continue
        share = f"{100 * r['share']:.1f}%" if r.get("share") is not None else "-"
        util = f"{r['gpu_util']:.0f}%" if r.get("gpu_util") is not None else "-"
        epoch = f"{EPOCH_IMAGES / r['images_per_s'] / 60:.1f} min"
        lines.append(f"{r['case']:22s} {r['mode']:11s} {r['images_per_s']:9.1f} {share:>8s} "
                     f"{100 * r['data_wait_frac']:8.1f}% {util:>8s} {epoch:>9s} {r['wall_s']:7.1f}  {r['note']}")
    return "\n".join(lines)


def judge(row: dict[str, Any], ceiling: float | None) -> None:
    """Fill in `share` and `note` for a measured loader row against its case's ceiling."""
    if row["mode"] == "synthetic":
        row["share"], row["note"] = 1.0, "ceiling"
        return
    row["share"] = row["images_per_s"] / ceiling if ceiling else None
    if row["share"] is None:
        row["note"] = "no ceiling measured"
        return
    ok = row["share"] >= TARGET_SHARE and row["data_wait_frac"] < TARGET_WAIT
    row["note"] = "meets target" if ok else "below target"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--cases", default=DEFAULT_CASES, help="model@size:batch, comma-separated")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps per epoch (and synthetic steps)")
    ap.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)))
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--classes", type=int, default=2019)
    ap.add_argument("--json", type=Path, help="also write the rows here as JSON")
    ap.add_argument("--keep", type=Path, help="write the shards and runs here and keep them")
    args = ap.parse_args()
    cases = parse_cases(args.cases)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not cases:
        print(f"gpu_train: unknown mode(s) {unknown}; modes are {', '.join(MODES)}" if unknown
              else "gpu_train: --cases is empty", file=sys.stderr)
        return 2

    import torch

    from imatdata.errors import UserError

    if args.device in ("auto", "cuda") and not torch.cuda.is_available():
        print("gpu_train: no CUDA device here; this benchmark measures GPU training. For a "
              "smoke run on CPU: --device cpu --steps 2 --workers 1 --cases resnet18@64:8",
              file=sys.stderr)
        return 2
    if args.device == "auto":
        args.device = "cuda"
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    root = args.keep or Path(tempfile.mkdtemp(prefix="imat-bench-gpu-"))
    rows: list[dict[str, Any]] = []
    try:
        data = root / "clean"
        if any(m != "synthetic" for m in modes):
            # Every worker gets the same number of full batches: size the epoch to `steps`.
            n = args.steps * max(c.batch_size for c in cases)
            t0 = time.perf_counter()
            make_shards(data, n, args.classes)
            print(f"shards: {n} JPEGs of 448-512 px ({time.perf_counter() - t0:.1f}s to build)")
        print(f"device {gpu}; amp {args.amp}, channels_last, {args.workers} loader workers, "
              f"{args.steps} steps per measured epoch", flush=True)
        for case in cases:
            ceiling = None
            for mode in modes:
                row: dict[str, Any] = {"case": f"{case.name} b{case.batch_size}", "mode": mode}
                rows.append(row)
                if mode == "gpu-decode" and args.device != "cuda":
                    row["note"] = "skipped: needs CUDA"
                    continue
                if mode != "synthetic":
                    # Each loader epoch holds `steps` batches of this case's size.
                    _limit_rows(data, args.steps * case.batch_size)
                try:
                    row.update(measure(case, mode, data, root, args))
                except (UserError, RuntimeError) as exc:
                    row["note"] = f"failed: {str(exc).splitlines()[0][:120]}"
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if mode == "synthetic":
                    ceiling = row["images_per_s"]
                judge(row, ceiling)
                print(f"  {row['case']} {mode}: {row['images_per_s']:.1f} images/s, data wait "
                      f"{100 * row['data_wait_frac']:.1f}%", flush=True)
        print()
        print(table(rows))
        print(f"(loader modes: second epoch of two. Target: >= {100 * TARGET_SHARE:.0f}% of the "
              f"case's synthetic rate with data wait < {100 * TARGET_WAIT:.0f}%; '1M epoch' is "
              f"{EPOCH_IMAGES:,} images at that rate)")
        if args.json:
            args.json.write_text(json.dumps({"device": gpu, "rows": rows}, indent=1))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if any(str(r.get("note", "")).startswith("failed") for r in rows) else 0


def _limit_rows(data: Path, n: int) -> None:
    """Point the run at the first `n` rows: the shards are built once for the largest case,
    and a case with a smaller batch reads a prefix of them (a `train` folder of hard links)."""
    full = data.parent / "all-train"
    if not full.exists():
        (data / "train").rename(full)
    import pyarrow.parquet as pq

    train = data / "train"
    shutil.rmtree(train, ignore_errors=True)
    train.mkdir(parents=True)
    left = n
    for part in sorted(full.glob("part-*.parquet")):
        if left <= 0:
            break
        rows = pq.ParquetFile(part).metadata.num_rows
        if rows <= left:
            os.link(part, train / part.name)
        else:
            pq.write_table(pq.read_table(part).slice(0, left), train / part.name)
        left -= rows


if __name__ == "__main__":
    sys.exit(main())
