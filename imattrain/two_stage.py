"""Decoupled classifier re-training (`--two-stage`; Kang et al. 2020, "cRT").

Representation learning likes the natural (instance-sampled) distribution; the classifier
on top inherits its bias towards frequent classes. After the main run, the backbone is
frozen — its parameters get no gradient and its BatchNorm layers stay in eval mode, so
neither weights nor running statistics move — and only the linear classifier is trained
again for `cfg.two_stage_epochs` epochs on class-balanced batches (`--sampler balanced`
repeat factors), with the main run's augmentation and plain cross-entropy.

Choices, and why:
- the classifier starts from its trained weights rather than a fresh init: with the
  default 2 epochs a re-initialised head would be under-trained, while the trained one only
  has to be re-balanced (Kang et al. found both close once converged);
- the optimiser family and peak rate are the main run's (`--optimizer`, `--lr`; SGD with
  its momentum, or AdamW), decayed by a cosine over the re-training steps;
- DDP: every rank trains the same head on its own share of the data and the head's
  gradients are averaged across ranks, as DDP would.

Writes `checkpoints/two_stage.pt` (through the caller's save function, so its format is
the trainer's) and one `metrics.jsonl` record per epoch with `"phase": "two_stage"`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imatdata.errors import UserError
from imattrain.checkpoint import unwrap
from imattrain.hierarchy import classifier_parameters
from imattrain.sampling import class_repeat_factors


@dataclass
class TwoStageResult:
    epochs: int
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)


def _freeze_all_but(model: nn.Module, keep: list[nn.Parameter]) -> dict[str, bool]:
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    keep_ids = {id(p) for p in keep}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep_ids)
    return before


def _restore_requires_grad(model: nn.Module, before: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(before.get(name, True))


def make_optimizer(name: str, params: list[nn.Parameter], lr: float, momentum: float,
                   weight_decay: float, nesterov: bool) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                           weight_decay=weight_decay)


def train_classifier_only(model: nn.Module, num_classes: int,
                          make_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]], *,
                          epochs: int, steps_per_epoch: int, optimizer: str = "sgd", lr: float = 0.1,
                          momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 1e-4,
                          label_smoothing: float = 0.0, device: torch.device | str = "cpu",
                          autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
                          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
                          ) -> TwoStageResult:
    """Train only the leaf classifier of `model` (backbone frozen, BN in eval mode).

    `make_batches(epoch)` yields `(images, labels)` for one epoch of balanced batches.
    """
    if epochs < 1:
        raise UserError(f"--two-stage-epochs must be at least 1 (got {epochs})")
    device = torch.device(device)
    inner = unwrap(model)
    head = classifier_parameters(inner, num_classes)
    before = _freeze_all_but(inner, head)
    opt = make_optimizer(optimizer, head, lr, momentum, weight_decay, nesterov)
    total_steps = max(1, epochs * max(1, steps_per_epoch))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    result = TwoStageResult(epochs=epochs, steps=0)
    try:
        # eval(): BN uses (and keeps) its running statistics, dropout is off — the features
        # are exactly those the main run's model computes at test time.
        inner.eval()
        for epoch in range(epochs):
            losses, seen = 0.0, 0
            for images, labels in make_batches(epoch):
                keep = labels >= 0
                if not bool(keep.any()):
                    continue
                images = images[keep].to(device, non_blocking=True)
                labels = labels[keep].to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                progress = min(result.steps / total_steps, 1.0)
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * progress))
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    logits = inner(images)
                if isinstance(logits, tuple):
                    logits = logits[0]
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if distributed:
                    world = torch.distributed.get_world_size()
                    for p in head:
                        if p.grad is not None:
                            torch.distributed.all_reduce(p.grad)
                            p.grad /= world
                opt.step()
                result.steps += 1
                losses += float(loss.detach()) * len(labels)
                seen += len(labels)
            record = {"phase": "two_stage", "epoch": epoch + 1,
                      "loss": losses / seen if seen else float("nan"),
                      "lr": opt.param_groups[0]["lr"]}
            result.history.append(record)
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
    finally:
        _restore_requires_grad(inner, before)
    return result


def retrain_classifier(cfg: Any, model: nn.Module, *, data_dir: Any, class_counts: np.ndarray,
                       num_classes: int, device: torch.device | str, rank: int = 0, world_size: int = 1,
                       index: Any = None, autocast_dtype: torch.dtype | None = None,
                       on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> TwoStageResult:
    """The `--two-stage` phase on the trainer's own loader and augmentation (see module doc).

    `on_epoch_end(epoch, record)` lets the engine evaluate, log and checkpoint in its format.
    """
    from imattrain.data import build_loader
    from imattrain.transforms import build_train_transform

    factors = class_repeat_factors(np.asarray(class_counts), "balanced")
    loader = build_loader(data_dir, cfg.train_split, transform=build_train_transform(cfg),
                          batch_size=cfg.batch_size, workers=cfg.workers, train=True,
                          seed=cfg.seed + 7919,  # a different order from the main run's epochs
                          repeat_factors=factors, rank=rank, world_size=world_size, index=index,
                          prefetch=getattr(cfg, "prefetch", 2),
                          shuffle_buffer=getattr(cfg, "shuffle_buffer", 2048))

    def make_batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            yield batch["image"], batch["label"]

    return train_classifier_only(
        model, num_classes, make_batches, epochs=cfg.two_stage_epochs, steps_per_epoch=len(loader),
        optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay, label_smoothing=cfg.label_smoothing, device=device,
        autocast_dtype=autocast_dtype, channels_last=cfg.channels_last, on_epoch_end=on_epoch_end)


def run_after_training(trainer: Any) -> TwoStageResult:
    """The engine's hook: re-train the classifier of the finished run and write
    `checkpoints/two_stage.pt` plus metrics records (phase "two_stage").

    Works on a copy of the weights that eval/predict would use (the EMA when there is one),
    so `last.pt`/`best.pt` keep describing the main run.
    """
    import copy

    from imattrain.checkpoint import save_checkpoint
    from imattrain.engine import EpochStats, evaluate

    cfg = trainer.cfg
    source = trainer.ema.module if trainer.ema is not None else trainer.model
    model = copy.deepcopy(unwrap(source)).to(trainer.device)
    trainer.say(f"two-stage: re-training the classifier for {cfg.two_stage_epochs} epoch(s) on "
                f"class-balanced batches, backbone frozen")

    def on_epoch_end(epoch: int, record: dict[str, Any]) -> None:
        row: dict[str, Any] = {"epoch": cfg.epochs + epoch + 1, "phase": "two_stage",
                               "train_loss": record["loss"], "lr": record["lr"]}
        if trainer.val_loader is not None:
            m = evaluate(model, trainer.val_loader, trainer.device, trainer.dtype,
                         num_classes=trainer.num_classes, channels_last=cfg.channels_last)
            row.update(val_loss=m["loss"], top1=m["top1"], top3=m["top3"], top5=m["top5"],
                       top3_err=m["top3_err"], val_images=m["count"])
        trainer._append_metrics(row)
        shown = f" | val top-1 {row['top1']:.3f} top-3 {row['top3']:.3f}" if "top1" in row else ""
        trainer.say(f"two-stage epoch {epoch + 1}/{cfg.two_stage_epochs} | loss {record['loss']:.4f}{shown}")

    result = retrain_classifier(cfg, model, data_dir=trainer.data_dir, class_counts=trainer.class_counts,
                                num_classes=trainer.num_classes, device=trainer.device,
                                rank=trainer.world.rank, world_size=trainer.world.world_size,
                                index=trainer.train_index, autocast_dtype=trainer.dtype,
                                on_epoch_end=on_epoch_end)
    if trainer.world.is_main:
        state = trainer._state(cfg.epochs, 0, EpochStats())
        last = trainer.history[-1] if trainer.history else {}
        state.update(model=model.state_dict(), ema=None, optimizer=None, scheduler=None,
                     two_stage={"epochs": cfg.two_stage_epochs, "steps": result.steps,
                                "history": result.history},
                     metrics={k: last[k] for k in ("top1", "top3", "top5", "top3_err", "val_loss")
                              if k in last} or None)
        path = trainer.paths.checkpoints / "two_stage.pt"
        save_checkpoint(state, path)
        trainer.say(f"two-stage: wrote {path}")
    return result
