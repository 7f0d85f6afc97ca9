"""Learning-rate range test (Smith 2015; the fastai "lr_find").

The learning rate grows exponentially from `start_lr` to `end_lr` over `steps` optimiser
steps on the real loader and model; the loss is smoothed with a bias-corrected
exponential moving average, and the test stops early once the smoothed loss exceeds
`diverge_factor` times its best value (or turns non-finite). Model and optimiser state
(weights, BN statistics, momentum buffers) are restored afterwards, so a caller can go on
training from exactly where it was.

Suggested rate — the rule, documented because different tools pick differently:
the learning rate where the smoothed loss falls fastest (the most negative slope of
smoothed loss against log10(lr)), looked for between the first tenth of the curve (too
noisy) and the minimum of the smoothed loss. When that region is too short to have a
slope (the loss never went down), fall back to (lr at the minimum) / 10. Both figures are
reported.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imatdata.errors import UserError
from imatdata.storage import as_location, write_bytes_atomic
from imattrain import distributed as D
from imattrain.config import LRFindConfig, TrainConfig
from imattrain.runtime import forward_backward, grad_scaler, optimizer_step, resolve_device, to_device


@dataclass
class LRFindResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    steepest_lr: float | None = None
    min_lr: float | None = None  # lr at the minimum of the smoothed loss
    suggested_lr: float | None = None
    rule: str = ""
    diverged: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_schedule(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
    if not (start_lr > 0 and end_lr > start_lr):
        raise UserError(f"lr-find needs 0 < --start-lr < --end-lr (got {start_lr} and {end_lr})")
    if steps < 2:
        raise UserError(f"lr-find needs --steps >= 2 (got {steps})")
    return start_lr * (end_lr / start_lr) ** (np.arange(steps) / (steps - 1))


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float | None, float | None, float | None, str]:
    """(steepest lr, min lr, suggested lr, rule used) — see the module doc."""
    if not smoothed:
        return None, None, None, "no points"
    y = np.asarray(smoothed, dtype=np.float64)
    x = np.log10(np.asarray(lrs, dtype=np.float64))
    finite = np.isfinite(y)
    if not finite.any():
        return None, None, None, "no finite loss"
    i_min = int(np.nanargmin(np.where(finite, y, np.nan)))
    min_lr = float(lrs[i_min])
    skip = max(1, len(y) // 10)
    steepest = None
    if i_min - skip >= 2:
        seg_x, seg_y = x[skip:i_min + 1], y[skip:i_min + 1]
        slope = np.gradient(seg_y, seg_x)
        j = int(np.argmin(slope))
        if slope[j] < 0:
            steepest = float(10 ** seg_x[j])
    if steepest is not None:
        return steepest, min_lr, steepest, "steepest descent of the smoothed loss"
    return None, min_lr, min_lr / 10, "minimum of the smoothed loss / 10"


def _cycle(make_batches: Callable[[int], Iterable[Any]]) -> Iterator[Any]:
    epoch = 0
    while True:
        empty = True
        for batch in make_batches(epoch):
            empty = False
            yield batch
        if empty:
            raise UserError("lr-find: the training loader yielded no batches (is the train split empty?)")
        epoch += 1


def lr_range_test(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                  make_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]], *,
                  start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
                  device: torch.device | str = "cpu", beta: float = 0.98, diverge_factor: float = 4.0,
                  autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
                  accumulate: int = 1) -> LRFindResult:
    """Run the range test; `make_batches(epoch)` yields `(images, labels)` pairs and is called
    again (next epoch) when one pass is too short for `steps`. Model and optimiser are restored."""
    device = torch.device(device)
    schedule = lr_schedule(start_lr, end_lr, steps)
    model_state = copy.deepcopy(model.state_dict())
    optim_state = copy.deepcopy(optimizer.state_dict())
    was_training = model.training
    result = LRFindResult()
    scaler = grad_scaler(autocast_dtype)
    avg, best = 0.0, math.inf
    batches = _cycle(make_batches)
    try:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        for i, lr in enumerate(schedule):
            for group in optimizer.param_groups:
                group["lr"] = float(lr)
            total = 0.0
            for _ in range(max(1, accumulate)):
                images, labels = next(batches)
                images, labels = to_device(images, labels, device, channels_last)
                loss = forward_backward(model, loss_fn, images, labels, autocast_dtype, scaler,
                                        1 / max(1, accumulate))
                total += float(loss) / max(1, accumulate)
            optimizer_step(optimizer, scaler)
            avg = beta * avg + (1 - beta) * total
            smooth = avg / (1 - beta ** (i + 1))
            result.lrs.append(float(lr))
            result.losses.append(total)
            result.smoothed.append(smooth)
            if not math.isfinite(smooth) or smooth > diverge_factor * best:
                result.diverged = True
                break
            best = min(best, smooth)
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    result.steepest_lr, result.min_lr, result.suggested_lr, result.rule = suggest(result.lrs, result.smoothed)
    return result


def plot_lr_find(result: LRFindResult, out: Path, title: str = "learning-rate range test") -> Path:
    """Raw and smoothed loss against lr (log scale), the suggestion marked; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss")
        ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed loss")
        if result.suggested_lr:
            ax.axvline(result.suggested_lr, color="C3", ls="--",
                       label=f"suggested {result.suggested_lr:.2e} ({result.rule})")
        if result.min_lr:
            ax.axvline(result.min_lr, color="C2", ls=":", label=f"minimum {result.min_lr:.2e}")
        ax.set_xscale("log")
        finite = [v for v in result.smoothed if math.isfinite(v)]
        if finite:
            # Keep the divergence spike from flattening the interesting part of the curve.
            lo, first = min(finite), finite[0]
            ax.set_ylim(lo - 0.05 * abs(lo), max(first, lo) * 1.5 + 1e-3)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    out = as_location(out)
    write_bytes_atomic(buf.getvalue(), out)
    return out


