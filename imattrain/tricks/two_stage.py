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

The trainer (`engine`) evaluates, logs and saves `checkpoints/two_stage.pt` from what this
returns; this module only trains the head.
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
from imattrain import distributed as D
from imattrain.tricks.hierarchy import classifier_parameters
from imattrain.runtime import (
    build_optimizer,
    fine_logits,
    forward_backward,
    grad_scaler,
    optimizer_step,
    to_device,
    unwrap,
)
from imattrain.tricks.sampling import class_repeat_factors


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


def train_classifier_only(model: nn.Module, num_classes: int,
                          make_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                          cfg: Any, *, steps_per_epoch: int, device: torch.device | str = "cpu",
                          autocast_dtype: torch.dtype | None = None,
                          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
                          ) -> TwoStageResult:
    """Train only the leaf classifier of `model` (backbone frozen, BN in eval mode) for
    `cfg.two_stage_epochs`, with the run's optimiser settings and label smoothing.

    `make_batches(epoch)` yields `(images, labels)` for one epoch of balanced batches.
    """
    epochs, lr = cfg.two_stage_epochs, cfg.lr
    if epochs < 1:
        raise UserError(f"--two-stage-epochs must be at least 1 (got {epochs})")
    device = torch.device(device)
    inner = unwrap(model)
    head = classifier_parameters(inner, num_classes)
    before = _freeze_all_but(inner, head)
    opt = build_optimizer(cfg, inner)
    opt.zero_grad(set_to_none=True)
    scaler = grad_scaler(autocast_dtype)
    total_steps = max(1, epochs * max(1, steps_per_epoch))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    result = TwoStageResult(epochs=epochs, steps=0)

    def loss_fn(output: Any, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(fine_logits(output).float(), labels, label_smoothing=cfg.label_smoothing)

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
                images, labels = to_device(images[keep], labels[keep], device, cfg.channels_last)
                progress = min(result.steps / total_steps, 1.0)
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * progress))
                loss = forward_backward(inner, loss_fn, images, labels, autocast_dtype, scaler)
                if distributed:
                    world = torch.distributed.get_world_size()
                    for p in head:
                        if p.grad is not None:
                            torch.distributed.all_reduce(p.grad)
                            p.grad /= world
                optimizer_step(opt, scaler)
                result.steps += 1
                losses += float(loss) * len(labels)
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
    from imattrain.setup import train_loader

    loader = train_loader(cfg, data_dir, index=index, world=D.World(rank, world_size),
                          repeat_factors=class_repeat_factors(np.asarray(class_counts), "balanced"),
                          seed_offset=7919)  # a different order from the main run's epochs

    def make_batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            yield batch["image"], batch["label"]

    return train_classifier_only(model, num_classes, make_batches, cfg, steps_per_epoch=len(loader),
                                 device=device, autocast_dtype=autocast_dtype,
                                 on_epoch_end=on_epoch_end)
