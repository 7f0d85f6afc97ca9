"""Images/s delivered by imat's shard loader vs torchvision ImageFolder over the same images.

Every loader decodes JPEGs and applies the `basic` augmentation to 224 px with the same
number of DataLoader workers and batch size. The shard loader reads the images straight from
Parquet row groups and uses the fused `basic` transform (imattrain.transforms.BasicAugment:
one resample per image at the output size, libjpeg draft when the crop allows, jitter and
normalisation per batch). ImageFolder opens one file per image and runs torchvision's
Compose of the same recipe with the default collate, which is what a user writes.

    .venv/bin/python bench/loader.py [--images 3000] [--workers 2] [--batch-size 64]

Baselines: the very same stored JPEGs (<= 512 px, q90, what `imatdata fetch` keeps) as
files, and the photos as served (600-900 px) as files, which is what a 2019-style pipeline
(download, then ImageFolder) reads. Two more rows split the gain between the transform and
the shards: ImageFolder with the fused transform, and the shards with the Compose.
Each loader runs `--repeats` times, alternating, and the best pass counts (the machine may be
shared: the figures are noisy, the ratio less so).
"""

from __future__ import annotations

import argparse
import functools
import io
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from imatsample import photo_corpus
from imatsample.shards import jpeg, manifest_row, write_shards
from imattrain.config import TrainConfig
from imattrain.data import ShardStream, build_loader
from imattrain.transforms import BasicAugment, build_train_transform

CLASSES = 8


def _stored(original: bytes, max_side: int = 512) -> bytes:
    """What `imatdata fetch --max-side 512` keeps: longer side <= 512, JPEG q90."""
    img = Image.open(io.BytesIO(original)).convert("RGB")
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return jpeg(img, quality=90)


def make_sources(n: int, root: Path) -> tuple[Path, Path, Path]:
    """Clean shards of the stored (<= 512 px) images, the same bytes as class-folder files,
    and the photos as served (600-900 px) as class-folder files (the 2019 set-up)."""
    served = photo_corpus(n, seed=0, lazy=True)  # 600-900 px, what the web serves
    pool = min(n, 48)
    stored_pool = [_stored(served[i]) for i in range(pool)]
    shards, same, originals = root / "clean", root / "folders-512", root / "folders-served"
    write_shards(shards / "train", (manifest_row(f"{i:07d}.jpg", "train", i % CLASSES,
                                                 stored_pool[i % pool]) for i in range(n)),
                 row_group_rows=256)
    # The baselines read plain files, as ImageFolder users keep them.
    for i in range(n):
        label = i % CLASSES
        for folder, data in ((same, stored_pool[i % pool]), (originals, served[i])):
            target = folder / f"class{label:02d}" / f"{i:07d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return shards, same, originals


def _fused_collate(transform: BasicAugment,
                   items: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    return [transform.collate([x for x, _ in items]), torch.tensor([y for _, y in items])]


def timed_pass(loader: DataLoader) -> tuple[float, int]:
    """(seconds, images) from the first batch to the last (worker start-up excluded)."""
    it = iter(loader)
    first = next(it)
    start = time.perf_counter()
    n = 0
    for batch in it:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        n += images.shape[0]
    del first
    return time.perf_counter() - start, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="build the sources here and keep them")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = args.keep or Path(tempfile.mkdtemp(prefix="imat-bench-loader-"))
    try:
        t0 = time.perf_counter()
        shards, same, originals = make_sources(args.images, root)
        print(f"sources: {args.images} photos, stored <= 512 px in shards and as files, and "
              f"as served (600-900 px) as files ({time.perf_counter() - t0:.1f}s to build)")
        cfg = TrainConfig(image_size=args.image_size, augment="basic")
        fused, compose = build_train_transform(cfg), build_train_transform(cfg, fused=False)
        assert isinstance(fused, BasicAugment)
        loaders: dict[str, Any] = {}
        for name, transform in (("imat shards (512)", fused),
                                ("imat shards + Compose", compose)):
            loaders[name] = build_loader(shards, "train", transform=transform,
                                         batch_size=args.batch_size, workers=args.workers,
                                         train=True, pin_memory=False)
        folder_kw: dict[str, Any] = dict(batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers,
                                         persistent_workers=args.workers > 0)
        loaders["ImageFolder (512)"] = DataLoader(
            ImageFolder(str(same), transform=compose), **folder_kw)
        # Image.open reads the header only, so the fused transform can draft the decode.
        loaders["ImageFolder (512) + fused"] = DataLoader(
            ImageFolder(str(same), transform=fused, loader=Image.open),
            collate_fn=functools.partial(_fused_collate, fused), **folder_kw)
        loaders["ImageFolder (served)"] = DataLoader(
            ImageFolder(str(originals), transform=compose), **folder_kw)
        best = {name: 0.0 for name in loaders}
        for r in range(args.repeats):
            for name, loader in loaders.items():
                if isinstance(loader.dataset, ShardStream):
                    loader.dataset.set_epoch(r)
                seconds, n = timed_pass(loader)
                best[name] = max(best[name], n / seconds)
                print(f"  pass {r + 1}: {name:26s} {n / seconds:8.1f} images/s "
                      f"({n} in {seconds:.1f}s)")
        ours = best["imat shards (512)"]
        print()
        print(f"{'loader':26s} {'images/s':>10s} {'imat speed-up':>14s}")
        for name, rate in best.items():
            print(f"{name:26s} {rate:10.1f} {ours / rate:13.2f}x")
        print(f"headline: imat {ours / best['ImageFolder (512)']:.2f}x ImageFolder on the same "
              f"bytes (target >= 1.5x); workers={args.workers}, batch={args.batch_size}, "
              f"size={args.image_size}, basic augmentation")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
