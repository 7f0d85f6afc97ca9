"""The training run: model, optimiser, schedule, AMP, EMA, DDP, checkpoints and metrics.

Shaped like torchvision's references/classification/train.py (one readable loop) with
timm's habits (every trick a flag, checkpoints that resume exactly). Rank 0 writes every
file; all ranks take part in every reduction.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imatdata.errors import UserError
from imatdata.manifest import list_shards, resolve_root, write_bytes_atomic
from imattrain import distributed as D
from imattrain.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, unwrap
from imattrain.config import TrainConfig, to_toml
from imattrain.data import (
    SplitIndex,
    build_loader,
    gpu_decode_batch,
    infer_num_classes,
    scan_split,
    validate_labels,
)
from imattrain.models import build_model
from imattrain.schedules import build_scheduler, sgdr_cycle_ends
from imattrain.transforms import build_eval_transform, build_gpu_train_transform, build_train_transform

SYNC_EVERY = 20  # optimiser steps between host syncs (loss display, non-finite check)


# --- building blocks (also used by eval / predict / lr-find) ----------------------------------


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on norm layers and biases (1-d parameters)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    raise UserError(f"unknown --optimizer {cfg.optimizer!r}")


def build_model_and_loss(cfg: TrainConfig, num_classes: int,
                         class_counts: np.ndarray) -> tuple[nn.Module, nn.Module]:
    """The network and the training loss for a config.

    The one place where model/loss variants are composed (base loss from
    `imattrain.losses`; the hierarchy heads and loss are added here when `cfg.tree` is set).
    """
    from imattrain.losses import build_loss

    model = build_model(cfg.model, num_classes, cfg.pretrained)
    loss_fn = build_loss(cfg, np.asarray(class_counts))
    if cfg.tree:
        from imattrain.hierarchy import HierarchicalLoss, HierarchicalModel

        model = HierarchicalModel(model, num_classes, cfg.tree)
        loss_fn = HierarchicalLoss(loss_fn, model.level_targets, cfg.hier_weight)
    return model, loss_fn


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None for full precision; 'auto' is bf16 on CUDA and off on CPU (slower there)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs CUDA; use --amp bf16 on CPU")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def fine_logits(output: Any) -> torch.Tensor:
    """Class logits from a model output (a tensor, or a (logits, extras) tuple)."""
    if isinstance(output, (tuple, list)):
        return output[0]
    if isinstance(output, dict):
        return output["logits"]
    return output


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, amp: str | torch.dtype | None,
             *, num_classes: int | None = None, channels_last: bool = False) -> dict[str, Any]:
    """Top-1/3/5, cross-entropy and per-class accuracy over a loader (summed over DDP ranks).

    Rows with label -1 or without an image are ignored. `amp`: 'auto'/'none'/'bf16'/'fp16'
    or a dtype. Returns top1, top3, top5, top3_err, loss, count, per_class_acc (None where a
    class has no images) and per_class_count.
    """
    dtype = amp if isinstance(amp, torch.dtype) or amp is None else autocast_dtype(amp, device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, n, c1, c3, c5
    per_correct = per_total = None
    if num_classes is not None:
        per_correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
        per_total = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for batch in loader:
        labels = batch["label"]
        keep = (labels >= 0) & batch.get("has_image", torch.ones_like(labels, dtype=torch.bool))
        if not bool(keep.any()):
            continue
        images = batch["image"][keep].to(device, non_blocking=True)
        labels = labels[keep].to(device, non_blocking=True)
        if channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = fine_logits(model(images)).float()
        if per_correct is None:
            num_classes = logits.shape[1]
            per_correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
            per_total = torch.zeros(num_classes, dtype=torch.float64, device=device)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += labels.numel()
        sums[2] += hit[:, :1].any(1).sum()
        sums[3] += hit[:, :3].any(1).sum()
        sums[4] += hit[:, :5].any(1).sum()
        per_total.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        per_correct.index_add_(0, labels, hit[:, 0].double())
    sums = D.all_sum_tensor(sums)
    if per_correct is not None:
        per_correct, per_total = D.all_sum_tensor(per_correct), D.all_sum_tensor(per_total)
    model.train(was_training)
    n = float(sums[1])
    if n == 0:
        raise UserError("no labelled images to evaluate: check --val-split and --data")
    totals = per_total.cpu().tolist() if per_total is not None else []
    correct = per_correct.cpu().tolist() if per_correct is not None else []
    top3 = float(sums[3]) / n
    return {
        "top1": float(sums[2]) / n, "top3": top3, "top5": float(sums[4]) / n,
        "top3_err": 1.0 - top3, "loss": float(sums[0]) / n, "count": int(n),
        "per_class_acc": [c / t if t else None for c, t in zip(correct, totals)],
        "per_class_count": [int(t) for t in totals],
    }


class ModelEma:
    """Exponential moving average of the weights (and float buffers), as timm's ModelEmaV2,
    with a warm-up so short runs are not dominated by the random init."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        src = unwrap(model).state_dict()
        floats_e, floats_m = [], []
        for name, e in self.module.state_dict().items():
            m = src[name]
            if e.dtype.is_floating_point:
                floats_e.append(e)
                floats_m.append(m.detach())
            else:
                e.copy_(m)
        torch._foreach_lerp_(floats_e, floats_m, 1.0 - d)


