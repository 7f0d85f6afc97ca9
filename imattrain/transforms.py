"""Augmentation presets and the evaluation transform, in one place (as timm does).

CPU transforms work on PIL images (what the shard loader decodes); each carries a
`draft_size` attribute telling the loader how small it may let libjpeg decode (Pillow's
`draft()`), which is where most of the loading speed comes from. The GPU variant works on
uint8 CHW tensors produced by batched nvjpeg decoding.

The `basic` preset has a fused CPU implementation, `BasicAugment`, which the loaders use for
training: torchvision's Compose rotates and jitters the whole decoded image, one PIL pass
per step, while the fused version samples the same rotation/crop/flip from the JPEG header,
decodes only as finely as the crop needs, resamples once to the output size, and jitters
and normalises a whole batch of uint8 tensors in a few vectorised passes. The Compose
(`build_train_transform(cfg, fused=False)`) stays as the reference it is tested against.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info
from torchvision import transforms as T
from torchvision.transforms import functional as TF, v2

from imattrain.config import TrainConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, what PIL's convert("L") and torchvision's rgb_to_grayscale use.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


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


# Errors Pillow raises for bytes that are not a decodable image.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, TypeError, EOFError)


class UndecodableImage(Exception):
    """A transform that decodes found bytes it cannot decode (the loader counts the row as
    corrupt); any other exception from a transform is a bug and stops the run."""


class BasicAugment:
    """The `basic` preset, fused: rotation, RandomResizedCrop and flip as one affine resample
    per image (`__call__` -> uint8 [3, S, S]); colour jitter and normalisation per batch
    (`collate` -> float [B, 3, S, S]).

    Call it on an opened but not yet decoded image (`Image.open` reads the header only): it
    then lets libjpeg decode at 1/2..1/8 scale when the crop is that much larger than the
    output (FFCV's trick), box-filters a remaining reduction of 2x or more, and resamples
    only the output pixels, so the cost follows the output size, not the photo's. Random
    draws come from torch's global RNG with torchvision's laws (the geometry in the same
    order as the Compose), so seeding torch makes it reproducible.
    """

    draft_size = None  # how far to draft depends on the crop: the transform does it
    decodes = True  # takes the opened, undecoded image and decodes it itself

    def __init__(self, cfg: TrainConfig) -> None:
        cfg = cfg.resolved()
        self.size = cfg.image_size
        self.rotation = cfg.rotation
        self.crop_scale = [cfg.crop_scale, 1.0]
        self.hflip = cfg.hflip
        self.jitter = cfg.color_jitter
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self._scale = 1 / (255 * std)
        self._shift = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) / std

    def sample(self, img: Image.Image) -> tuple[float, tuple[int, int, int, int], bool]:
        """(angle, (top, left, height, width) of the crop, flip), drawn as the Compose does."""
        angle = T.RandomRotation.get_params([-self.rotation, self.rotation]) \
            if self.rotation > 0 else 0.0
        crop = T.RandomResizedCrop.get_params(img, self.crop_scale, [3 / 4, 4 / 3])
        flip = self.hflip > 0 and bool(torch.rand(1) < self.hflip)
        return angle, crop, flip

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.resample(img, *self.sample(img))

    def resample(self, img: Image.Image, angle: float, crop: tuple[int, int, int, int],
                 flip: bool) -> torch.Tensor:
        """hflip(resized_crop(rotate(img, angle), *crop, S)) as uint8 [3, S, S]."""
        width, height = img.size
        top, left, h, w = crop
        # Output pixel -> source pixel coordinates (PIL's convention: pixel centres at +0.5).
        to_source = _rotation(angle, width, height) @ _crop(top, left, h, w, self.size, flip)
        step = min(h, w) / self.size  # source pixels per output pixel, finer axis
        scale = 1.0
        if step >= 2:
            draft = 2 ** min(3, int(math.log2(step)))
            chosen = img.draft("RGB", (width // draft, height // draft))  # None: not a JPEG
            if chosen is not None:
                scale = width / chosen[1][2]  # the scale libjpeg will really decode at
        try:
            img.load()  # the decode: the one step whose failure means corrupt bytes
        except DECODE_ERRORS as exc:
            raise UndecodableImage(str(exc)) from exc
        if img.mode != "RGB":
            img = img.convert("RGB")
        to_source = np.diag([1 / scale, 1 / scale, 1]) @ to_source
        reduce = int(step / scale)  # what is left to shrink after the draft, in [1, 2) ...
        if reduce >= 2:  # ... unless libjpeg could not draft (not a JPEG, or beyond 1/8)
            # Box-filter only the region under the (rotated) crop, one reduced pixel wider
            # (at least one pixel even when a large rotation leaves the crop all outside).
            n, limit = self.size, np.array([img.width, img.height])
            corners = (to_source @ np.array([[0, n, 0, n], [0, 0, n, n], [1, 1, 1, 1]]))[:2]
            lo = np.clip(np.floor(corners.min(axis=1)) - reduce, 0, limit - 1)
            hi = np.clip(np.ceil(corners.max(axis=1)) + reduce, lo + 1, limit)
            x0, y0, x1, y1 = (int(v) for v in (*lo, *hi))
            img = img.reduce(reduce, (x0, y0, x1, y1))
            to_source = np.array([[1 / reduce, 0, -x0 / reduce], [0, 1 / reduce, -y0 / reduce],
                                  [0, 0, 1]]) @ to_source
        # 2x2 supersampling: nearest-neighbour samples at twice the output size, averaged, so
        # a source pixel per sample or more at the < 2x reduction left: no aliasing. About as
        # close to torchvision's output as bilinear and several times faster (PIL's bilinear
        # affine is generic per-pixel code, its nearest one fixed-point).
        to_source = to_source @ np.diag([0.5, 0.5, 1])
        out = img.transform((2 * self.size, 2 * self.size), Image.Transform.AFFINE,
                            tuple(to_source[:2].ravel()), resample=Image.Resampling.NEAREST)
        return TF.pil_to_tensor(out.reduce(2))

    def collate(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 images [3, S, S] -> normalised float batch, each image with its own
        brightness, contrast and saturation factor in [max(0, 1 - j), 1 + j] (ColorJitter)."""
        x = _empty_batch((len(images), 3, self.size, self.size))
        for out, img in zip(x, images):
            out.copy_(img)
        if self.jitter > 0:
            b, c, s = torch.empty(3, len(images), 1, 1).uniform_(max(0.0, 1 - self.jitter),
                                                                 1 + self.jitter)
            gray = x[:, 0] * GRAY_WEIGHTS[0]
            gray.add_(x[:, 1], alpha=GRAY_WEIGHTS[1]).add_(x[:, 2], alpha=GRAY_WEIGHTS[2])
            mean = gray.mean(dim=(1, 2), keepdim=True)
            # Brightness (scale), contrast (blend with the mean grey) and saturation (blend
            # with each pixel's grey) are linear and commute, so they are one blend,
            # b * (c * (s * x + (1 - s) * gray) + (1 - c) * mean), clamped once at the end
            # (ColorJitter clamps after each step, in a random order).
            x.mul_((b * c * s).unsqueeze(1))
            x.add_(gray.mul_(b * c * (1 - s)).add_(b * (1 - c) * mean).unsqueeze(1))
            x.clamp_(0, 255)
        return x.mul_(self._scale).sub_(self._shift)


def _empty_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """A float tensor; inside a DataLoader worker in shared memory, so that sending the batch
    to the main process costs no copy (what default_collate does for its stacks)."""
    if get_worker_info() is None:
        return torch.empty(shape)
    elem = torch.empty(0)
    return elem.new(elem._typed_storage()._new_shared(math.prod(shape))).view(shape)


def _rotation(angle: float, width: int, height: int) -> np.ndarray:
    """Inverse map of PIL's rotate(angle) about the centre (counter-clockwise degrees)."""
    t = -math.radians(angle)
    cx, cy = width / 2, height / 2
    cos, sin = math.cos(t), math.sin(t)
    return np.array([[cos, sin, cx - cos * cx - sin * cy],
                     [-sin, cos, cy + sin * cx - cos * cy], [0, 0, 1]])


def _crop(top: int, left: int, h: int, w: int, size: int, flip: bool) -> np.ndarray:
    """Output [0, size)^2, mirrored if `flip`, -> the crop box (top, left, h, w)."""
    sx, sy = w / size, h / size
    if flip:
        return np.array([[-sx, 0, left + w], [0, sy, top], [0, 0, 1]])
    return np.array([[sx, 0, left], [0, sy, top], [0, 0, 1]])


def build_train_transform(cfg: TrainConfig, fused: bool = True) -> Preset | BasicAugment:
    """PIL image -> normalised float tensor [3, S, S] for the configured preset; the `basic`
    preset is `BasicAugment` (uint8 tensors, `collate` per batch) unless `fused=False`."""
    cfg = cfg.resolved()
    if fused and cfg.augment == "basic":
        return BasicAugment(cfg)
    ops = _geometry(cfg, T) + _colour(cfg, T) + _policy(cfg, T)
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return Preset(ops, draft_size=cfg.image_size)


def build_gpu_train_transform(cfg: TrainConfig) -> v2.Compose:
    """uint8 CHW tensor (on any device) -> normalised float tensor; the same preset."""
    cfg = cfg.resolved()
    ops = _geometry(cfg, v2) + _colour(cfg, v2) + _policy(cfg, v2)
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(ops)


def build_eval_transform(image_size: int, eval_resize: int | None = None) -> Preset:
    """Resize the shorter side to `eval_resize` (default size*256/224), then centre-crop."""
    resize = eval_resize if eval_resize is not None else int(round(image_size * 256 / 224))
    ops = [T.Resize(resize, antialias=True), T.CenterCrop(image_size), T.ToTensor(),
           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return Preset(ops, draft_size=resize)
