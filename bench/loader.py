"""Images/s delivered by imat's shard loader vs torchvision ImageFolder over the same images.

Both decode JPEGs and apply the same `basic` augmentation to 224 px with the same number of
DataLoader workers. The shard loader reads the images straight from Parquet row groups and
lets libjpeg decode at 1/2..1/8 scale (Pillow draft) when the stored image is at least twice
the target; ImageFolder opens one file per image and decodes it in full.

    .venv/bin/python bench/loader.py [--images 3000] [--workers 2] [--batch-size 64]

The source photos are ~512 px JPEGs (q90), what `imatdata fetch --max-side 512` stores.
Each loader runs `--repeats` times, alternating, and the best pass counts (the machine may be
shared: the figures are noisy, the ratio less so).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imatdata.manifest import CLEAN_SCHEMA, ShardWriter  # noqa: E402
from imatdata.sample import photo_corpus  # noqa: E402
from imattrain.config import TrainConfig  # noqa: E402
from imattrain.data import build_loader  # noqa: E402
from imattrain.transforms import build_train_transform  # noqa: E402

CLASSES = 8


def make_sources(n: int, root: Path) -> tuple[Path, Path]:
    """The same JPEG bytes as clean shards and as ImageFolder class folders."""
    photos = photo_corpus(n, seed=0, min_side=448, max_side=512, lazy=True)
    shards, folders = root / "clean", root / "folders"
    now = datetime.now(timezone.utc)
    with ShardWriter(shards / "train", schema=CLEAN_SCHEMA, row_group_rows=256) as writer:
        batch = []
        for i in range(n):
            body = photos[i]
            label = i % CLASSES
            batch.append({"id": f"{i:07d}.jpg", "split": "train", "label": label,
                          "status": "ok", "image": body, "image_format": "jpeg",
                          "fetched_at": now})
            target = folders / f"class{label:02d}" / f"{i:07d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
            if len(batch) == 256:
                writer.write_rows(batch)
                batch = []
        writer.write_rows(batch)
    return shards, folders


def _collate(items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    return {"image": torch.stack([x for x, _ in items]),
            "label": torch.tensor([y for _, y in items])}


def timed_pass(loader: DataLoader) -> tuple[float, int]:
    """(seconds, images) from the first batch to the last (worker start-up excluded)."""
    it = iter(loader)
    first = next(it)
    start = time.perf_counter()
    n = 0
    for batch in it:
        n += batch["image"].shape[0]
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
        shards, folders = make_sources(args.images, root)
        print(f"sources: {args.images} JPEGs of ~512 px, as shards and as files "
              f"({time.perf_counter() - t0:.1f}s to build)")
        cfg = TrainConfig(image_size=args.image_size, augment="basic")
        transform = build_train_transform(cfg)
        imat = build_loader(shards, "train", transform=transform, batch_size=args.batch_size,
                            workers=args.workers, train=True, pin_memory=False)
        folder_ds = ImageFolder(str(folders), transform=transform)
        baseline = DataLoader(folder_ds, batch_size=args.batch_size, shuffle=True,
                              num_workers=args.workers, collate_fn=_collate,
                              persistent_workers=args.workers > 0)
        best = {"imat shards": 0.0, "ImageFolder": 0.0}
        for r in range(args.repeats):
            imat.dataset.set_epoch(r)
            for name, loader in (("imat shards", imat), ("ImageFolder", baseline)):
                seconds, n = timed_pass(loader)
                rate = n / seconds
                best[name] = max(best[name], rate)
                print(f"  pass {r + 1}: {name:12s} {rate:8.1f} images/s ({n} in {seconds:.1f}s)")
        ratio = best["imat shards"] / best["ImageFolder"]
        print()
        print(f"{'loader':14s} {'images/s':>10s}")
        for name, rate in best.items():
            print(f"{name:14s} {rate:10.1f}")
        print(f"speed-up: {ratio:.2f}x (target >= 1.5x); workers={args.workers}, "
              f"batch={args.batch_size}, size={args.image_size}, basic augmentation")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
