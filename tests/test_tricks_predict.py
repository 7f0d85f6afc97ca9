"""Eval/predict maths and files: TTA views, tau, metrics, the submission format, probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from imatdata.errors import UserError
from imattrain.predict import (
    adjust,
    compute_metrics,
    format_submission,
    log_prior,
    prior_top,
    read_probs,
    top_k,
    tta_views,
    tune_tau,
    write_probs,
    write_submission,
)


def test_submission_format_to_the_letter(tmp_path):
    ids = ["573ed2f91712.jpg", "0a1b.png", "17"]
    top3 = np.array([[2003, 5, 17], [0, 1, 2], [9, 8, 7]])
    path = write_submission(tmp_path / "sub.csv", ids, top3)
    raw = path.read_bytes()
    assert raw == b"id,predicted\n573ed2f91712.jpg,2003 5 17\n0a1b.png,0 1 2\n17,9 8 7\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError):
        format_submission(["a"], np.array([[1, 1, 2]]))


def test_top_k_orders_best_first_and_breaks_ties_by_class():
    scores = np.array([[0.1, 0.5, 0.5, 0.2, 0.9], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert top_k(scores, 3).tolist() == [[4, 1, 2], [0, 1, 2]]
    assert top_k(scores, 9).tolist() == [[4, 1, 2, 3, 0], [0, 1, 2, 3, 4]]
    assert prior_top(np.array([5, 10, 10, 1, 0])).tolist() == [1, 2, 0]


def test_metrics_against_a_hand_count():
    scores = np.array([
        [9, 8, 7, 6, 5, 0],  # label 0: top1
        [9, 8, 7, 6, 5, 0],  # label 2: top3
        [9, 8, 7, 6, 5, 0],  # label 4: top5
        [9, 8, 7, 6, 5, 0],  # label 5: miss
    ], dtype=float)
    m = compute_metrics(scores, np.array([0, 2, 4, 5]))
    assert (m.n, m.top1, m.top3, m.top5) == (4, 0.25, 0.5, 0.75)
    assert m.balanced_accuracy == 0.25
    assert [c.label for c in m.worst(2)] == [4, 5]  # ties on top-3 broken by label
    with pytest.raises(UserError):
        compute_metrics(scores, np.full(4, -1))


def test_tau_zero_is_a_no_op_and_tau_favours_rare_classes():
    rng = np.random.default_rng(0)
    logp = np.log(rng.dirichlet(np.ones(6), size=50))
    prior = log_prior(np.array([100, 50, 20, 10, 5, 0]))
    assert np.isfinite(prior).all()
    assert adjust(logp, prior, 0.0) is logp
    shifted = adjust(logp, prior, 1.0)
    # The rarest class gains the most.
    gain = (shifted - logp).mean(0)
    assert gain.argmax() == 5 and gain.argmin() == 0


def test_tau_tuning_never_hurts_val_top3():
    rng = np.random.default_rng(1)
    counts = np.array([400, 200, 100, 50, 25, 12, 6, 3])
    n = 400
    labels = rng.integers(0, 8, n)  # balanced val
    # A model biased towards the frequent classes: true logit + log prior + noise.
    logits = rng.normal(0, 1.0, (n, 8)) + np.log(counts / counts.sum())[None, :]
    logits[np.arange(n), labels] += 1.5
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    prior = log_prior(counts)
    choice = tune_tau(logp, labels, prior)
    base = compute_metrics(logp, labels)
    best = compute_metrics(adjust(logp, prior, choice.tau), labels)
    assert best.top3 >= base.top3
    assert choice.tau > 0 and best.top3 > base.top3  # here the bias is real, so it helps
    assert {r["tau"] for r in choice.grid} >= {0.0, 1.0}
    # On an unbiased model the choice stays at (or near) zero and still does not hurt.
    fair = rng.normal(0, 1.0, (n, 8))
    fair[np.arange(n), labels] += 1.5
    c2 = tune_tau(fair, labels, prior)
    assert compute_metrics(adjust(fair, prior, c2.tau), labels).top3 >= compute_metrics(fair, labels).top3


class _Net(nn.Module):
    """A model that is NOT flip-invariant: it weighs image columns differently."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, 8)[None, None, None, :])
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x * self.w).mean(dim=(2, 3)))


def test_flip_tta_changes_nothing_on_a_flip_invariant_input():
    torch.manual_seed(0)
    half = torch.rand(2, 3, 8, 4)
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)
    net = _Net().eval()
    views = tta_views(symmetric, "flip")
    assert len(views) == 2
    single = torch.softmax(net(symmetric), 1)
    averaged = torch.stack([torch.softmax(net(v), 1) for v in views]).mean(0)
    assert torch.allclose(single, averaged, atol=1e-6)
    # ... while on an ordinary input it does change the answer (the test can fail).
    x = torch.rand(2, 3, 8, 8)
    flipped = torch.stack([torch.softmax(net(v), 1) for v in tta_views(x, "flip")]).mean(0)
    assert not torch.allclose(torch.softmax(net(x), 1), flipped, atol=1e-4)


def test_five_crop_views():
    x = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).reshape(2, 3, 10, 12)
    views = tta_views(x, "five-crop", 8)
    assert [v.shape[-2:] for v in views] == [torch.Size([8, 8])] * 5
    assert torch.equal(views[0], x[..., :8, :8]) and torch.equal(views[3], x[..., 2:, 4:])
    assert torch.equal(views[4], x[..., 1:9, 2:10])
    with pytest.raises(UserError):
        tta_views(x, "ten-crop")


def test_probs_parquet_round_trip(tmp_path):
    probs = np.random.default_rng(0).dirichlet(np.ones(5), size=3).astype(np.float32)
    write_probs(tmp_path / "p.parquet", ["a", "b", "c"], probs)
    ids, back = read_probs(tmp_path / "p.parquet")
    assert ids == ["a", "b", "c"] and np.array_equal(back, probs)
    import pyarrow.parquet as pq

    assert pq.read_schema(tmp_path / "p.parquet").field("probs").type.list_size == 5


def test_a_runs_tau_is_the_default_of_eval_and_predict(tmp_path):
    """`imattrain run --tau T` is what eval/predict apply to its checkpoints unless --tau is given."""
    import torch

    from imattrain.checkpoint import load_checkpoint, save_checkpoint
    from imattrain.config import EvalConfig, PredictConfig
    from imattrain.models import build_model
    from imattrain.predict import evaluate_checkpoints, predict_submission
    from tricks_shards import write_dataset

    data = write_dataset(tmp_path / "clean", [8, 4, 2], val_per_class=2, test_rows=4, test_missing=1, size=32)
    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    state = {"model": model.state_dict(), "model_name": "resnet18", "num_classes": 3, "image_size": 32,
             "class_counts": [8, 4, 2], "config": {"image_size": 32, "tau": 0.7}}
    ckpt = save_checkpoint(state, tmp_path / "c.pt")
    assert load_checkpoint(ckpt)["config"]["tau"] == 0.7
    kw = dict(workers=0, device="cpu", batch_size=8)
    assert evaluate_checkpoints([ckpt], data, EvalConfig(**kw)).tau == 0.7
    assert evaluate_checkpoints([ckpt], data, EvalConfig(tau=0.0, **kw)).tau == 0.0
    # The default and an explicit --tau equal to it write the same submission.
    predict_submission([ckpt], data, tmp_path / "a.csv", PredictConfig(**kw))
    predict_submission([ckpt], data, tmp_path / "b.csv", PredictConfig(tau=0.7, **kw))
    predict_submission([ckpt], data, tmp_path / "c.csv", PredictConfig(tau=0.0, **kw))
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
