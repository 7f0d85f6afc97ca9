"""Does `imattrain run` with its defaults beat the training loop a user would write?

    # once: the images (Debian's package; 30 MB, no network beyond apt)
    apt-get install dataset-fashion-mnist
    .venv/bin/python bench/recipes.py prepare --out /tmp/imat-recipes          # clean shards
    .venv/bin/python bench/recipes.py compare --data /tmp/imat-recipes/clean   # the comparison

The images: Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, MIT licence), 70,000 real Zalando
product photos of clothing in 10 classes (t-shirt, trouser, pullover, dress, coat, sandal,
shirt, sneaker, bag, ankle boot), 28 px greyscale. Debian ships them in the package
`dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist/*-ubyte.gz); any copy of the four
idx files works (`prepare --source DIR`). This script downloads nothing.

`prepare` writes them as clean shards in imatdata's schema, shaped like the set of issue #17:
each image upscaled to 112 px (Lanczos, RGB JPEG q90: what a fetch with a small --max-side
keeps), train imbalanced geometrically from 2,200 to 330 images per class (10,170 images,
from Fashion-MNIST's train set), val 100 per class (1,000, disjoint from train), test the
10,000 images of Fashion-MNIST's own test set (`--test-per-class` takes fewer).

`compare` trains, on the same shards, with the same model, image size, epochs and batch
size, at each budget of `--budgets` (default `2,1@ft`: 2 epochs from scratch, then a
1-epoch fine-tune; about 20-25 minutes on 2 shared cores):

  imattrain   `imattrain run` as a user types it with no recipe flags (only --data, --out,
              --model, --image-size, --epochs, --batch-size, and --pretrained for a
              fine-tune), in its own process; then the checkpoint `imattrain eval`/`predict`
              choose for the run folder, scored on the test split. The run goes an epoch at a
              time (--max-steps, then --resume, which continues exactly) so that every epoch's
              weights can be scored too: the row says which epoch was chosen and how far it
              is from the best epoch on test.
  plain       the loop a user writes from the PyTorch tutorials (`plain_train` below), in its
              own process with torch's default settings: a Dataset over the shards (PIL
              decode), torchvision transforms Resize + RandomHorizontalFlip + ToTensor +
              Normalize (eval: Resize + centre crop), DataLoader(workers=2, shuffle), SGD
              (momentum 0.9, Nesterov, weight decay 5e-4, lr 0.1, or 0.01 to fine-tune),
              OneCycleLR stepped per batch, cross-entropy, the weights after the last epoch.

A budget is `EPOCHS` (from scratch) or `EPOCHS@ft` (a fine-tune: both start from the weights
of imattrain's run of the first budget, i.e. a model of this task trained here, loaded as
`--pretrained PATH` loads it). Each row prints test top-1/top-3, training images/s (time in
the training steps and data waits, not start-up) and wall time; the two runs of a budget go
back to back, in alternating order, so on a shared machine their ratio means more than
either figure.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# The environment as the user started the bench, before anything imports imattrain (whose
# import sets OMP_WAIT_POLICY=PASSIVE unless set): the children start from it, so the plain
# loop runs with torch's default OpenMP settings and imattrain sets its own.
_USER_ENV = dict(os.environ)

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle-boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


# --- the data ----------------------------------------------------------------------------------


def _idx(path: Path, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(path).read(), np.uint8, offset=offset)


def load_fashion_mnist(source: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) from the four idx files."""
    files = {name: source / f"{name}-ubyte.gz" for name in
             ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: `apt-get install dataset-fashion-mnist`, or "
                 f"--source DIR holding Fashion-MNIST's four *-ubyte.gz files")
    x = _idx(files["train-images-idx3"], 16).reshape(-1, 28, 28)
    y = _idx(files["train-labels-idx1"], 8)
    tx = _idx(files["t10k-images-idx3"], 16).reshape(-1, 28, 28)
    ty = _idx(files["t10k-labels-idx1"], 8)
    return x, y, tx, ty


def train_counts(most: int, least: int, classes: int = 10) -> list[int]:
    """Geometric per-class counts from `most` down to `least`."""
    ratio = (least / most) ** (1 / (classes - 1))
    return [int(round(most * ratio ** k)) for k in range(classes)]


