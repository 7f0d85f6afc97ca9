"""The training run: model, optimiser, schedule, AMP, EMA, DDP, checkpoints and metrics.

Shaped like torchvision's references/classification/train.py (one readable loop) with
timm's habits (every trick a flag, checkpoints that resume exactly). Rank 0 writes every
file; all ranks take part in every reduction.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imatdata import storage
from imatdata.errors import UserError
from imatdata.procs import available_cpus
from imattrain import distributed as D
from imattrain.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from imattrain.config import TrainConfig, to_toml
from imattrain.data import gpu_decode_batch
from imattrain.runtime import (
    Console,
    EpochProgress,
    LoaderLoad,
    ModelEma,
    cpu_threads,
    evaluate,
    forward_backward,
    grad_scaler,
    optimizer_step,
    resolve_device,
    unwrap,
)
from imattrain.schedules import build_scheduler, sgdr_cycle_ends
from imattrain.selection import Choice
from imattrain.setup import Session
from imattrain.transforms import build_gpu_train_transform

SYNC_EVERY = 20  # optimiser steps between host syncs (loss display, non-finite check)


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


def _default_out(cfg: TrainConfig, world: D.World) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = [f"runs/{cfg.model}-{stamp}"]
    if world.distributed:
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)  # one folder for all ranks
    return Path(name[0])


def train(cfg: TrainConfig, *, train_rows: Any = None) -> RunResult:
    """Run (or resume) training as configured; under torchrun, every rank calls this.
    `train_rows`: a bool mask of the train rows to use (`imattrain audit`'s folds)."""
    auto = cfg.auto_fields()
    cfg = cfg.resolved()  # the auto recipe values (config.auto_recipe), saved as resolved
    world = D.env_world()
    device = resolve_device(cfg.device, world)
    if cfg.gpu_decode and device.type != "cuda":
        raise UserError("--gpu-decode needs a CUDA device; drop the flag on this machine")
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.threads, cfg.workers, world.world_size))
    else:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels
        torch.set_float32_matmul_precision("high")
    D.init(world, device)
    try:
        return _Trainer(cfg, world, device, auto, train_rows).run()
    finally:
        D.shutdown()