def default_plot_path(cfg: TrainConfig) -> Path:
    if cfg.out:
        return as_location(cfg.out) / "lr_find.png"
    from datetime import datetime, timezone

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"lr-find-{cfg.model}-{stamp}" / "lr_find.png"


def run_lr_find(cfg: TrainConfig, test: LRFindConfig, *,
                say: Callable[[str], None] = lambda _m: None) -> tuple[LRFindResult, Path]:
    """The range test `test` on the run's own data, sampler, augmentation, model, loss and
    optimiser (what `imattrain run` with the same flags would train); writes the plot (to
    `test.plot`, else `default_plot_path`) and a JSON of the curve beside it. `test.force` is
    the caller's to check (see `predict.check_outputs`)."""
    import json

    from imattrain.setup import Session

    device = resolve_device(cfg.device)
    session = Session.from_config(cfg, D.World(), device)
    # CPU decoding even with --gpu-decode: a few hundred batches do not need the GPU's.
    loader = session.train_loader()
    model, loss_fn, optimizer = session.model, session.loss_fn, session.optimizer

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            if batch["image"].shape[0]:
                yield batch["image"], batch["label"]

    say(f"lr-find: {cfg.model}, {session.num_classes} classes, lr {test.start_lr:g} -> {test.end_lr:g} "
        f"over {test.steps} steps on {device}")
    result = lr_range_test(model, optimizer, loss_fn, batches, start_lr=test.start_lr, end_lr=test.end_lr,
                           steps=test.steps, device=device, autocast_dtype=session.dtype,
                           channels_last=cfg.channels_last, accumulate=cfg.grad_accum)
    plot = as_location(test.plot) if test.plot is not None else default_plot_path(cfg)
    plot_lr_find(result, plot, title=f"lr-find: {cfg.model}, batch {cfg.batch_size}, {cfg.optimizer}")
    write_bytes_atomic(json.dumps(result.to_dict(), indent=2).encode(), plot.with_suffix(".json"))
    return result, plot
