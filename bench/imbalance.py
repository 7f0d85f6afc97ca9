"""Do the long-tail tricks help? A measured comparison on a learnable synthetic set.

    .venv/bin/python bench/imbalance.py [--epochs 9] [--out /tmp/imat-bench-imbalance]

The set mimics the 2019 imbalance: 10 classes of rendered "products" (imatsample's
render_product, 32 px) with train counts geometric from 60 down to 9 (6.7x; ~280 images),
and a balanced validation split (10 per class) — the competition's val and test are far
flatter than its train. Every row trains the same small model (shufflenet_v2_x0_5 from
scratch, AdamW, SGDR with two equal cycles so every run leaves two snapshots) for the
same number of epochs and seeds, through the real `imattrain` code paths
(engine.train, the shard loader, predict.evaluate_checkpoints); only the trick differs.
(mobilenet_v3_small is not used: its BatchNorm momentum of 0.01 leaves the running
statistics near their initial values after a few hundred steps, so it evaluates at chance.)


  ce                  instance sampling, cross-entropy (the baseline)
  sqrt / balanced     --sampler sqrt / balanced
  focal               --loss focal (gamma 2)
  class-balanced      --loss class-balanced (beta 0.999)
  two-stage           the ce run + --two-stage (1 epoch of classifier re-training)
  tau=1               the ce run evaluated with logit adjustment tau = 1 (no tuning)
  tau tuned           the ce run, tau chosen on this same val split (optimistic: tuned
                      and scored on one split)
  snapshots           the ce run's SGDR snapshots averaged
  tta flip/five-crop  the ce run with test-time augmentation
  hierarchy           --tree (a 3-level tree over the classes) with --hier-weight 0.3

Each row is repeated over `--seeds` training seeds (initialisation, order, augmentation;
the data stay fixed) and reported as mean ± std; with 100 val images one image is one
point, so differences inside the std are noise. The machine is shared and CPU-only, so
timings are indicative only. Nothing here is part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

N_CLASSES = 10
SIZE = 32
VAL_PER_CLASS = 10


def train_counts(n: int = N_CLASSES, top: int = 60, bottom: int = 9) -> list[int]:
    return [int(round(top * (bottom / top) ** (i / (n - 1)))) for i in range(n)]


def write_data(folder: Path, seed: int = 0, val_per_class: int = VAL_PER_CLASS) -> Path:
    """clean/{train,val} shards of rendered JPEGs (the clean schema, as imatdata writes it)."""
    from imatsample import render_product
    from imatsample.shards import jpeg, manifest_row, write_shards

    rng = random.Random(seed)

    def row(split: str, row_id: str, label: int) -> dict[str, Any]:
        image = jpeg(render_product(label, rng, SIZE))
        return manifest_row(row_id, split, label, image, size=(SIZE, SIZE), phash=0)

    counts = train_counts()
    splits = {
        "train": [row("train", f"t{c}-{i}", c) for c, n in enumerate(counts) for i in range(n)],
        "val": [row("val", f"v{c}-{i}", c) for c in range(N_CLASSES) for i in range(val_per_class)],
    }
    rng.shuffle(splits["train"])
    for split, rows in splits.items():
        write_shards(folder / split, rows, row_group_rows=128)
    return folder


def write_tree(path: Path) -> Path:
    """A 3-level tree over the classes. Classes c and c+9 share shape and colour in
    render_product (they differ in texture), so they are siblings, as look-alike products
    are in the real tree; upper levels group neighbouring shapes."""
    tree: dict[str, dict[str, dict[str, list[str]]]] = {}
    for c in range(N_CLASSES):
        style = c % 9
        l1, l2, l3 = f"g{style // 5}", f"s{style // 2}", f"look{style}"
        tree.setdefault(l1, {}).setdefault(l2, {}).setdefault(l3, []).append(str(c))
    path.write_text(json.dumps(tree, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12, help="epochs per run (even: two SGDR cycles)")
    parser.add_argument("--model", default="shufflenet_v2_x0_5")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per row (data fixed)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/imat-bench-imbalance"))
    parser.add_argument("--only", nargs="*", default=None, help="run only these training rows")
    args = parser.parse_args(argv)

    import torch

    from imattrain.config import TrainConfig
    from imattrain.engine import train
    from imattrain.config import EvalConfig
    from imattrain.predict import evaluate_checkpoints

    torch.set_num_threads(args.threads)
    out = args.out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    data = write_data(out / "clean")
    tree = write_tree(out / "tree.json")
    counts = train_counts()
    print(f"train counts {counts} (ratio {counts[0] / counts[-1]:.1f}x, {sum(counts)} images); "
          f"val {VAL_PER_CLASS * N_CLASSES} balanced; {SIZE}px; {args.model}; {args.epochs} epochs; "
          f"threads {args.threads}", flush=True)

    common = dict(data=str(data), model=args.model, image_size=SIZE, eval_resize=36, epochs=args.epochs,
                  batch_size=args.batch_size, workers=0, optimizer="adamw", lr=args.lr, weight_decay=0.05,
                  momentum=0.9, schedule="sgdr", sgdr_t0=args.epochs / 2, sgdr_tmult=1.0, crop_scale=0.5,
                  rotation=0.0, device="cpu", seed=0, quiet=True,
                  eval_every=args.epochs)  # validate once, at the end: the bench evaluates itself
    variants: dict[str, dict[str, Any]] = {
        "ce": dict(two_stage=True, two_stage_epochs=1),
        "sqrt": dict(sampler="sqrt"),
        "balanced": dict(sampler="balanced"),
        "focal": dict(loss="focal", focal_gamma=2.0),
        "class-balanced": dict(loss="class-balanced", cb_beta=0.999),
        "hierarchy": dict(tree=str(tree), hier_weight=0.3),
    }
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only}

    rows: list[dict[str, Any]] = []

    def evaluate(name: str, seed: int, paths: list[Path], seconds: float | None, **kw: Any) -> None:
        rep = evaluate_checkpoints(paths, data, EvalConfig(split="val", batch_size=128, workers=0, device="cpu", **kw))
        m = rep.metrics
        rare = [c for c in m.per_class if c.label >= N_CLASSES // 2]
        rows.append({"row": name, "seed": seed, "top1": m.top1, "top3": m.top3,
                     "rare_half_top1": float(np.mean([c.top1 for c in rare])), "tau": rep.tau,
                     "train_s": seconds})
        r = rows[-1]
        (out / "results.json").write_text(json.dumps(rows, indent=2))  # partial results survive
        print(f"  {name:<22} top-1 {r['top1']:.3f}  top-3 {r['top3']:.3f}  rare-half top-1 "
              f"{r['rare_half_top1']:.3f}" + (f"  (tau {rep.tau:g})" if rep.tau else ""), flush=True)

    for seed in range(args.seeds):
        for name, extra in variants.items():
            run_dir = out / "runs" / f"{name}-seed{seed}"
            t0 = time.perf_counter()
            train(TrainConfig(**{**common, **extra, "seed": seed, "out": str(run_dir)}).validate())
            seconds = time.perf_counter() - t0
            ck = run_dir / "checkpoints"
            print(f"{name} (seed {seed}): trained in {seconds:.0f}s", flush=True)
            evaluate(name, seed, [ck / "last.pt"], seconds)
            if name == "ce":
                evaluate("ce + two-stage", seed, [ck / "two_stage.pt"], None)
                evaluate("ce + tau=1", seed, [ck / "last.pt"], None, tau=1.0)
                evaluate("ce + tau tuned on val", seed, [ck / "last.pt"], None, tune_tau=True)
                snaps = sorted(ck.glob("snapshot-cycle*.pt"))
                evaluate(f"ce snapshots x{len(snaps)}", seed, snaps, None)
                evaluate("ce + tta flip", seed, [ck / "last.pt"], None, tta="flip")
                evaluate("ce + tta five-crop", seed, [ck / "last.pt"], None, tta="five-crop")

    print()
    seeds = sorted({r["seed"] for r in rows})
    # The val split is balanced, so its top-1 is also the balanced (mean per-class) accuracy.
    print(f"mean ± std over seeds {seeds}")
    print("| row | val top-1 | val top-3 | rare-half top-1 | taus chosen | train s (mean) |")
    print("|---|---|---|---|---|---|")
    names = list(dict.fromkeys(r["row"] for r in rows))

    def ms(values: list[float]) -> str:
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    for name in names:
        rs = [r for r in rows if r["row"] == name]
        taus = ",".join(f"{r['tau']:g}" for r in rs) if name.endswith("tuned on val") else ""
        secs = [r["train_s"] for r in rs if r["train_s"]]
        print(f"| {name} | {ms([r['top1'] for r in rs])} | {ms([r['top3'] for r in rs])} | "
              f"{ms([r['rare_half_top1'] for r in rs])} | {taus} | {f'{np.mean(secs):.0f}' if secs else ''} |")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\nresults: {out / 'results.json'}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
