"""Images/s delivered by imat's shard loader vs torchvision ImageFolder over the same images.

Both decode JPEGs and apply the same `basic` augmentation to 224 px with the same number of
DataLoader workers. The shard loader reads the images straight from Parquet row groups and
lets libjpeg decode at 1/2..1/8 scale (Pillow draft) when the stored image is at least twice
the target; ImageFolder opens one file per image and decodes it in full.

    .venv/bin/python bench/loader.py [--images 3000] [--workers 2] [--batch-size 64]

Two baselines: the very same stored JPEGs (<= 512 px, q90, what `imatdata fetch` keeps) as
files, and the photos as served (600-900 px) as files, which is what a 2019-style pipeline
(download, then ImageFolder) reads.
Each loader runs `--repeats` times, alternating, and the best pass counts (the machine may be
shared: the figures are noisy, the ratio less so).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imatdata.manifest import CLEAN_SCHEMA, ShardWriter  # noqa: E402
from imatdata.sample import photo_corpus  # noqa: E402
from imattrain.config import TrainConfig  # noqa: E402
from imattrain.data import build_loader  # noqa: E402
from imattrain.transforms import build_train_transform  # noqa: E402

CLASSES = 8


def _stored(original: bytes, max_side: int = 512) -> bytes:
    """What `imatdata fetch --max-side 512` keeps: longer side <= 512, JPEG q90."""
    img = Image.open(io.BytesIO(original)).convert("RGB")
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def make_sources(n: int, root: Path) -> tuple[Path, Path, Path]:
    """Clean shards of the stored (<= 512 px) images, the same bytes as class-folder files,
    and the photos as served (600-900 px) as class-folder files (the 2019 set-up)."""
    served = photo_corpus(n, seed=0, lazy=True)  # 600-900 px, what the web serves
    pool = min(n, 48)
    stored_pool = [_stored(served[i]) for i in range(pool)]
    shards, same, originals = root / "clean", root / "folders-512", root / "folders-served"
    now = datetime.now(timezone.utc)
    with ShardWriter(shards / "train", schema=CLEAN_SCHEMA, row_group_rows=256) as writer:
        batch = []
        for i in range(n):
            body = stored_pool[i % pool]
            label = i % CLASSES
            batch.append({"id": f"{i:07d}.jpg", "split": "train", "label": label,
                          "status": "ok", "image": body, "image_format": "jpeg",
                          "fetched_at": now})
            for folder, data in ((same, body), (originals, served[i])):
                target = folder / f"class{label:02d}" / f"{i:07d}.jpg"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            if len(batch) == 256:
                writer.write_rows(batch)
                batch = []
        writer.write_rows(batch)
    return shards, same, originals


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
        shards, same, originals = make_sources(args.images, root)
        print(f"sources: {args.images} photos, stored <= 512 px in shards and as files, and "
              f"as served (600-900 px) as files ({time.perf_counter() - t0:.1f}s to build)")
        cfg = TrainConfig(image_size=args.image_size, augment="basic")
        transform = build_train_transform(cfg)
        imat = build_loader(shards, "train", transform=transform, batch_size=args.batch_size,
                            workers=args.workers, train=True, pin_memory=False)
        loaders: dict[str, Any] = {"imat shards (512)": imat}
        for name, folder in (("ImageFolder (512)", same), ("ImageFolder (served)", originals)):
            loaders[name] = DataLoader(ImageFolder(str(folder), transform=transform),
                                       batch_size=args.batch_size, shuffle=True,
                                       num_workers=args.workers, collate_fn=_collate,
                                       persistent_workers=args.workers > 0)
        best = {name: 0.0 for name in loaders}
        for r in range(args.repeats):
            imat.dataset.set_epoch(r)
            for name, loader in loaders.items():
                seconds, n = timed_pass(loader)
                best[name] = max(best[name], n / seconds)
                print(f"  pass {r + 1}: {name:21s} {n / seconds:8.1f} images/s "
                      f"({n} in {seconds:.1f}s)")
        ours = best["imat shards (512)"]
        print()
        print(f"{'loader':22s} {'images/s':>10s} {'imat speed-up':>14s}")
        for name, rate in best.items():
            print(f"{name:22s} {rate:10.1f} {ours / rate:13.2f}x")
        print(f"(target >= 1.5x; workers={args.workers}, batch={args.batch_size}, "
              f"size={args.image_size}, basic augmentation, same transform object everywhere)")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