class _Trainer:
    """One run: the session's data, model and optimiser, plus what only a run has (schedule,
    loss scaler, EMA, run folder, best-so-far) and its loop."""

    def __init__(self, cfg: TrainConfig, world: D.World, device: torch.device,
                 auto: list[str] | None = None, train_rows: Any = None) -> None:
        self.cfg, self.world, self.device = cfg, world, device
        self.auto = auto or []
        self.say = Console(world.is_main and not cfg.quiet)
        s = self.session = Session.from_config(cfg, world, device, self.say,
                                               train_rows=train_rows)
        self.model, self.loss_fn, self.optimizer, self.dtype = s.model, s.loss_fn, s.optimizer, s.dtype
        self.num_classes, self.class_counts = s.num_classes, s.class_counts
        self.gpu_transform = build_gpu_train_transform(cfg) if cfg.gpu_decode else None
        self.train_loader = s.train_loader(gpu_decode=cfg.gpu_decode)
        self.val_loader = s.val_loader()
        self.batches_per_epoch = len(self.train_loader.dataset)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.ema = ModelEma(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.scaler = grad_scaler(self.dtype)
        self.cycle_ends = sgdr_cycle_ends(cfg, self.steps_per_epoch)
        out = storage.location(cfg.out, "--out") if cfg.out else None
        if cfg.resume and out is None:
            raise UserError("--resume needs --out RUN_DIR (the run to continue)")
        self.paths = RunPaths(out or _default_out(cfg, world))
        self.step = 0
        self.choice = Choice()  # which validated epoch best.pt holds (imattrain.selection)
        self.last_val: dict[str, float] | None = None
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        # On a CPU device the model starts on all of this rank's cores and gives back those
        # the loader workers turn out to keep busy (runtime.cpu_threads).
        measure = device.type == "cpu" and cfg.threads == 0 and cfg.workers > 0
        self.loader_load = LoaderLoad() if measure else None
        self.threads_chosen: int | None = None
        self.history: list[dict[str, Any]] = []

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
                           "threads": self.threads_chosen,
                           "epoch_stats": stats.__dict__.copy()},
            "config": self.cfg.asdict(),
            "model_name": self.cfg.model,
            "num_classes": self.num_classes,
            "image_size": self.cfg.image_size,
            "class_counts": self.class_counts.tolist(),
            "best_top3_err": self.choice.top3_err,
            "best_val_loss": self.choice.loss,
            "selection": self.choice.state_dict(),
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
        selection = ckpt.get("selection")
        if selection is None and ckpt.get("best_top3_err") is not None:
            # A checkpoint from before the selection rule: its best so far, epoch unknown.
            err, loss = float(ckpt["best_top3_err"]), ckpt.get("best_val_loss")
            selection = {"top3_err": err, "min_top3_err": err, "loss": loss, "min_loss": loss}
        self.choice = Choice.from_state(selection)
        self.last_val = ckpt.get("metrics")
        set_rng_state(ckpt.get("rng"))
        if self.loader_load is not None and ds.get("threads"):
            # The thread count changes the rounding of sums: keep the interrupted run's.
            self.threads_chosen = int(ds["threads"])
            torch.set_num_threads(self.threads_chosen)
            self.loader_load = None
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
        storage.make_dirs(self.paths.checkpoints)
        # Auto values stay auto in the file, so `--config` with another --epochs or
        # --image-size derives them again; the values used are in every checkpoint's config.
        given = dataclasses.replace(self.cfg, **{name: "auto" if name == "augment" else None
                                                 for name in self.auto})
        storage.write_bytes_atomic(to_toml(given).encode(), self.paths.config)
        if resumed_epoch is None:
            self.history = []
        else:
            # Drop lines of epochs the resumed run will write again.
            lines = []
            if storage.exists(self.paths.metrics):
                for text in storage.read_bytes(self.paths.metrics).decode("utf-8").splitlines():
                    try:
                        lines.append(json.loads(text))
                    except json.JSONDecodeError:
                        continue  # a line cut short (older runs appended); that epoch is rewritten anyway
            self.history = [m for m in lines if m["epoch"] <= resumed_epoch]
        self._write_metrics()

    def _write_metrics(self) -> None:
        # The whole file, rewritten atomically, rather than appended to: an object store has no
        # append, and at one line per epoch the file stays a few kilobytes.
        text = "".join(json.dumps(m) + "\n" for m in self.history)
        storage.write_bytes_atomic(text.encode("utf-8"), self.paths.metrics)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.world.is_main:
            return
        self._write_metrics()
        write_curves(self.history, self.paths.curves)

    # the loop

    def run(self) -> RunResult:
        cfg = self.cfg
        start_epoch, start_samples, stats = 0, 0, EpochStats()
        if cfg.resume:
            if not storage.is_file(self.paths.last):
                raise UserError(f"--resume: no checkpoint at {self.paths.last}")
            start_epoch, start_samples, stats = self._resume()
            self.say(f"resuming {self.paths.out} at epoch {start_epoch + 1}, step {self.step}")
        elif storage.exists(self.paths.last):
            raise UserError(f"{self.paths.out} already holds a run: pass --resume to continue it "
                            f"or choose another --out")
        self._write_start_files(start_epoch if cfg.resume else None)
        self.say(f"run {self.paths.out}: {cfg.model}, {self.num_classes} classes, "
                 f"{int(self.class_counts.sum())} train images, {self.batches_per_epoch} batches "
                 f"per epoch per rank x {self.world.world_size} rank(s) on {self.device}")
        if self.auto:
            start = "pretrained weights" if cfg.pretrained else "scratch"
            basic_only = ("crop_scale", "rotation", "color_jitter")
            shown = ", ".join(
                f"{name.replace('_', '-')} {getattr(cfg, name)}" for name in self.auto
                if cfg.augment == "basic" or name not in basic_only)
            self.say(f"recipe: {shown} (auto for {cfg.epochs} epochs from {start}; "
                     f"flags override)")
        net = self._wrap()
        stopped = False
        for epoch in range(start_epoch, cfg.epochs):
            stopped = self._train_epoch(net, epoch, start_samples if epoch == start_epoch else 0,
                                        stats if epoch == start_epoch else EpochStats())
            if stopped:
                break
        # --- two-stage classifier re-training (tricks) ---
        if cfg.two_stage and not stopped:
            self._two_stage()
        if self.world.is_main and not stopped:
            chosen = (f"best.pt: epoch {self.choice.epoch}, {self.choice.reason()}"
                      if self.choice.epoch is not None else "no validation: use last.pt")
            self.say(f"done: {self.paths.out} ({chosen})")
        return RunResult(out=self.paths.out, epochs_done=len(self.history), steps=self.step,
                         best_top3_err=self.choice.top3_err, stopped_early=stopped,
                         metrics=self.history)

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
        progress = EpochProgress(self.world.is_main and not cfg.quiet, epoch, cfg.epochs,
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
            if self.loader_load is not None and self.loader_load.add(batch.get("cpu_time", 0.0),
                                                                      t0 + wait):
                self._choose_threads()
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
            with net.no_sync() if sync and hasattr(net, "no_sync") else nullcontext():
                detached = forward_backward(net, self.loss_fn, x, y, self.dtype, self.scaler,
                                            weight / accum).double()
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

    def _choose_threads(self) -> None:
        assert self.loader_load is not None and self.loader_load.cores is not None
        busy = self.loader_load.cores
        self.threads_chosen = cpu_threads(0, self.cfg.workers, self.world.world_size, busy)
        if self.threads_chosen != torch.get_num_threads():
            torch.set_num_threads(self.threads_chosen)
        self.say(f"cpu: {self.cfg.workers} loader worker(s) keep {busy:.2f} core(s) busy; the "
                 f"model runs on {self.threads_chosen} thread(s) of {available_cpus()} core(s) "
                 f"(--threads N to choose)")
        self.loader_load = None

    def _optimizer_step(self) -> None:
        optimizer_step(self.optimizer, self.scaler, self.cfg.clip_grad)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1

    def _two_stage(self) -> None:
        """Re-train the classifier (`--two-stage`) and write `checkpoints/two_stage.pt` plus
        metrics records with phase "two_stage".

        Works on a copy of the weights that eval/predict would use (the EMA when there is
        one), so `last.pt`/`best.pt` keep describing the main run.
        """
        from imattrain.tricks.two_stage import retrain_classifier

        cfg = self.cfg
        source = self.ema.module if self.ema is not None else self.model
        model = copy.deepcopy(unwrap(source)).to(self.device)
        self.say(f"two-stage: re-training the classifier for {cfg.two_stage_epochs} epoch(s) on "
                 f"class-balanced batches, backbone frozen")

        def on_epoch_end(epoch: int, record: dict[str, Any]) -> None:
            row: dict[str, Any] = {"epoch": cfg.epochs + epoch + 1, "phase": "two_stage",
                                   "train_loss": record["loss"], "lr": record["lr"]}
            if self.val_loader is not None:
                row.update(_val_fields(evaluate(model, self.val_loader, self.device, self.dtype,
                                                num_classes=self.num_classes,
                                                channels_last=cfg.channels_last)))
            self._append_metrics(row)
            shown = f" | val top-1 {row['top1']:.3f} top-3 {row['top3']:.3f}" if "top1" in row else ""
            self.say(f"two-stage epoch {epoch + 1}/{cfg.two_stage_epochs} | "
                     f"loss {record['loss']:.4f}{shown}")

        s = self.session
        result = retrain_classifier(cfg, model, data_dir=s.data_dir, class_counts=s.class_counts,
                                    num_classes=s.num_classes, device=self.device,
                                    rank=self.world.rank, world_size=self.world.world_size,
                                    index=s.train_index, autocast_dtype=self.dtype,
                                    on_epoch_end=on_epoch_end)
        if not self.world.is_main:
            return
        state = self._state(cfg.epochs, 0, EpochStats())
        last = self.history[-1] if self.history else {}
        state.update(model=model.state_dict(), ema=None, optimizer=None, scheduler=None,
                     two_stage={"epochs": cfg.two_stage_epochs, "steps": result.steps,
                                "history": result.history},
                     metrics={k: last[k] for k in ("top1", "top3", "top5", "top3_err", "val_loss")
                              if k in last} or None)
        path = self.paths.checkpoints / "two_stage.pt"
        save_checkpoint(state, path)
        self.say(f"two-stage: wrote {path}")

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
        if self.device.type == "cpu":
            record["threads"] = torch.get_num_threads()
        validate = self.val_loader is not None and (
            (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
        if validate:
            m = evaluate(unwrap(self.model), self.val_loader, self.device, self.dtype,
                         num_classes=self.num_classes, channels_last=cfg.channels_last)
            record.update(_val_fields(m))
            chosen = m
            if self.ema is not None:
                e = evaluate(self.ema.module, self.val_loader, self.device, self.dtype,
                             num_classes=self.num_classes, channels_last=cfg.channels_last)
                record.update(ema_val_loss=e["loss"], ema_top1=e["top1"], ema_top3=e["top3"],
                              ema_top5=e["top5"], ema_top3_err=e["top3_err"])
                chosen = e  # best.pt and predict use the EMA weights when there are some
            self.last_val = {k: chosen[k] for k in ("top1", "top3", "top5", "top3_err", "loss")}
            # The latest epoch within noise of the lowest top-3 error (imattrain.selection):
            # a small or saturated val split cannot rank epochs a few images apart.
            if self.choice.offer(epoch + 1, chosen["top3_err"], chosen["loss"], chosen["count"]):
                self._save(self.paths.best, epoch + 1, 0, EpochStats())
            record["best_epoch"] = self.choice.epoch
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


def _val_fields(m: dict[str, Any]) -> dict[str, Any]:
    """The validation figures a metrics.jsonl record carries."""
    return {"val_loss": m["loss"], "top1": m["top1"], "top3": m["top3"], "top5": m["top5"],
            "top3_err": m["top3_err"], "val_images": m["count"]}


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
    storage.write_bytes_atomic(buf.getvalue(), path)