def prepare(out: Path, source: Path, *, size: int = 112, most: int = 2200, least: int = 330,
            val_per_class: int = 100, test_per_class: int = 1000, seed: int = 0) -> Path:
    """Write out/clean/{train,val,test} shards; returns out/clean."""
    from PIL import Image

    from imatsample.shards import jpeg, manifest_row, write_shards

    x, y, tx, ty = load_fashion_mnist(source)
    rng = np.random.default_rng(seed)
    counts = train_counts(most, least)
    order = list(range(10))
    random.Random(seed).shuffle(order)  # which class is frequent is arbitrary
    picks: dict[str, list[int]] = {"train": [], "val": []}
    for rank, label in enumerate(order):
        idx = rng.permutation(np.flatnonzero(y == label))
        picks["val"] += idx[:val_per_class].tolist()
        picks["train"] += idx[val_per_class:val_per_class + counts[rank]].tolist()
    test = []
    for label in range(10):
        test += rng.permutation(np.flatnonzero(ty == label))[:test_per_class].tolist()

    def rows(split: str, images: np.ndarray, labels: np.ndarray, chosen: list[int]):
        for i in rng.permutation(np.asarray(chosen)):
            img = Image.fromarray(images[i]).convert("RGB").resize((size, size),
                                                                   Image.Resampling.LANCZOS)
            yield manifest_row(f"{split}-{i:05d}", split, int(labels[i]), jpeg(img, 90),
                               size=(size, size), orig=(28, 28))

    clean = out / "clean"
    for split, images, labels, chosen in (("train", x, y, picks["train"]),
                                          ("val", x, y, picks["val"]), ("test", tx, ty, test)):
        write_shards(clean / split, rows(split, images, labels, chosen), row_group_rows=256)
        print(f"{split}: {len(chosen)} images -> {clean / split}", file=sys.stderr)
    (out / "classes.json").write_text(json.dumps({
        "source": "Fashion-MNIST", "classes": CLASSES, "size": size,
        "train_per_class": {CLASSES[label]: counts[rank] for rank, label in enumerate(order)},
        "val_per_class": val_per_class, "test_per_class": test_per_class}, indent=2))
    return clean


# --- the plain loop ------------------------------------------------------------------------------


class ShardImages:
    """A map-style Dataset over one split of the shards, as a user would write it: the
    (image bytes, label) columns read into memory with pyarrow, PIL decode per item."""

    def __init__(self, folder: Path, transform: Any) -> None:
        import pyarrow.dataset as ds

        table = ds.dataset(str(folder), format="parquet").to_table(
            columns=["image", "label", "status"])
        keep = [i for i, s in enumerate(table.column("status").to_pylist()) if s == "ok"]
        self.images = [table.column("image")[i].as_py() for i in keep]
        self.labels = [int(table.column("label")[i].as_py()) for i in keep]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        img = Image.open(io.BytesIO(self.images[i])).convert("RGB")
        return self.transform(img), self.labels[i]


def plain_train(data: Path, *, model_name: str, size: int, epochs: int, batch_size: int,
                lr: float, init: Path | None, workers: int = 2, seed: int = 0) -> dict[str, Any]:
    """The baseline: the PyTorch-tutorial loop (see the module doc). Returns the model after
    the last epoch and the training images/s."""
    import torch
    import torchvision
    from torch import nn
    from torchvision import transforms as T

    torch.manual_seed(seed)
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = T.Compose([T.Resize(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    train_set = ShardImages(data / "train", train_tf)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    model = getattr(torchvision.models, model_name)(num_classes=10)
    if init is not None:
        model.load_state_dict(torch.load(init, weights_only=True)["model"])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    images, busy = 0, 0.0
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            images += len(y)
        busy += time.perf_counter() - t0
    return {"model": model.eval(), "img_s": images / busy}


def plain_eval(model: Any, data: Path, split: str, size: int) -> dict[str, float]:
    import torch
    from torchvision import transforms as T

    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), norm])
    loader = torch.utils.data.DataLoader(ShardImages(data / split, tf), batch_size=256,
                                         num_workers=2)
    hit1 = hit3 = n = 0
    with torch.inference_mode():
        for x, y in loader:
            top = model(x).topk(3, dim=1).indices
            hit1 += int((top[:, 0] == y).sum())
            hit3 += int((top == y[:, None]).any(1).sum())
            n += len(y)
    return {"top1": hit1 / n, "top3": hit3 / n}


# --- imattrain ---------------------------------------------------------------------------------


def steps_per_epoch(data: Path, batch_size: int, workers: int = 2) -> int:
    """Optimiser steps of one epoch of `imattrain run` (its loader's plan)."""
    from imattrain.data import PlanSpec, batches_per_epoch, scan_split

    spec = PlanSpec(seed=0, batch_size=batch_size, rank=0, world_size=1, num_workers=workers,
                    train=True, include_missing=False, shuffle_buffer=0)
    return batches_per_epoch(scan_split(data, "train"), spec, None)


