"""Training losses for long-tailed classification: CE (+ label smoothing), focal, class-balanced.

`build_loss(cfg, class_counts)` is the one entry point the engine calls. Every loss takes
`(logits, targets)` and returns a scalar; targets of -1 (rows with a null label) are ignored.

- `ce`: softmax cross-entropy, optionally with label smoothing.
- `focal`: Lin et al. (2017), softmax form: ``-(1 - p_t)^gamma * log p_t``. gamma = 0 is
  exactly CE (also with label smoothing, which is applied to the log-probabilities the same
  way CrossEntropyLoss does).
- `class-balanced`: Cui et al. (2019) re-weighting by the inverse *effective number of
  samples* ``E_n = (1 - beta^n) / (1 - beta)``: ``w_c = (1 - beta) / (1 - beta^n_c)``,
  normalised so the weights of the classes present in the training set sum to their count
  (the loss keeps the scale of plain CE). The weighted loss is softmax CE, whatever
  ``--focal-gamma`` says: one flag means one change, so a benchmark row measures one idea
  (`FocalLoss` takes the same weights for anyone who wants both). Classes absent from the
  training set get weight 0 (they never occur as targets).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imatdata.errors import UserError

LOSSES = ("ce", "focal", "class-balanced")
IGNORE_INDEX = -1


def class_balanced_weights(class_counts: np.ndarray, beta: float) -> np.ndarray:
    """Cui et al. weights ``(1 - beta) / (1 - beta^n)``, normalised to sum to the number of
    classes with at least one sample; 0 for empty classes.

    beta = 0 gives all-ones (no re-weighting); beta -> 1 approaches inverse frequency.
    """
    if not 0.0 <= beta < 1.0:
        raise UserError(f"--cb-beta must be in [0, 1), got {beta}: try 0.999 or 0.9999")
    counts = np.asarray(class_counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    # 1 - beta^n computed as -expm1(n * log(beta)) to stay accurate for beta close to 1.
    if beta == 0.0:
        weights[present] = 1.0
    else:
        effective = -np.expm1(counts[present] * np.log(beta)) / (1.0 - beta)
        weights[present] = 1.0 / effective
    total = weights.sum()
    if total > 0:
        weights *= present.sum() / total
    return weights


class FocalLoss(nn.Module):
    """Softmax focal loss with optional per-class weights and label smoothing.

    With gamma = 0 it reduces to `F.cross_entropy(logits, targets, weight, label_smoothing)`
    (tested), so the flag can be swept from 0 without a discontinuity.
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if gamma < 0:
            raise UserError(f"--focal-gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        keep = targets != IGNORE_INDEX
        logits, targets = logits[keep], targets[keep]
        if targets.numel() == 0:
            # Nothing labelled in this batch: a zero that still carries a graph.
            return logits.sum() * 0.0
        logp = F.log_softmax(logits, dim=1)
        logp_t = logp.gather(1, targets[:, None]).squeeze(1)
        # Gradients flow through the modulating factor too, as in the paper.
        modulator = (1.0 - logp_t.exp()).clamp_min(0.0).pow(self.gamma) if self.gamma else 1.0
        nll = -logp_t
        if self.label_smoothing > 0:
            # CrossEntropyLoss's smoothing: (1-eps)*nll + eps * mean over classes of -log p_c.
            # (With class weights it weighs each class's term by that class's weight.)
            if self.weight is not None:
                smooth = -(logp * self.weight[None, :]).sum(1) / logits.shape[1]
            else:
                smooth = -logp.mean(1)
            per_sample_ls = (1 - self.label_smoothing) * nll * (
                self.weight[targets] if self.weight is not None else 1.0
            ) + self.label_smoothing * smooth
            loss = modulator * per_sample_ls
        else:
            loss = modulator * nll
            if self.weight is not None:
                loss = loss * self.weight[targets]
        if self.weight is not None:
            return loss.sum() / self.weight[targets].sum().clamp_min(1e-12)
        return loss.mean()


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy in float32 (logits may come from autocast) that ignores label -1."""

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if bool((targets == IGNORE_INDEX).all()):
            return logits.float().sum() * 0.0
        return F.cross_entropy(logits.float(), targets, weight=self.weight,
                               ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing)


def _get(cfg: Any, name: str, default: Any) -> Any:
    return getattr(cfg, name, default)


def build_loss(cfg: Any, class_counts: np.ndarray) -> nn.Module:
    """The training loss named by `cfg.loss` (ce | focal | class-balanced).

    `class_counts[c]` is the number of training images of class c (what the checkpoint
    stores); only `class-balanced` uses it.
    """
    name = str(_get(cfg, "loss", "ce"))
    smoothing = float(_get(cfg, "label_smoothing", 0.0) or 0.0)
    if not 0.0 <= smoothing < 1.0:
        raise UserError(f"--label-smoothing must be in [0, 1), got {smoothing}")
    if name == "ce":
        return WeightedCrossEntropy(label_smoothing=smoothing)
    if name == "focal":
        return FocalLoss(gamma=float(_get(cfg, "focal_gamma", 2.0)), label_smoothing=smoothing)
    if name == "class-balanced":
        counts = np.asarray(class_counts)
        if counts.size == 0 or counts.sum() == 0:
            raise UserError("--loss class-balanced needs training class counts, but the train split has no labels")
        w = class_balanced_weights(counts, float(_get(cfg, "cb_beta", 0.999)))
        return WeightedCrossEntropy(weight=torch.tensor(w, dtype=torch.float32), label_smoothing=smoothing)
    raise UserError(f"unknown --loss {name!r}: choose one of {', '.join(LOSSES)}")
