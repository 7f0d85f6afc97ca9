"""Augmentation presets and the evaluation transform, in one place (as timm does).

CPU transforms work on PIL images (what the shard loader decodes); each carries a
`draft_size` attribute telling the loader how small it may let libjpeg decode (Pillow's
`draft()`), which is where most of the loading speed comes from. The GPU variant works on
uint8 CHW tensors produced by batched nvjpeg decoding.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import transforms as T
from torchvision.transforms import v2

from imattrain.config import TrainConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Preset(T.Compose):
    """A Compose that also says how far JPEG decoding may be scaled down before it."""

    def __init__(self, transforms: list[Any], draft_size: int | None) -> None:
        super().__init__(transforms)
        self.draft_size = draft_size


def _policy(cfg: TrainConfig, mod: Any) -> list[Any]:
    if cfg.augment == "autoaugment":
        return [mod.AutoAugment(mod.AutoAugmentPolicy.IMAGENET)]
    if cfg.augment == "randaugment":
        return [mod.RandAugment()]
    if cfg.augment == "trivialaugment":
        return [mod.TrivialAugmentWide()]
    return []


def _geometry(cfg: TrainConfig, mod: Any) -> list[Any]:
    if cfg.augment == "none":
        resize = cfg.resolved_eval_resize
        return [mod.Resize(resize, antialias=True), mod.CenterCrop(cfg.image_size)]
    ops: list[Any] = []
    if cfg.augment == "basic" and cfg.rotation > 0:
        # Rotate before cropping so the crop mostly avoids the filled corners (2019 recipe).
        ops.append(mod.RandomRotation(cfg.rotation))
    ops.append(mod.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_scale, 1.0), antialias=True))
    if cfg.hflip > 0:
        ops.append(mod.RandomHorizontalFlip(cfg.hflip))
    return ops


def _colour(cfg: TrainConfig, mod: Any) -> list[Any]:
    if cfg.augment == "basic" and cfg.color_jitter > 0:
        j = cfg.color_jitter
        return [mod.ColorJitter(brightness=j, contrast=j, saturation=j)]
    return []


def build_train_transform(cfg: TrainConfig) -> Preset:
    """PIL image -> normalised float tensor [3, S, S] for the configured preset."""
    ops = _geometry(cfg, T) + _colour(cfg, T) + _policy(cfg, T)
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return Preset(ops, draft_size=cfg.image_size)


def build_gpu_train_transform(cfg: TrainConfig) -> v2.Compose:
    """uint8 CHW tensor (on any device) -> normalised float tensor; the same preset."""
    ops = _geometry(cfg, v2) + _colour(cfg, v2) + _policy(cfg, v2)
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(ops)


def build_eval_transform(image_size: int, eval_resize: int | None = None) -> Preset:
    """Resize the shorter side to `eval_resize` (default size*256/224), then centre-crop."""
    resize = eval_resize if eval_resize is not None else int(round(image_size * 256 / 224))
    ops = [T.Resize(resize, antialias=True), T.CenterCrop(image_size), T.ToTensor(),
           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return Preset(ops, draft_size=resize)