# --- the run ---------------------------------------------------------------------------------


@dataclass
class RunPaths:
    out: Path

    @property
    def config(self) -> Path:
        return self.out / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def curves(self) -> Path:
        return self.out / "curves.png"

    def snapshot(self, cycle: int) -> Path:
        return self.checkpoints / f"snapshot-cycle{cycle}.pt"


@dataclass
class RunResult:
    """What a finished (or stopped) run leaves behind."""

    out: Path
    epochs_done: int
    steps: int
    best_top3_err: float | None
    stopped_early: bool
    metrics: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EpochStats:
    """Running sums of the epoch in progress (saved mid-epoch so a resumed epoch reports whole)."""

    loss_sum: float = 0.0
    samples: int = 0
    corrupt: int = 0
    train_time: float = 0.0
    wait_time: float = 0.0


def resolve_data_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.data) if cfg.data else resolve_root(cfg.root) / "clean"


def _default_out(cfg: TrainConfig, world: D.World) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = [f"runs/{cfg.model}-{stamp}"]
    if world.distributed:
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)  # one folder for all ranks
    return Path(name[0])


class Console:
    """Rank-0, quiet-aware printing to stderr (stdout stays clean for scripts)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)


def train(cfg: TrainConfig) -> RunResult:
    """Run (or resume) training as configured; under torchrun, every rank calls this."""
    world = D.env_world()
    device = D.resolve_device(cfg.device, world)
    if device.type == "cpu":
        # Oversubscribed OpenMP threads spin against the loader workers (and other ranks):
        # on a busy 2-core machine that is 10-20x slower than one thread.
        per_rank = max(1, (os.cpu_count() or 1) // world.world_size - cfg.workers)
        torch.set_num_threads(cfg.threads or per_rank)
    else:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels
        torch.set_float32_matmul_precision("high")
    D.init(world, device)
    try:
        return _Trainer(cfg, world, device).run()
    finally:
        D.shutdown()


class _Trainer:
    def __init__(self, cfg: TrainConfig, world: D.World, device: torch.device) -> None:
        self.cfg = cfg
        self.world = world
        self.device = device
        self.say = Console(world.is_main and not cfg.quiet)

    # set-up

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.data_dir = resolve_data_dir(cfg)
        self.train_index = scan_split(self.data_dir, cfg.train_split)
        self.val_index: SplitIndex | None = None
        if cfg.val_split:
            if list_shards(self.data_dir / cfg.val_split):
                self.val_index = scan_split(self.data_dir, cfg.val_split)
            else:
                self.say(f"note: no {cfg.val_split!r} split under {self.data_dir}; "
                         f"training without validation (no best.pt)")
        indexes = [ix for ix in (self.train_index, self.val_index) if ix is not None]
        self.num_classes = cfg.num_classes or infer_num_classes(*indexes)
        validate_labels(self.train_index, self.num_classes, cfg.train_split)
        if self.val_index is not None:
            validate_labels(self.val_index, self.num_classes, cfg.val_split)
        self.class_counts = self.train_index.class_counts(self.num_classes)
        missing = int((~self.train_index.usable).sum())
        if missing:
            self.say(f"note: {missing} train rows have no usable image (status != ok); skipped")
        repeat = None
        if cfg.sampler != "instance":
            from imattrain.sampling import class_repeat_factors

            repeat = class_repeat_factors(self.class_counts, cfg.sampler)
        self.repeat_factors = repeat
        if cfg.gpu_decode and self.device.type != "cuda":
            raise UserError("--gpu-decode needs a CUDA device; drop the flag on this machine")
        self.gpu_transform = build_gpu_train_transform(cfg) if cfg.gpu_decode else None
        self.train_loader = build_loader(
            self.data_dir, cfg.train_split, transform=None if cfg.gpu_decode else
            build_train_transform(cfg), batch_size=cfg.batch_size, workers=cfg.workers,
            train=True, seed=cfg.seed, repeat_factors=repeat, rank=self.world.rank,
            world_size=self.world.world_size, index=self.train_index, raw_bytes=cfg.gpu_decode,
            prefetch=cfg.prefetch, shuffle_buffer=cfg.shuffle_buffer)
        self.batches_per_epoch = len(self.train_loader.dataset)
        if self.batches_per_epoch == 0:
            raise UserError(f"split {cfg.train_split!r} has no usable images to train on")
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.val_loader = None
        if self.val_index is not None:
            self.val_loader = build_loader(
                self.data_dir, cfg.val_split,
                transform=build_eval_transform(cfg.image_size, cfg.resolved_eval_resize),
                batch_size=cfg.batch_size, workers=cfg.workers, train=False,
                rank=self.world.rank, world_size=self.world.world_size, index=self.val_index,
                prefetch=cfg.prefetch, persistent_workers=True)

    def _setup_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model, loss_fn = build_model_and_loss(cfg, self.num_classes, self.class_counts)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.loss_fn = loss_fn.to(self.device)
        self.ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.optimizer = build_optimizer(cfg, model)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.dtype = autocast_dtype(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.cycle_ends = sgdr_cycle_ends(cfg, self.steps_per_epoch)

    def _wrap(self) -> nn.Module:
        net: nn.Module = self.model
        if self.world.distributed:
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            net = torch.compile(net)
        return net

    # state

    def _state(self, epoch: int, samples: int, stats: EpochStats) -> dict[str, Any]:
        return {
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "step": self.step,
            "data_state": {"epoch": epoch, "seed": self.cfg.seed, "samples": samples,
                           "batch_size": self.cfg.batch_size,
                           "world_size": self.world.world_size, "workers": self.cfg.workers,
                           "epoch_stats": stats.__dict__.copy()},
            "config": self.cfg.asdict(),
            "model_name": self.cfg.model,
            "num_classes": self.num_classes,
            "image_size": self.cfg.image_size,
            "class_counts": self.class_counts.tolist(),
            "best_top3_err": self.best,
            "best_val_loss": self.best_loss,
            "metrics": self.last_val,
            "rng": rng_state(),
        }

    def _save(self, path: Path, epoch: int, samples: int, stats: EpochStats) -> None:
        self._check_finite(epoch)
        if self.world.is_main:
            save_checkpoint(self._state(epoch, samples, stats), path)

    def _resume(self) -> tuple[int, int, EpochStats]:
        ckpt = load_checkpoint(self.paths.last)
        ds = ckpt["data_state"]
        for key, now in (("batch_size", self.cfg.batch_size), ("workers", self.cfg.workers),
                         ("world_size", self.world.world_size)):
            if ds[key] != now:
                raise UserError(f"--resume needs the same {key.replace('_', '-')} as the "
                                f"interrupted run ({ds[key]}, now {now}) to continue exactly")
        saved = ckpt["config"]
        for key in ("model", "seed", "sampler", "image_size", "num_classes", "train_split",
                    "grad_accum", "tree"):
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise UserError(f"--resume: {key} was {saved[key]!r} in the interrupted run, now "
                                f"{getattr(self.cfg, key)!r}; use the same value")
        if int(ckpt["num_classes"]) != self.num_classes:
            raise UserError(f"--resume: the checkpoint has {ckpt['num_classes']} classes, the "
                            f"data {self.num_classes}; pass --num-classes {ckpt['num_classes']}")
        unwrap(self.model).load_state_dict(ckpt["model"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
            self.ema.updates = int(ckpt.get("ema_updates", 0))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.best = ckpt.get("best_top3_err")
        self.best_loss = ckpt.get("best_val_loss", float("inf"))
        self.last_val = ckpt.get("metrics")
        set_rng_state(ckpt.get("rng"))
        stats = EpochStats(**ds.get("epoch_stats", {}))
        return int(ds["epoch"]), int(ds["samples"]), stats

    def _check_finite(self, epoch: int) -> None:
        bad = D.any_true(bool(self.nonfinite.item()), self.device)
        if bad:
            raise UserError(f"the loss became NaN/inf in epoch {epoch + 1} (by step {self.step}); "
                            f"stopped, the last good checkpoint is {self.paths.last}. Try a "
                            f"lower --lr, --clip-grad or --amp bf16")

    # files

    def _write_start_files(self, resumed_epoch: int | None) -> None:
        if not self.world.is_main:
            return
        self.paths.checkpoints.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(to_toml(self.cfg).encode(), self.paths.config)
        if resumed_epoch is None:
            write_bytes_atomic(b"", self.paths.metrics)
            self.history = []
            return
        # Drop lines of epochs the resumed run will write again.
        lines = []
        if self.paths.metrics.exists():
            for text in self.paths.metrics.read_text().splitlines():
                try:
                    lines.append(json.loads(text))
                except json.JSONDecodeError:
                    continue  # a line cut short by the kill; that epoch is rewritten anyway
        self.history = [m for m in lines if m["epoch"] <= resumed_epoch]
        text = "".join(json.dumps(m) + "\n" for m in self.history)
        write_bytes_atomic(text.encode(), self.paths.metrics)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.world.is_main:
            return
        with open(self.paths.metrics, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        write_curves(self.history, self.paths.curves)

    # the loop

    def run(self) -> RunResult:
        cfg = self.cfg
        self._setup_data()
        self._setup_model()
        out = Path(cfg.out) if cfg.out else None
        if cfg.resume and out is None:
            raise UserError("--resume needs --out RUN_DIR (the run to continue)")
        self.paths = RunPaths(out or _default_out(cfg, self.world))
        self.step, self.best, self.best_loss, self.last_val = 0, None, float("inf"), None
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.history: list[dict[str, Any]] = []
        start_epoch, start_samples, stats = 0, 0, EpochStats()
        if cfg.resume:
            if not self.paths.last.is_file():
                raise UserError(f"--resume: no checkpoint at {self.paths.last}")
            start_epoch, start_samples, stats = self._resume()
            self.say(f"resuming {self.paths.out} at epoch {start_epoch + 1}, step {self.step}")
        elif self.paths.last.exists():
            raise UserError(f"{self.paths.out} already holds a run: pass --resume to continue it "
                            f"or choose another --out")
        self._write_start_files(start_epoch if cfg.resume else None)
        self.say(f"run {self.paths.out}: {cfg.model}, {self.num_classes} classes, "
                 f"{int(self.class_counts.sum())} train images, {self.batches_per_epoch} batches "
                 f"per epoch per rank x {self.world.world_size} rank(s) on {self.device}")
        net = self._wrap()
        stopped = False
        for epoch in range(start_epoch, cfg.epochs):
            stopped = self._train_epoch(net, epoch, start_samples if epoch == start_epoch else 0,
                                        stats if epoch == start_epoch else EpochStats())
            if stopped:
                break
        # --- two-stage classifier re-training (tricks) ---
        if cfg.two_stage and not stopped:
            from imattrain.two_stage import run_after_training

            run_after_training(self)
        if self.world.is_main and not stopped:
            self.say(f"done: {self.paths.out} (best val top-3 error "
                     f"{'n/a' if self.best is None else f'{self.best:.4f}'})")
        return RunResult(out=self.paths.out, epochs_done=len(self.history), steps=self.step,
                         best_top3_err=self.best, stopped_early=stopped, metrics=self.history)

    def _batch_to_device(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(images, labels, corrupt count) on the device, GPU-decoding when asked."""
        corrupt = int(batch["corrupt"])
        labels = batch["label"]
        if self.cfg.gpu_decode:
            decoded = gpu_decode_batch(batch["data"], self.device)
            keep = [i for i, img in enumerate(decoded) if img is not None]
            corrupt += len(decoded) - len(keep)
            images = [self.gpu_transform(decoded[i]) for i in keep]
            labels = labels[keep]
            x = torch.stack(images) if images else torch.zeros(0, device=self.device)
        else:
            x = batch["image"].to(self.device, non_blocking=True)
        y = labels.to(self.device, non_blocking=True)
        if self.cfg.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y, corrupt

    def _train_epoch(self, net: nn.Module, epoch: int, start_samples: int,
                     stats: EpochStats) -> bool:
        """One epoch (or its rest); True when the run stops early (--max-steps)."""
        cfg, bs, accum = self.cfg, self.cfg.batch_size, self.cfg.grad_accum
        dataset = self.train_loader.dataset
        dataset.set_epoch(epoch, start_samples)
        first_batch = start_samples // bs
        net.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        shown_loss = float("nan")
        progress = _progress(self.world.is_main and not cfg.quiet, epoch, cfg.epochs,
                             self.batches_per_epoch, first_batch)
        tick = time.perf_counter()
        it = iter(self.train_loader)
        j = first_batch - 1
        last_shape: tuple[int, ...] | None = None
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            wait = time.perf_counter() - t0
            j = int(batch["batch_index"])
            x, y, corrupt = self._batch_to_device(batch)
            stats.corrupt += corrupt
            weight = 1.0
            if x.shape[0] == 0:
                # Every row of this batch was corrupt. A stand-in keeps DDP ranks in step.
                shape = last_shape or (2, 3, cfg.image_size, cfg.image_size)
                x = torch.zeros((2, *shape[1:]), device=self.device)
                y = torch.zeros(2, dtype=torch.long, device=self.device)
                weight = 0.0
            last_shape = tuple(x.shape)
            boundary = (j + 1) % accum == 0 or j + 1 == self.batches_per_epoch
            sync = self.world.distributed and not boundary
            with (net.no_sync() if sync and hasattr(net, "no_sync") else _null()):
                with torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                                    enabled=self.dtype is not None):
                    out = net(x)
                    loss = self.loss_fn(out, y)
                self.scaler.scale(loss * (weight / accum)).backward()
            detached = loss.detach().double()
            self.nonfinite |= ~torch.isfinite(detached)
            n = int(y.numel()) if weight else 0
            loss_sum += detached * n
            stats.samples += n
            stats.wait_time += wait
            if boundary:
                self._optimizer_step()
                if self.step % SYNC_EVERY == 0:
                    self._check_finite(epoch)
                    shown_loss = float(detached)
                if self.step in self.cycle_ends:
                    cycle = self.cycle_ends.index(self.step) + 1
                    self._save(self.paths.snapshot(cycle), epoch, (j + 1) * bs, stats)
            progress.advance(shown_loss)
            if boundary:
                now = time.perf_counter()
                stats.train_time += now - tick
                tick = now
                stop = cfg.max_steps and self.step >= cfg.max_steps
                periodic = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                if (stop or periodic) and j + 1 < self.batches_per_epoch:
                    stats.loss_sum += float(loss_sum)
                    loss_sum.zero_()
                    self._save(self.paths.last, epoch, (j + 1) * bs, stats)
                if stop:
                    progress.close()
                    if j + 1 < self.batches_per_epoch:
                        self.say(f"stopped at --max-steps {cfg.max_steps} (epoch {epoch + 1}, "
                                 f"batch {j + 1}/{self.batches_per_epoch}); --resume continues")
                        return True
                    break
        progress.close()
        if self.device.type == "cuda":
            # Kernels still queued belong to this epoch's time, or images/s would be flattered.
            torch.cuda.synchronize(self.device)
            stats.train_time += time.perf_counter() - tick
        stats.loss_sum += float(loss_sum)
        self._end_epoch(epoch, stats)
        return bool(cfg.max_steps and self.step >= cfg.max_steps and epoch + 1 < cfg.epochs)

    def _optimizer_step(self) -> None:
        if self.cfg.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1

    def _end_epoch(self, epoch: int, stats: EpochStats) -> None:
        cfg = self.cfg
        self._check_finite(epoch)
        loss_sum, samples, corrupt, wait, busy = D.all_sum(
            [stats.loss_sum, stats.samples, stats.corrupt, stats.wait_time, stats.train_time],
            self.device)
        ranks = self.world.world_size
        record: dict[str, Any] = {
            "epoch": epoch + 1, "step": self.step,
            "train_loss": loss_sum / samples if samples else None,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": samples / (busy / ranks) if busy else None,
            "data_wait_frac": wait / busy if busy else None,
            "corrupt_skipped": int(corrupt), "train_images": int(samples),
        }
        validate = self.val_loader is not None and (
            (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
        if validate:
            m = evaluate(unwrap(self.model), self.val_loader, self.device, self.dtype,
                         num_classes=self.num_classes, channels_last=cfg.channels_last)
            record.update(val_loss=m["loss"], top1=m["top1"], top3=m["top3"], top5=m["top5"],
                          top3_err=m["top3_err"], val_images=m["count"])
            chosen = m
            if self.ema is not None:
                e = evaluate(self.ema.module, self.val_loader, self.device, self.dtype,
                             num_classes=self.num_classes, channels_last=cfg.channels_last)
                record.update(ema_val_loss=e["loss"], ema_top1=e["top1"], ema_top3=e["top3"],
                              ema_top5=e["top5"], ema_top3_err=e["top3_err"])
                chosen = e  # best.pt and predict use the EMA weights when there are some
            self.last_val = {k: chosen[k] for k in ("top1", "top3", "top5", "top3_err", "loss")}
            # Ties in top-3 error are common on a small val split: the lower val loss wins.
            key = (chosen["top3_err"], chosen["loss"])
            if self.best is None or key < (self.best, self.best_loss):
                self.best, self.best_loss = key
                self._save(self.paths.best, epoch + 1, 0, EpochStats())
        self._append_metrics(record)
        self._save(self.paths.last, epoch + 1, 0, EpochStats())
        parts = [f"epoch {epoch + 1}/{cfg.epochs}", f"loss {record['train_loss']:.4f}"
                 if record["train_loss"] is not None else "loss n/a"]
        if validate:
            parts.append(f"val top-1 {record['top1']:.3f} top-3 {record['top3']:.3f}")
        if record["images_per_s"]:
            parts.append(f"{record['images_per_s']:.0f} img/s, data wait "
                         f"{100 * record['data_wait_frac']:.0f}%")
        self.say(" | ".join(parts))


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class _Progress:
    """A rich progress bar for one epoch (a no-op when quiet or not rank 0)."""

    def __init__(self, enabled: bool, epoch: int, epochs: int, total: int, done: int) -> None:
        self.bar = None
        if not enabled:
            return
        from rich.console import Console as RichConsole
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.bar = Progress(TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(),
                            console=RichConsole(stderr=True), transient=True)
        if not self.bar.console.is_terminal:
            self.bar = None  # logs and pipes get the one-line epoch summaries only
            return
        self.task = self.bar.add_task("train", total=total, completed=done, loss="…")
        self.bar.start()

    def advance(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1,
                            loss="…" if math.isnan(loss) else f"{loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _progress(enabled: bool, epoch: int, epochs: int, total: int, done: int) -> _Progress:
    return _Progress(enabled, epoch, epochs, total, done)


def write_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and top-3 error per epoch (matplotlib Agg), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [m.get("train_loss") for m in history], marker="o", label="train")
    if any("val_loss" in m for m in history):
        ax1.plot([m["epoch"] for m in history if "val_loss" in m],
                 [m["val_loss"] for m in history if "val_loss" in m], marker="o", label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    for key, label in (("top3_err", "val"), ("ema_top3_err", "val (EMA)")):
        pts = [(m["epoch"], m[key]) for m in history if key in m]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=label)
    ax2.set(xlabel="epoch", ylabel="top-3 error", title="top-3 error")
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(buf.getvalue(), path)