def _child(args: list[str], env: dict[str, str] | None = None) -> str:
    """Run a Python child (a fresh process: its own threads and OpenMP settings) in the
    user's environment plus `env`; stdout."""
    import subprocess

    full = {**_USER_ENV, **(env or {})}
    done = subprocess.run([sys.executable, *args], stdout=subprocess.PIPE, text=True, env=full)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed (exit {done.returncode})")
    return done.stdout


def imat_train(data: Path, out: Path, *, model_name: str, size: int, epochs: int,
               batch_size: int, init: Path | None, extra: list[str]) -> dict[str, Any]:
    """`imattrain run` as a user types it, with only the run's shape given (data, model, size,
    epochs, batch size, --pretrained for a fine-tune) plus `extra` flags. The run goes an
    epoch at a time (--max-steps, then --resume: the same run as one call, exactly), keeping
    a copy of each epoch's weights, so that the checkpoint predict chooses can be compared
    with every epoch on the test split."""
    import shutil

    flags = ["-m", "imattrain", "run", "--data", str(data), "--out", str(out), "--model",
             model_name, "--image-size", str(size), "--epochs", str(epochs), "--batch-size",
             str(batch_size), "--quiet", *extra]
    if init is not None:
        flags += ["--pretrained", str(init)]
    steps = steps_per_epoch(data, batch_size)
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        _child([*flags, "--max-steps", str(steps * epoch), *(["--resume"] if epoch > 1 else [])])
        shutil.copy(out / "checkpoints" / "last.pt", out / "checkpoints" / f"epoch{epoch}.pt")
    wall = time.perf_counter() - started
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    busy = sum(m["train_images"] / m["images_per_s"] for m in history)
    return {"img_s": sum(m["train_images"] for m in history) / busy, "wall": wall,
            "metrics": history}


def imat_scores(data: Path, split: str, run: Path, epochs: int) -> dict[str, Any]:
    """Test figures of the checkpoint eval/predict choose for `run` (its note too), and the
    top-1 of every epoch's weights."""
    text = _child([__file__, "_score", str(data), split, str(run), str(epochs)],
                  env={"OMP_WAIT_POLICY": "PASSIVE"})
    return json.loads(text)


def _score(data: Path, split: str, run: Path, epochs: int) -> dict[str, Any]:
    from imattrain.config import EvalConfig
    from imattrain.predict import evaluate_checkpoints

    cfg = EvalConfig(split=split, workers=2)
    chosen = evaluate_checkpoints([run], data, cfg)
    every = [evaluate_checkpoints([run / "checkpoints" / f"epoch{e}.pt"], data, cfg).metrics.top1
             for e in range(1, epochs + 1)]
    return {"top1": chosen.metrics.top1, "top3": chosen.metrics.top3, "note": chosen.notes[0],
            "per_epoch_top1": every}


def plain_run(data: Path, split: str, **kw: Any) -> dict[str, Any]:
    """The plain loop and its test figures, in a child with torch's default settings."""
    text = _child([__file__, "_plain", str(data), split, json.dumps(
        {k: str(v) if isinstance(v, Path) else v for k, v in kw.items()})])
    return json.loads(text)


def _plain(data: Path, split: str, kw: dict[str, Any]) -> dict[str, Any]:
    kw["init"] = Path(kw["init"]) if kw.get("init") else None
    fit = plain_train(data, **kw)
    return {**plain_eval(fit["model"], data, split, kw["size"]), "img_s": fit["img_s"]}


def parse_budgets(text: str) -> list[tuple[int, bool]]:
    out = []
    for part in text.split(","):
        epochs, _, kind = part.strip().partition("@")
        if kind not in ("", "ft"):
            raise SystemExit(f"--budgets: {part!r} is neither EPOCHS nor EPOCHS@ft")
        out.append((int(epochs), kind == "ft"))
    if out and out[0][1]:
        raise SystemExit("--budgets: the first budget must train from scratch (fine-tunes start "
                         "from its weights)")
    return out


def compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    import shutil

    data, work = args.data, args.work
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    init: Path | None = None
    extra = args.imat_flags.split() if args.imat_flags else []
    runs = [(k, epochs, ft, seed) for k, (epochs, ft) in enumerate(parse_budgets(args.budgets))
            for seed in range(args.seeds)]
    for k, epochs, ft, seed in runs:
        name = f"{epochs} epochs" + (" fine-tune" if ft else " from scratch")
        start = init if ft else None
        order = ("plain", "imattrain") if (k + seed) % 2 == 0 else ("imattrain", "plain")
        for trainer in order:
            t0 = time.perf_counter()
            row: dict[str, Any] = {"budget": name, "trainer": trainer, "seed": seed}
            if trainer == "plain":
                lr = args.plain_lr_ft if ft else args.plain_lr
                row.update(plain_run(data, args.split, model_name=args.model,
                                     size=args.image_size, epochs=epochs,
                                     batch_size=args.batch_size, lr=lr, init=start, seed=seed),
                           note=f"last epoch, lr {lr:g}")
                row["wall_s"] = time.perf_counter() - t0
            else:
                out = work / f"imat-{k}-{epochs}{'ft' if ft else ''}-seed{seed}"
                if out.exists():
                    shutil.rmtree(out)
                fit = imat_train(data, out, model_name=args.model, size=args.image_size,
                                 epochs=epochs, batch_size=args.batch_size, init=start,
                                 extra=[*extra, "--seed", str(seed)])
                row["wall_s"] = time.perf_counter() - t0
                scores = imat_scores(data, args.split, out, epochs)
                every = scores["per_epoch_top1"]
                chosen = scores["note"].split(": ", 1)[1].split(";")[0]
                row.update(scores, img_s=fit["img_s"], threads=fit["metrics"][-1].get("threads"),
                           note=f"predict's choice: {chosen}; best epoch "
                                f"{1 + int(np.argmax(every))} top-1 {max(every):.4f}; per epoch "
                                + " ".join(f"{t:.3f}" for t in every))
                if init is None:
                    init = out / "checkpoints" / "best.pt"
                    if not init.exists():
                        init = out / "checkpoints" / "last.pt"
            rows.append(row)
            print(f"{name:24} {trainer:10} seed {seed} top-1 {row['top1']:.4f} top-3 "
                  f"{row['top3']:.4f} {row['img_s']:6.1f} img/s {row['wall_s']:6.0f} s  "
                  f"{row['note']}", flush=True)
    if args.seeds > 1:
        for budget in dict.fromkeys(r["budget"] for r in rows):
            for trainer in ("plain", "imattrain"):
                mine = [r for r in rows if r["budget"] == budget and r["trainer"] == trainer]
                top1 = [r["top1"] for r in mine]
                print(f"{budget:24} {trainer:10} mean of {len(mine)}: top-1 "
                      f"{np.mean(top1):.4f} (±{np.std(top1):.4f}) top-3 "
                      f"{np.mean([r['top3'] for r in mine]):.4f} "
                      f"{np.mean([r['img_s'] for r in mine]):6.1f} img/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the clean shards")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--source", type=Path, default=DEBIAN_DIR)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--most", type=int, default=2200)
    p.add_argument("--least", type=int, default=330)
    p.add_argument("--val-per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=1000)
    c = sub.add_parser("compare", help="imattrain's defaults vs the plain loop")
    c.add_argument("--data", type=Path, required=True, help="clean shards (from `prepare`)")
    c.add_argument("--work", type=Path, default=Path("/tmp/imat-bench-recipes"),
                   help="folder for the runs (replaced)")
    c.add_argument("--budgets", default="2,1@ft",
                   help="comma-separated EPOCHS (from scratch) or EPOCHS@ft (fine-tune from the "
                        "first budget's imattrain weights)")
    c.add_argument("--model", default="resnet18")
    c.add_argument("--image-size", type=int, default=64)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--split", default="test", help="the split scored")
    c.add_argument("--seeds", type=int, default=1,
                   help="training seeds per budget (order, initialisation); at 2-3 epochs one "
                        "run's test top-1 moves by ~1.5 points with the seed, so use 2+ to "
                        "compare recipes; fine-tunes start from the seed-0 run")
    c.add_argument("--plain-lr", type=float, default=0.1)
    c.add_argument("--plain-lr-ft", type=float, default=0.01,
                   help="the plain loop's peak rate when fine-tuning")
    c.add_argument("--imat-flags", default="",
                   help="extra imattrain run flags (experiments; the comparison uses none)")
    c.add_argument("--json", type=Path, help="also write the rows as JSON here")
    if argv is None and len(sys.argv) > 1 and sys.argv[1] in ("_plain", "_score"):
        # The children compare() starts (one fresh process per training or scoring).
        command, data, split, *rest = sys.argv[1:]
        if command == "_plain":
            result = _plain(Path(data), split, json.loads(rest[0]))
        else:
            result = _score(Path(data), split, Path(rest[0]), int(rest[1]))
        print(json.dumps(result))
        return 0
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.out, args.source, size=args.size, most=args.most, least=args.least,
                val_per_class=args.val_per_class, test_per_class=args.test_per_class)
    else:
        print(f"{args.model}, {args.image_size} px, batch {args.batch_size}, budgets "
              f"{args.budgets}, scored on {args.split}", flush=True)
        rows = compare(args)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
