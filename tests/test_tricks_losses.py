"""Losses and sampling factors: the formulas, checked against independent computations."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imatdata.errors import UserError
from imattrain.tricks.losses import FocalLoss, build_loss, class_balanced_weights
from imattrain.tricks.sampling import class_repeat_factors


def cfg(**kw):
    base = dict(loss="ce", focal_gamma=2.0, cb_beta=0.999, label_smoothing=0.0)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 7, generator=g) * 3
    targets = torch.randint(0, 7, (16,), generator=g)
    return logits, targets


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal_with_gamma_zero_is_cross_entropy(batch, smoothing):
    logits, targets = batch
    focal = build_loss(cfg(loss="focal", focal_gamma=0.0, label_smoothing=smoothing), np.ones(7))
    expected = F.cross_entropy(logits, targets, label_smoothing=smoothing)
    assert torch.allclose(focal(logits, targets), expected, atol=1e-6)
    # ... also with class weights (the FocalLoss building block).
    w = torch.rand(7, generator=torch.Generator().manual_seed(1)) + 0.1
    got = FocalLoss(0.0, weight=w, label_smoothing=smoothing)(logits, targets)
    assert torch.allclose(got, F.cross_entropy(logits, targets, weight=w, label_smoothing=smoothing), atol=1e-6)


def test_focal_downweights_easy_examples(batch):
    logits, targets = batch
    ce = F.cross_entropy(logits, targets, reduction="none")
    p_t = torch.exp(-ce)
    expected = ((1 - p_t) ** 2 * ce).mean()
    got = build_loss(cfg(loss="focal", focal_gamma=2.0), np.ones(7))(logits, targets)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got < ce.mean()


def test_class_balanced_weights_formula():
    counts = np.array([1000, 100, 10, 0])
    beta = 0.99
    w = class_balanced_weights(counts, beta)
    raw = np.array([(1 - beta) / (1 - beta**n) for n in counts[:3]])
    np.testing.assert_allclose(w[:3], raw / raw.sum() * 3)
    assert w[3] == 0.0
    assert w[2] > w[1] > w[0]
    # beta = 0: no re-weighting; beta -> 1: inverse frequency.
    np.testing.assert_allclose(class_balanced_weights(counts, 0.0)[:3], 1.0)
    inv = 1 / counts[:3]
    np.testing.assert_allclose(class_balanced_weights(counts, 1 - 1e-9)[:3], inv / inv.sum() * 3, rtol=1e-4)
    with pytest.raises(UserError):
        class_balanced_weights(counts, 1.0)


def test_class_balanced_loss_is_weighted_ce(batch):
    logits, targets = batch
    counts = np.array([500, 300, 100, 50, 20, 10, 5])
    loss = build_loss(cfg(loss="class-balanced", cb_beta=0.999), counts)
    w = torch.tensor(class_balanced_weights(counts, 0.999), dtype=torch.float32)
    assert torch.allclose(loss(logits, targets), F.cross_entropy(logits, targets, weight=w), atol=1e-6)


def test_ce_label_smoothing_and_ignored_labels(batch):
    logits, targets = batch
    loss = build_loss(cfg(label_smoothing=0.2), np.ones(7))
    t = targets.clone()
    t[:4] = -1
    expected = F.cross_entropy(logits[4:], targets[4:], label_smoothing=0.2)
    assert torch.allclose(loss(logits, t), expected, atol=1e-6)
    assert loss(logits, torch.full_like(t, -1)).item() == 0.0


def test_unknown_loss_is_a_user_error():
    with pytest.raises(UserError):
        build_loss(cfg(loss="hinge"), np.ones(3))


@pytest.mark.parametrize("mode", ["instance", "sqrt", "balanced"])
def test_repeat_factors_keep_epoch_length(mode):
    counts = np.round(160 * (25 / 160) ** (np.arange(11) / 10)).astype(int)
    counts = np.append(counts, 0)
    f = class_repeat_factors(counts, mode)
    assert f[-1] == 0.0
    assert np.isclose((f * counts).sum(), counts.sum())
    per_class = f * counts
    if mode == "instance":
        np.testing.assert_allclose(f[:-1], 1.0)
    elif mode == "sqrt":
        np.testing.assert_allclose(per_class[:-1] / np.sqrt(counts[:-1]),
                                   per_class[0] / np.sqrt(counts[0]))
    else:
        np.testing.assert_allclose(per_class[:-1], counts.sum() / 11)



def test_unknown_sampler_is_a_user_error():
    with pytest.raises(UserError):
        class_repeat_factors(np.array([3, 1]), "weird")
