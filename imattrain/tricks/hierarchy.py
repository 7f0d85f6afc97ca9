"""Hierarchy-aware training: auxiliary heads for the product tree's levels 1-3.

`--tree product_tree.json` wraps the backbone in `HierarchicalModel`: the backbone's own
classifier (the last `nn.Linear` producing `num_classes` outputs) is lifted out and becomes
the *leaf head*, its place taken by `nn.Identity`, so the backbone yields its penultimate
features; three more linear heads predict the level-1/2/3 ancestor of the leaf from the
same features. The extra heads only shape the features during training:

- train mode: `forward` returns `(leaf_logits, [level1, level2, level3])`;
- eval mode: `forward` returns leaf logits only, so evaluation, prediction, TTA and
  ensembling treat it as any classifier (prediction uses the leaf head).

`HierarchicalLoss(base, level_targets, weight)` adds `weight * mean(CE at each level)` to
the base leaf loss. The leaf → (level1, level2, level3) index table is a buffer of the model
(saved in its state dict), so a checkpoint rebuilds the model without the tree file:
`rebuild_from_state_dict`.

`find_classifier` / `classifier_parameters` are shared with two-stage re-training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imatdata.errors import UserError
from imatdata.tree import ProductTree
from imattrain.runtime import unwrap

LEVELS = (1, 2, 3)
IGNORE_INDEX = -1


# --- locating the classifier ------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierSlot:
    """Where a backbone keeps its final linear classifier: `getattr(parent, name)`."""

    parent: nn.Module
    name: str
    qualified_name: str

    @property
    def linear(self) -> nn.Linear:
        return getattr(self.parent, self.name)


def find_classifier(model: nn.Module, num_classes: int) -> ClassifierSlot:
    """The last `nn.Linear` with `num_classes` outputs (torchvision's `fc`, `classifier[-1]`,
    `heads.head`, timm's `fc`/`head.fc`, ...). Module registration order follows the forward
    pass in all of these, so "last" is the output layer."""
    found: ClassifierSlot | None = None
    for qualified, module in model.named_modules():
        for name, child in module.named_children():
            if isinstance(child, nn.Linear) and child.out_features == num_classes:
                found = ClassifierSlot(module, name, f"{qualified}.{name}" if qualified else name)
    if found is None:
        raise UserError(f"cannot find the classifier of {type(model).__name__} (no nn.Linear with "
                        f"{num_classes} outputs): --tree and --two-stage need a linear classifier head")
    return found


def classifier_parameters(model: nn.Module, num_classes: int) -> list[nn.Parameter]:
    """Parameters of the layer that maps features to leaf logits."""
    inner = unwrap(model)
    if isinstance(inner, HierarchicalModel):
        return list(inner.leaf_head.parameters())
    return list(find_classifier(inner, num_classes).linear.parameters())


# --- tree → level targets ---------------------------------------------------------------------


def level_targets_from_tree(tree: ProductTree, num_classes: int) -> tuple[torch.Tensor, list[int]]:
    """(table [num_classes, 3] of level-node indices, -1 for classes not in the tree;
    number of nodes per level)."""
    table = torch.full((num_classes, len(LEVELS)), IGNORE_INDEX, dtype=torch.long)
    sizes: list[int] = []
    for j, level in enumerate(LEVELS):
        keys, index = tree.class_to_node(level)
        sizes.append(len(keys))
        for cid, node in index.items():
            if 0 <= cid < num_classes:
                table[cid, j] = node
    covered = int((table[:, 0] >= 0).sum())
    if covered == 0:
        raise UserError(f"product tree {tree.source} holds none of the {num_classes} training classes: "
                        "pass the tree that matches the labels (or drop --tree)")
    return table, sizes


# --- the model --------------------------------------------------------------------------------


class HierarchicalModel(nn.Module):
    """A backbone with a leaf head and one auxiliary head per tree level (see module doc)."""

    def __init__(self, model: nn.Module, num_classes: int, tree_path: str | Path | None = None, *,
                 level_targets: torch.Tensor | None = None, level_sizes: Sequence[int] | None = None) -> None:
        super().__init__()
        if level_targets is None or level_sizes is None:
            level_targets, sizes = level_targets_from_tree(ProductTree.load(tree_path), num_classes)
            level_sizes = sizes
        slot = find_classifier(model, num_classes)
        head = slot.linear
        setattr(slot.parent, slot.name, nn.Identity())
        self.backbone = model
        self.num_classes = num_classes
        self.leaf_head = head
        feat = head.in_features
        self.level_heads = nn.ModuleList(nn.Linear(feat, n) for n in level_sizes)
        self.register_buffer("level_targets", level_targets.clone().long())

    @property
    def level_sizes(self) -> list[int]:
        return [h.out_features for h in self.level_heads]

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        features = self.backbone(x)
        leaf = self.leaf_head(features)
        if not self.training:
            return leaf
        return leaf, [h(features) for h in self.level_heads]


def rebuild_from_state_dict(model: nn.Module, num_classes: int, state_dict: dict) -> nn.Module:
    """Wrap a freshly built backbone as the saved `HierarchicalModel` was, if the state dict
    says it was one (keys `level_heads.*`); otherwise return the backbone unchanged. Prefix
    `module.` / `_orig_mod.` from wrappers is tolerated."""
    def key(name: str) -> str | None:
        for k in state_dict:
            if k == name or k.endswith("." + name):
                return k
        return None

    tk = key("level_targets")
    if tk is None:
        return model
    sizes = []
    for i in range(len(LEVELS)):
        wk = key(f"level_heads.{i}.weight")
        if wk is None:
            break
        sizes.append(int(state_dict[wk].shape[0]))
    return HierarchicalModel(model, num_classes, level_targets=state_dict[tk].cpu(), level_sizes=sizes)


def is_hierarchical_state_dict(state_dict: dict) -> bool:
    return any(k.endswith("level_targets") for k in state_dict)


# --- the loss ---------------------------------------------------------------------------------


class HierarchicalLoss(nn.Module):
    """`base(leaf, y) + weight * mean_l CE(level_l, ancestor_l(y))`.

    Given a plain tensor (eval-mode output) it is just the base loss. Level CE is plain
    cross-entropy: the base loss's class re-weighting is defined for leaves, not for nodes.
    Leaves outside the tree (ancestor -1) contribute only the leaf term.
    """

    def __init__(self, base_loss: nn.Module, level_targets: torch.Tensor, weight: float = 0.3) -> None:
        super().__init__()
        if weight < 0:
            raise UserError(f"--hier-weight must be >= 0, got {weight}")
        self.base = base_loss
        self.weight = float(weight)
        self.register_buffer("level_targets", level_targets.clone().long(), persistent=False)

    def forward(self, output: torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]],
                targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, tuple):
            return self.base(output, targets)
        leaf, levels = output
        loss = self.base(leaf, targets)
        if self.weight == 0 or not levels:
            return loss
        table = self.level_targets.to(targets.device)
        valid = targets >= 0
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        aux = []
        for j, logits in enumerate(levels):
            t = torch.where(valid, table[safe, j], torch.full_like(targets, IGNORE_INDEX))
            if bool((t >= 0).any()):
                aux.append(F.cross_entropy(logits.float(), t, ignore_index=IGNORE_INDEX))
        if aux:
            loss = loss + self.weight * torch.stack(aux).mean()
        return loss
