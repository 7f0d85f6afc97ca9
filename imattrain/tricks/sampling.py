"""Class-aware sampling: how many copies of each training image an epoch should hold.

`class_repeat_factors(class_counts, mode)` gives, per class, the *expected* number of times
each of its images appears in one epoch. The data loader (`imattrain.data`) turns the
factors into whole repeats per epoch (stochastic rounding, reseeded every epoch), so the
epoch length stays the same as with plain instance sampling while the class mix changes:

- `instance`: every image once (factor 1) — the natural, long-tailed distribution.
- `sqrt`: class c is drawn in proportion to sqrt(n_c) (factor ∝ 1/sqrt(n_c)), the
  "square-root sampling" of Mahajan et al. (2018): a middle ground.
- `balanced`: every class equally often (factor ∝ 1/n_c), as in class-balanced sampling
  (Shen et al. 2016; Kang et al. 2020 use it for decoupled classifier re-training).

In every mode sum_c n_c * factor_c == sum_c n_c: the expected epoch length is unchanged.
Classes with no images get factor 0.
"""

from __future__ import annotations

import numpy as np

from imatdata.errors import UserError

SAMPLERS = ("instance", "sqrt", "balanced")


def class_repeat_factors(class_counts: np.ndarray, mode: str) -> np.ndarray:
    """Expected copies per image, by class, for sampler `mode` (float64, shape like counts)."""
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1:
        raise ValueError("class_counts must be one-dimensional")
    if (counts < 0).any():
        raise ValueError("class counts cannot be negative")
    present = counts > 0
    factors = np.zeros_like(counts)
    if not present.any():
        return factors
    total = counts.sum()
    if mode == "instance":
        factors[present] = 1.0
        return factors
    if mode == "sqrt":
        raw = 1.0 / np.sqrt(counts[present])
    elif mode == "balanced":
        raw = 1.0 / counts[present]
    else:
        raise UserError(f"unknown --sampler {mode!r}: choose one of {', '.join(SAMPLERS)}")
    # Normalise so the expected epoch length, sum_c n_c * f_c, equals the number of images.
    factors[present] = raw * total / float((counts[present] * raw).sum())
    return factors

