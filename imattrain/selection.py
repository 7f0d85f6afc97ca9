"""Which epoch `best.pt` holds: the latest one whose val top-3 error is within noise of the
lowest seen.

A val split of a few thousand images or fewer cannot rank epochs whose errors differ by a
few images: on the 1,000-image val of issue #17 top-3 accuracy saturated near 0.987 and
"lowest top-3 error" kept epoch 4 of 6 for a difference of 2 images, while on the test
split epoch 6 was 4 points better in top-1. Later epochs of a run have had more steps at a
lower learning rate, so among epochs the val split cannot tell apart the latest is the
better bet; an epoch that is worse by more than the noise (over-fitting, a learning-rate
restart) is not kept.

The noise is one binomial standard error of the lowest error, sqrt(p(1 - p) / n) on n
images, and never less than one image (1 / n). The val loss counts too: it ranks epochs with
much less noise than a few dozen top-3 misses, so an epoch with the lowest val loss so far
is kept when its top-3 error is within 3 margins (on Fashion-MNIST, 3 epochs from scratch:
epoch 3 had the lowest val loss and the best test top-1, but 7 more top-3 misses than epoch
2 on 1,000 val images, beyond one margin of 5). Pure Python: no torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

# How many noise margins of top-3 error an epoch with the lowest val loss may be off.
LOSS_SLACK = 3.0


def noise_margin(err: float, n: int) -> float:
    """One standard error of an error rate `err` measured on `n` images, at least 1/n."""
    if n <= 0:
        return 0.0
    p = min(max(err, 0.0), 1.0)
    return max(1.0 / n, math.sqrt(p * (1.0 - p) / n))


@dataclass
class Choice:
    """The state of the rule after some epochs (saved in every checkpoint, so a resumed run
    chooses as an uninterrupted one would)."""

    epoch: int | None = None  # epoch (1-based) best.pt holds
    top3_err: float | None = None  # its val top-3 error
    loss: float | None = None  # its val loss
    min_epoch: int | None = None  # epoch of the lowest val top-3 error so far
    min_top3_err: float | None = None
    margin: float = 0.0  # the noise margin around the lowest error
    val_images: int = 0
    min_loss: float | None = None  # the lowest val loss so far
    by_loss: bool = False  # kept for its val loss, outside the top-3 margin

    def offer(self, epoch: int, top3_err: float, loss: float, val_images: int) -> bool:
        """Consider a validated epoch (epochs come in order); True when best.pt should now
        hold it."""
        if self.min_top3_err is None or top3_err < self.min_top3_err:
            self.min_epoch, self.min_top3_err = epoch, top3_err
        lowest_loss = self.min_loss is None or loss <= self.min_loss
        if lowest_loss:
            self.min_loss = loss
        self.val_images = val_images
        self.margin = noise_margin(self.min_top3_err, val_images)
        # A tiny epsilon so that float noise in the error itself never decides.
        within = top3_err <= self.min_top3_err + self.margin + 1e-12
        # The val loss ranks epochs with far less noise than a count of top-3 misses; an
        # epoch it calls the best so far is kept unless its top-3 error is clearly worse.
        by_loss = lowest_loss and top3_err <= self.min_top3_err + LOSS_SLACK * self.margin + 1e-12
        if within or by_loss:
            self.epoch, self.top3_err, self.loss = epoch, top3_err, loss
            self.by_loss = by_loss and not within
            return True
        return False

    def reason(self) -> str:
        """Why best.pt holds its epoch, in a few words."""
        if self.epoch is None:
            return "no validated epoch"
        if self.epoch == self.min_epoch:
            return (f"lowest val top-3 error {self.top3_err:.4f} on {self.val_images} images")
        if self.by_loss:
            return (f"lowest val loss {self.loss:.4f}, val top-3 error {self.top3_err:.4f} "
                    f"within {LOSS_SLACK:g} noise margins (±{self.margin:.4f} on "
                    f"{self.val_images} images) of the lowest, {self.min_top3_err:.4f} at epoch "
                    f"{self.min_epoch or '?'}: the later epoch is kept")
        return (f"val top-3 error {self.top3_err:.4f}, within noise (±{self.margin:.4f} on "
                f"{self.val_images} images) of the lowest, {self.min_top3_err:.4f} at epoch "
                f"{self.min_epoch or '?'}: the later epoch is kept")

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> Choice:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (state or {}).items() if k in known})
