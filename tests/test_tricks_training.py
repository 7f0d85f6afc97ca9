"""Two-stage re-training, hierarchy heads and lr-find on real tiny models and real shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from imatdata.errors import UserError
from imattrain.tricks.hierarchy import (
    HierarchicalLoss,
    HierarchicalModel,
    find_classifier,
    rebuild_from_state_dict,
)
from imattrain.lrfind import lr_range_test, plot_lr_find, suggest
from imattrain.tricks.two_stage import retrain_classifier
from tricks_shards import single_thread_torch, write_dataset

COUNTS = [24, 12, 6, 4]
_one_thread = pytest.fixture(autouse=True)(single_thread_torch)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tricks") / "clean", COUNTS, size=32)


def _cfg(**kw):
    from imattrain.config import TrainConfig

    base = dict(model="resnet18", image_size=32, batch_size=8, workers=0, epochs=1, lr=0.05,
                two_stage_epochs=2, device="cpu", augment="basic")
    base.update(kw)
    return TrainConfig(**base)


def test_two_stage_freezes_the_backbone(data_dir):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=len(COUNTS))
    model.train()  # as it comes out of the main run: BN in train mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[dict] = []
    result = retrain_classifier(_cfg(), model, data_dir=data_dir, class_counts=np.array(COUNTS),
                                num_classes=len(COUNTS), device="cpu",
                                on_epoch_end=lambda e, r: seen.append(r))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # The last Linear of classifier = Sequential(Linear, Hardswish, Dropout, Linear); the
    # first Linear and every BN statistic stay as they were.
    assert changed == {"classifier.3.weight", "classifier.3.bias"}
    assert result.steps > 0 and [r["epoch"] for r in seen] == [1, 2]
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    # Balanced batches: the 4 classes appear about equally often in an epoch.
    from imattrain.data import build_loader
    from imattrain.tricks.sampling import class_repeat_factors

    loader = build_loader(data_dir, "train", transform=None, batch_size=8, workers=0, train=True,
                          repeat_factors=class_repeat_factors(np.array(COUNTS), "balanced"))
    labels = np.concatenate([b["label"].numpy() for b in loader])
    share = np.bincount(labels, minlength=4) / len(labels)
    assert share.min() > 0.15, share


def test_two_stage_on_a_hierarchical_model_trains_the_leaf_head(data_dir, tmp_path):
    tree = _tree_file(tmp_path)
    torch.manual_seed(0)
    model = HierarchicalModel(torchvision.models.resnet18(num_classes=4), 4, tree)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    retrain_classifier(_cfg(two_stage_epochs=1), model, data_dir=data_dir, class_counts=np.array(COUNTS),
                       num_classes=4, device="cpu")
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == {"leaf_head.weight", "leaf_head.bias"}


def _tree_file(tmp_path: Path) -> Path:
    import json

    tree = {"a": {"a1": {"x": ["0", "1"]}, "a2": {"y": ["2"]}}, "b": {"b1": {"z": ["3"]}}}
    path = tmp_path / "tree.json"
    path.write_text(json.dumps(tree))
    return path


def test_hierarchical_model_heads_and_round_trip(tmp_path):
    tree = _tree_file(tmp_path)
    torch.manual_seed(0)
    model = HierarchicalModel(torchvision.models.mobilenet_v3_small(num_classes=4), 4, tree)
    assert model.level_sizes == [2, 3, 3]
    assert model.level_targets.tolist() == [[0, 0, 0], [0, 0, 0], [0, 1, 1], [1, 2, 2]]
    x = torch.rand(2, 3, 32, 32)
    model.train()
    leaf, levels = model(x)
    assert leaf.shape == (2, 4) and [t.shape[1] for t in levels] == [2, 3, 3]
    base = nn.CrossEntropyLoss()
    loss = HierarchicalLoss(base, model.level_targets, weight=0.5)
    y = torch.tensor([1, 3])
    expected = base(leaf, y) + 0.5 * torch.stack([
        nn.functional.cross_entropy(levels[0], torch.tensor([0, 1])),
        nn.functional.cross_entropy(levels[1], torch.tensor([0, 2])),
        nn.functional.cross_entropy(levels[2], torch.tensor([0, 2])),
    ]).mean()
    assert torch.allclose(loss((leaf, levels), y), expected)
    assert torch.allclose(loss(leaf, y), base(leaf, y))
    # Eval mode: leaf logits only; a fresh backbone + the state dict rebuilds it exactly.
    model.eval()
    rebuilt = rebuild_from_state_dict(torchvision.models.mobilenet_v3_small(num_classes=4), 4,
                                      model.state_dict())
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    assert torch.allclose(model(x), rebuilt(x))
    plain = torchvision.models.resnet18(num_classes=4)
    assert rebuild_from_state_dict(plain, 4, plain.state_dict()) is plain
    with pytest.raises(UserError):
        find_classifier(nn.Sequential(nn.Conv2d(3, 4, 1)), 4)


def test_lr_find_restores_weights_and_optimizer(data_dir, tmp_path):
    from imattrain.data import build_loader
    from imattrain.transforms import build_eval_transform

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # A real step first so the optimiser has momentum state worth restoring.
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    opt.zero_grad()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()}
    loader = build_loader(data_dir, "train", transform=build_eval_transform(32, 36), batch_size=8,
                          workers=0, train=True)

    def batches(epoch):
        loader.dataset.set_epoch(epoch)
        for b in loader:
            yield b["image"], b["label"]

    result = lr_range_test(model, opt, nn.CrossEntropyLoss(), batches, start_lr=1e-4, end_lr=50,
                           steps=12)
    assert len(result.lrs) >= 5 and result.lrs[0] == pytest.approx(1e-4)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    state = opt.state_dict()
    assert all(torch.equal(momentum[k], state["state"][k]["momentum_buffer"]) for k in momentum)
    assert opt.param_groups[0]["lr"] == 0.01
    assert result.suggested_lr is not None and result.lrs[0] <= result.suggested_lr <= result.lrs[-1]
    png = plot_lr_find(result, tmp_path / "lr_find.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lr_suggestion_rules():
    lrs = list(np.logspace(-5, 1, 61))
    # A clean valley: flat, falling fastest around 1e-2, minimum at 1e-1, then divergence.
    x = np.log10(lrs)
    y = 2 - 1 / (1 + np.exp(-(x + 2) * 4)) + np.where(x > -1, (x + 1) ** 2, 0)
    steep, low, suggested, rule = suggest(lrs, list(y))
    assert steep == pytest.approx(1e-2, rel=0.3) and suggested == steep
    assert low == pytest.approx(1e-1, rel=0.3)
    # A loss that only rises: fall back to min/10.
    steep, low, suggested, rule = suggest(lrs, list(np.linspace(1, 3, 61)))
    assert steep is None and suggested == pytest.approx(lrs[0] / 10) and "/ 10" in rule
    with pytest.raises(UserError):
        lr_range_test(nn.Linear(1, 1), torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1), nn.MSELoss(),
                      lambda e: [], start_lr=1, end_lr=0.1)
