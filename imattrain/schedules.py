"""Learning-rate schedules, stepped once per optimiser step.

Each schedule is a picklable multiplier object for LambdaLR, so its parameters travel in the
scheduler's state dict and a resumed run continues the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from imattrain.config import TrainConfig

WARMUP_START = 0.01  # warm-up starts at 1% of the peak rate
ONECYCLE_DIV = 25.0  # torch's OneCycleLR defaults
ONECYCLE_FINAL_DIV = 1e4


@dataclass
class LrMultiplier:
    """Factor of the peak learning rate at a given optimiser step."""

    kind: str
    total_steps: int
    warmup_steps: int
    min_ratio: float
    sgdr_t0: int
    sgdr_tmult: float
    cycle_steps: int
    pct_start: float
    step_size: int
    gamma: float

    def __call__(self, step: int) -> float:
        if self.kind == "onecycle":
            return self._onecycle(step)
        if self.kind == "cyclic":
            base = self.min_ratio if self.min_ratio > 0 else 0.1
            pos = (step % self.cycle_steps) / self.cycle_steps
            return base + (1.0 - base) * (1.0 - abs(2.0 * pos - 1.0))
        if step < self.warmup_steps:
            return WARMUP_START + (1.0 - WARMUP_START) * step / self.warmup_steps
        s = step - self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            return self._cos(min(s, span) / span)
        if self.kind == "sgdr":
            start, length = sgdr_cycle(s, self.sgdr_t0, self.sgdr_tmult)
            return self._cos((s - start) / length)
        if self.kind == "step":
            return self.gamma ** (s // self.step_size)
        return 1.0  # constant

    def _cos(self, progress: float) -> float:
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _onecycle(self, step: int) -> float:
        up = max(1, int(self.pct_start * self.total_steps))
        lo = 1.0 / ONECYCLE_DIV
        if step < up:
            return _cos_between(lo, 1.0, step / up)
        down = max(1, self.total_steps - up)
        return _cos_between(1.0, lo / ONECYCLE_FINAL_DIV, min(1.0, (step - up) / down))


def _cos_between(start: float, end: float, progress: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def sgdr_cycle(step: int, t0: int, tmult: float) -> tuple[int, int]:
    """(first step, length) of the SGDR cycle holding `step` (counted after warm-up)."""
    start, length = 0, t0
    while step >= start + length:
        start += length
        length = max(1, int(round(length * tmult)))
    return start, length


def sgdr_cycle_ends(cfg: TrainConfig, steps_per_epoch: int) -> list[int]:
    """Optimiser steps (1-based counts) at which an SGDR cycle finishes within the run."""
    if cfg.schedule != "sgdr":
        return []
    cfg = cfg.resolved()
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    t0 = max(1, int(round(cfg.sgdr_t0 * steps_per_epoch)))
    ends, start, length = [], 0, t0
    while warmup + start + length <= total:
        ends.append(warmup + start + length)
        start += length
        length = max(1, int(round(length * cfg.sgdr_tmult)))
    return ends


def build_multiplier(cfg: TrainConfig, steps_per_epoch: int) -> LrMultiplier:
    cfg = cfg.resolved()
    spe = max(1, steps_per_epoch)
    return LrMultiplier(
        kind=cfg.schedule,
        total_steps=max(1, cfg.epochs * spe),
        warmup_steps=int(round(cfg.warmup_epochs * spe)),
        min_ratio=cfg.min_lr / cfg.lr,
        sgdr_t0=max(1, int(round(cfg.sgdr_t0 * spe))),
        sgdr_tmult=cfg.sgdr_tmult,
        cycle_steps=max(2, int(round(cfg.cycle_epochs * spe))),
        pct_start=cfg.pct_start,
        step_size=max(1, int(round(cfg.step_epochs * spe))),
        gamma=cfg.step_gamma,
    )


def build_scheduler(cfg: TrainConfig, optimizer: Optimizer, steps_per_epoch: int) -> LambdaLR:
    """A per-step LambdaLR over every parameter group (peak rate: each group's initial lr)."""
    return LambdaLR(optimizer, build_multiplier(cfg, steps_per_epoch))


def lr_curve(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The learning rate at every optimiser step of the run (for tests and plots)."""
    mult = build_multiplier(cfg, steps_per_epoch)
    return [cfg.lr * mult(s) for s in range(cfg.epochs * max(1, steps_per_epoch))]
