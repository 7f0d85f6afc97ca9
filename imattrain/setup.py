"""One trainer set-up for every command that trains: `run`, `lr-find` and the two-stage step.

`Session.from_config(cfg)` goes index → class count → label check → sampling factors →
seed → model and loss → optimiser, in that order, once. Loaders are built from the session
(`train_loader`, `val_loader`), so every command reads the data the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from imatdata import storage
from imatdata.errors import UserError
from imatdata.manifest import list_shards, resolve_root
from imattrain import distributed as D
from imattrain.config import TrainConfig
from imattrain.data import SplitIndex, build_loader, infer_num_classes, scan_split, validate_labels
from imattrain.models import build_model
from imattrain.runtime import autocast_dtype, build_optimizer
from imattrain.transforms import build_eval_transform, build_train_transform


def resolve_data_dir(data: str | None, root: str | None) -> Path:
    """--data, else <root>/clean: the one rule of run, lr-find, eval and predict."""
    return storage.location(data, "--data") if data else resolve_root(root, writable=False) / "clean"


def build_model_and_loss(cfg: TrainConfig, num_classes: int,
                         class_counts: np.ndarray) -> tuple[nn.Module, nn.Module]:
    """The network and the training loss for a config.

    The one place where model/loss variants are composed (base loss from
    `imattrain.tricks.losses`; the hierarchy heads and loss are added here when `cfg.tree` is set).
    """
    from imattrain.tricks.losses import build_loss

    model = build_model(cfg.model, num_classes, cfg.pretrained)
    loss_fn = build_loss(cfg, np.asarray(class_counts))
    if cfg.tree:
        from imattrain.tricks.hierarchy import HierarchicalLoss, HierarchicalModel

        model = HierarchicalModel(model, num_classes, cfg.tree)
        loss_fn = HierarchicalLoss(loss_fn, model.level_targets, cfg.hier_weight)
    return model, loss_fn


def train_loader(cfg: TrainConfig, data_dir: Path, *, index: SplitIndex | None = None,
                 world: D.World = D.World(), repeat_factors: np.ndarray | None = None,
                 seed_offset: int = 0, gpu_decode: bool = False) -> Any:
    """The training loader of a config: its augmentation (or raw JPEG bytes when the GPU
    decodes), batch size, workers and shuffling, over this rank's share of the data."""
    loader = build_loader(
        data_dir, cfg.train_split, transform=None if gpu_decode else build_train_transform(cfg),
        batch_size=cfg.batch_size, workers=cfg.workers, train=True, seed=cfg.seed + seed_offset,
        repeat_factors=repeat_factors, rank=world.rank, world_size=world.world_size,
        index=index, raw_bytes=gpu_decode, prefetch=cfg.prefetch,
        shuffle_buffer=cfg.shuffle_buffer)
    if len(loader.dataset) == 0:
        raise UserError(f"split {cfg.train_split!r} has no usable images to train on")
    return loader


@dataclass
class Session:
    """The data, model, loss and optimiser of a training command, built as `cfg` says."""

    cfg: TrainConfig
    world: D.World
    device: torch.device
    data_dir: Path
    train_index: SplitIndex
    val_index: SplitIndex | None
    num_classes: int
    class_counts: np.ndarray
    repeat_factors: np.ndarray | None
    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    dtype: torch.dtype | None

    @classmethod
    def from_config(cls, cfg: TrainConfig, world: D.World, device: torch.device,
                    say: Callable[[str], None] = lambda _m: None, *,
                    train_rows: np.ndarray | None = None) -> Session:
        """`train_rows`: a bool mask over the train split's rows (scan order) of those to
        train on (`imattrain audit`'s folds); the others are skipped like missing images."""
        cfg = cfg.resolved()
        data_dir = resolve_data_dir(cfg.data, cfg.root)
        train_index = scan_split(data_dir, cfg.train_split)
        missing = int((~train_index.usable).sum())
        if cfg.relabel:
            from imattrain.audit import relabel_index

            train_index = relabel_index(train_index, cfg.relabel, cfg.relabel_min_score, say)
        if train_rows is not None:
            if len(train_rows) != train_index.num_rows:
                raise UserError(f"the fold mask has {len(train_rows)} rows, split "
                                f"{cfg.train_split!r} {train_index.num_rows}: the shards changed")
            train_index = dataclasses.replace(
                train_index, usable=train_index.usable & np.asarray(train_rows, bool))
        val_index = None
        if cfg.val_split:
            if list_shards(data_dir / cfg.val_split):
                val_index = scan_split(data_dir, cfg.val_split)
            else:
                say(f"note: no {cfg.val_split!r} split under {data_dir}; "
                    f"training without validation (no best.pt)")
        indexes = [ix for ix in (train_index, val_index) if ix is not None]
        num_classes = cfg.num_classes or infer_num_classes(*indexes)
        validate_labels(train_index, num_classes, cfg.train_split)
        if val_index is not None:
            validate_labels(val_index, num_classes, cfg.val_split)
        counts = train_index.class_counts(num_classes)
        if missing:
            say(f"note: {missing} train rows have no usable image (status != ok); skipped")
        repeat = None
        if cfg.sampler != "instance":
            from imattrain.tricks.sampling import class_repeat_factors

            repeat = class_repeat_factors(counts, cfg.sampler)
        torch.manual_seed(cfg.seed)
        model, loss_fn = build_model_and_loss(cfg, num_classes, counts)
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        return cls(cfg=cfg, world=world, device=device, data_dir=data_dir,
                   train_index=train_index, val_index=val_index, num_classes=num_classes,
                   class_counts=counts, repeat_factors=repeat, model=model,
                   loss_fn=loss_fn.to(device), optimizer=build_optimizer(cfg, model),
                   dtype=autocast_dtype(cfg.amp, device))

    def train_loader(self, *, gpu_decode: bool = False) -> Any:
        return train_loader(self.cfg, self.data_dir, index=self.train_index, world=self.world,
                            repeat_factors=self.repeat_factors, gpu_decode=gpu_decode)

    def val_loader(self) -> Any | None:
        if self.val_index is None:
            return None
        cfg = self.cfg
        return build_loader(
            self.data_dir, cfg.val_split,
            transform=build_eval_transform(cfg.image_size, cfg.resolved_eval_resize),
            batch_size=cfg.batch_size, workers=cfg.workers, train=False,
            rank=self.world.rank, world_size=self.world.world_size, index=self.val_index,
            prefetch=cfg.prefetch, persistent_workers=True)

