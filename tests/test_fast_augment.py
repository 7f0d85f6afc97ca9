"""The fused `basic` preset (transforms.BasicAugment) against torchvision's Compose of it.

Real JPEGs (imatdata's photo corpus, 600-900 px, and the same stored at <= 512 px); the
reference for the geometry is torchvision's rotate -> resized_crop -> hflip on the decoded
image, the reference for the colour is ColorJitter's three adjustments applied in turn.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from imatsample import photo_corpus
from imattrain.config import TrainConfig
from imattrain.data import build_loader
from imattrain.transforms import (
    GRAY_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BasicAugment,
    build_train_transform,
)
from train_shards import make_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """One photo as served (JPEG, 600-900 px) and stored (<= 512 px, q90), and as PNG."""
    served = photo_corpus(1, seed=3)[0]
    img = Image.open(io.BytesIO(served)).convert("RGB")
    img.thumbnail((512, 512), Image.Resampling.LANCZOS)
    stored, png = io.BytesIO(), io.BytesIO()
    img.save(stored, format="JPEG", quality=90)
    img.save(png, format="PNG")
    return {"served": served, "stored": stored.getvalue(), "png": png.getvalue()}


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))  # header only: what the shard loader hands over


def reference(img: Image.Image, angle: float, crop: tuple[int, int, int, int], flip: bool,
              size: int) -> torch.Tensor:
    out = TF.rotate(img, angle, InterpolationMode.BILINEAR)
    out = TF.resized_crop(out, *crop, [size, size], InterpolationMode.BILINEAR, antialias=True)
    return TF.pil_to_tensor(TF.hflip(out) if flip else out).float()


def denormalise(x: torch.Tensor) -> torch.Tensor:
    """Normalised float [.., 3, H, W] -> 0..255."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean) * 255


def test_basic_preset_is_fused_and_yields_normalised_batches(photos: dict[str, bytes]) -> None:
    cfg = TrainConfig(image_size=64)
    aug = build_train_transform(cfg)
    assert isinstance(aug, BasicAugment) and aug.draft_size is None
    assert not isinstance(build_train_transform(cfg, fused=False), BasicAugment)
    assert not isinstance(build_train_transform(TrainConfig(augment="randaugment")),
                          BasicAugment)
    gray = io.BytesIO()
    Image.open(io.BytesIO(photos["stored"])).convert("L").save(gray, format="JPEG")
    images = [aug(opened(photos[k])) for k in ("served", "stored", "png")]
    images.append(aug(opened(gray.getvalue())))
    assert all(x.dtype == torch.uint8 and x.shape == (3, 64, 64) for x in images)
    batch = aug.collate(images)
    assert batch.dtype == torch.float32 and batch.shape == (4, 3, 64, 64)
    assert batch.is_contiguous() and -2.5 < float(batch.mean()) < 2.5
    # Without jitter, `collate` is exactly ToTensor + Normalize.
    plain = BasicAugment(TrainConfig(image_size=64, color_jitter=0))
    expected = TF.normalize(torch.stack(images).float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(plain.collate(images), expected, atol=1e-5)


@pytest.mark.parametrize("source", ["stored", "served", "png"])
def test_one_resample_matches_torchvision_rotate_crop_resize(photos: dict[str, bytes],
                                                             source: str) -> None:
    aug = BasicAugment(TrainConfig(image_size=96))
    full = Image.open(io.BytesIO(photos[source])).convert("RGB")
    w, h = full.size
    cases = [(0.0, (0, 0, h, w), False),  # the whole picture: draft and reduce
             (8.0, (h // 5, w // 6, h // 2, w // 2), True),
             (-10.0, (3, 7, 2 * h // 3, w // 2), False),
             (4.0, (h - 80, w - 100, 80, 100), True)]  # upsampling, corner filled by rotation
    for angle, crop, flip in cases:
        ref = reference(full, angle, crop, flip, 96)
        lazy = opened(photos[source])
        fused = aug.resample(lazy, angle, crop, flip).float()
        decoded = aug.resample(full, angle, crop, flip).float()
        assert (fused - ref).abs().mean() < 2, (angle, crop)  # out of 255 (about 1 here)
        assert (decoded - ref).abs().mean() < 2, (angle, crop)
        assert (fused - decoded).abs().mean() < 2  # the draft decode shows the same picture
        if source != "png" and min(crop[2:]) >= 2 * 96:
            assert lazy.size[0] <= math.ceil(w / 2)  # libjpeg decoded at 1/2 scale or less


def test_rotation_fills_the_corners_with_black(photos: dict[str, bytes]) -> None:
    aug = BasicAugment(TrainConfig(image_size=64))
    full = Image.open(io.BytesIO(photos["stored"])).convert("RGB")
    out = aug.resample(full, 10.0, (0, 0, full.height, full.width), False)
    assert out[:, 0, 0].max() < 30 and out[:, -1, -1].max() < 30
    assert out[:, 28:36, 28:36].float().mean() > 30
    # A quarter turn of a wide picture leaves a crop at its end with no picture at all.
    wide = full.resize((800, 120))
    assert int(aug.resample(wide, 90.0, (0, 0, 120, 300), False).max()) == 0


def test_jitter_is_colorjitter_with_factors_in_range(photos: dict[str, bytes]) -> None:
    """Each output is b * (c * (s * x + (1 - s) * gray) + (1 - c) * mean): recover b, c, s
    by least squares, check ColorJitter's range, then redo ColorJitter's steps with them."""
    jitter = 0.3
    aug = BasicAugment(TrainConfig(image_size=48, color_jitter=jitter))
    img = Image.open(io.BytesIO(photos["stored"])).convert("RGB").resize((48, 48))
    x = (70 + TF.pil_to_tensor(img).float() * 80 / 255).round()  # no clamping anywhere
    batch = denormalise(aug.collate([x.to(torch.uint8)] * 200))
    gray = sum(w * x[c] for c, w in enumerate(GRAY_WEIGHTS))
    design = torch.stack([x.flatten(), gray.repeat(3, 1, 1).flatten(),
                          torch.ones(x.numel())], dim=1).double()
    factors = []
    for y in batch:
        (alpha, beta, gamma), *_ = torch.linalg.lstsq(design, y.flatten().double()[:, None])
        b = float(alpha + beta + gamma / gray.mean())
        c = float(alpha + beta) / b
        s = float(alpha / (alpha + beta))
        factors.append((b, c, s))
        expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x / 255, b), c), s)
        assert (y / 255 - expected).abs().max() < 1e-3
    for values in zip(*factors):  # brightness, contrast, saturation
        assert 1 - jitter - 1e-3 <= min(values) < 1 - jitter + 0.05
        assert 1 + jitter - 0.05 < max(values) <= 1 + jitter + 1e-3
    assert len({round(b, 3) for b, _, _ in factors}) > 150  # one draw per image


def test_geometry_draws_follow_the_preset(photos: dict[str, bytes]) -> None:
    cfg = TrainConfig(image_size=64, rotation=10, crop_scale=0.35, hflip=0.5)
    aug = BasicAugment(cfg)
    img = opened(photos["stored"])
    torch.manual_seed(0)
    draws = [aug.sample(img) for _ in range(400)]
    assert all(abs(angle) <= 10 for angle, _, _ in draws)
    areas = [h * w / (img.width * img.height) for _, (_, _, h, w), _ in draws]
    assert min(areas) >= 0.35 - 0.01 and max(areas) <= 1.0 and max(areas) - min(areas) > 0.5
    assert 0.4 < sum(flip for _, _, flip in draws) / 400 < 0.6
    assert not any(BasicAugment(TrainConfig(hflip=0)).sample(img)[2] for _ in range(50))
    assert {BasicAugment(TrainConfig(rotation=0)).sample(img)[0] for _ in range(5)} == {0.0}


def test_shard_loader_batches_are_fused_and_reproducible(tmp_path: Path) -> None:
    data = make_dataset(tmp_path, train_per_class=6, val_per_class=1, size=96,
                        row_group_rows=8, corrupt=1)
    cfg = TrainConfig(image_size=32)

    def epoch(seed: int, epoch: int) -> list[dict]:
        loader = build_loader(data, "train", transform=build_train_transform(cfg),
                              batch_size=8, workers=0, train=True, seed=seed)
        loader.dataset.set_epoch(epoch)
        return list(loader)

    first, again, other = epoch(1, 0), epoch(1, 0), epoch(1, 1)
    assert sum(b["corrupt"] for b in first) == 1  # undecodable bytes still dropped and counted
    assert all(b["image"].dtype == torch.float32 and b["image"].shape[1:] == (3, 32, 32)
               for b in first)
    for a, b in zip(first, again):
        assert a["id"] == b["id"] and torch.equal(a["image"], b["image"])
    assert not torch.equal(first[0]["image"], other[0]["image"])


def test_loader_counts_undecodable_bytes_but_raises_transform_bugs(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from train_shards import make_rows, write_split

    rows = make_rows("train", 4, size=96)
    whole = rows[0]["image"]
    rows[0]["image"] = whole[: len(whole) // 2]  # a real JPEG header, then the bytes stop
    write_split(tmp_path, "train", rows, row_group_rows=8)
    cfg = TrainConfig(image_size=32)

    def load() -> list[dict]:
        return list(build_loader(tmp_path, "train", transform=build_train_transform(cfg),
                                 batch_size=8, workers=0, train=True))

    assert sum(b["corrupt"] for b in load()) == 1  # opened fine, failed to decode: a corrupt row

    def broken(self, img, angle, crop, flip):  # a bug in the augmentation, not in the bytes
        raise ValueError("bug in the transform")

    monkeypatch.setattr(BasicAugment, "resample", broken)
    with pytest.raises(ValueError, match="bug in the transform"):
        load()
