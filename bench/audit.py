"""Does `imattrain audit` find mislabelled images, and does dropping them pay?

    # once: the images (Debian's package, no network beyond apt) and cleanlab, bench-only,
    # in its own virtualenv (never a dependency of imat)
    apt-get install dataset-fashion-mnist
    python3 -m venv /tmp/cl && /tmp/cl/bin/pip install cleanlab
    .venv/bin/python bench/audit.py prepare --out /tmp/imat-audit
    .venv/bin/python bench/audit.py run --data /tmp/imat-audit/clean --work /tmp/imat-audit/work

Real labelled images: Fashion-MNIST photos written as clean shards by bench/recipes.py's
`prepare` (balanced here: `--per-class` train images per class, 32 px). For each noise
setting (`--kinds` x `--rates`) the bench

1. writes a root whose raw/train has known label flips: `uniform` (a random other class) or
   `pairs` (class-dependent, between look-alikes: t-shirt<->shirt, pullover<->coat,
   sneaker<->ankle boot, sandal->sneaker, dress->coat, trouser->dress, bag->pullover), val
   and test unchanged, and cleans it (`imatdata clean --min-size 0 --dedup off`: no other
   drops, so the two trainings below differ only by the suspects);
2. runs `imattrain audit --folds K` on it (timed), then scores the out-of-fold probabilities
   it wrote with each method (cl, self-confidence, margin; `rank_suspects`, no training)
   and with cleanlab's `find_label_issues` (default filter, ranked by self-confidence, in
   the cleanlab virtualenv): precision and recall of each flagged set against the flips, and
   precision of each ranking's top k (suspects.parquet's order: flagged rows by score, then
   the rest) for k = the number of flips and k = cleanlab's count;
3. for the rates of `--retrain-rates` (default 0.2), trains once on the noisy set (`imattrain run`, timed: the "one training run" of the wall
   time target), drops the suspects of `--drop-method` (`imatdata clean --drop-ids`),
   trains again, and scores both on the test split (`imattrain eval`); one run on the
   original labels gives the clean reference, so "recovered" = (dropped - noisy) /
   (clean - noisy) of test top-1.

Every training uses the same flags (`--model`, `--image-size`, `--epochs`, `--batch-size`,
seed 0). Results go to stdout as a table and to WORK/results.json.

    .venv/bin/python bench/audit.py rescore --data /tmp/imat-audit/clean   # score again, no training
    .venv/bin/python bench/audit.py drop --setting uniform-20 --min-score 0.95 --same-steps
    .venv/bin/python bench/audit.py drop --setting uniform-20 --oracle --same-steps

`drop` trains a finished setting again after dropping only the suspects scoring at least
`--min-score` (in a copy of its root), or exactly the injected flips (`--oracle`: the
ceiling of dropping); `--same-steps` trains the smaller set for as many optimiser steps as
the noisy run (epochs x raw / kept, same augmentation preset), since at a few epochs the
runs are limited by steps, not by data. Its figures go to WORK/SETTING-.../drop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import recipes  # noqa: E402 - bench/recipes.py: the Fashion-MNIST shard builder

# Look-alike classes of Fashion-MNIST (ids as in recipes.CLASSES).
PAIRS = {0: 6, 6: 0, 2: 4, 4: 2, 7: 9, 9: 7, 5: 7, 3: 4, 1: 3, 8: 2}
CLEANLAB_PYTHON = Path("/tmp/cl/bin/python")


def _run(args: list[str], *, capture: bool = False) -> str:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, *args], stdout=subprocess.PIPE if capture else None,
                          text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])} failed (exit {done.returncode})")
    return done.stdout or ""


# --- noisy roots ------------------------------------------------------------------------------


def inject(labels: np.ndarray, rate: float, kind: str, seed: int) -> np.ndarray:
    """New labels with round(rate * N) rows flipped (uniformly chosen rows)."""
    rng = np.random.default_rng([seed, int(rate * 1000), kind == "pairs"])
    noisy = labels.copy()
    rows = rng.choice(len(labels), size=int(round(rate * len(labels))), replace=False)
    for i in rows:
        if kind == "pairs":
            noisy[i] = PAIRS[int(labels[i])]
        else:
            noisy[i] = rng.choice([c for c in range(10) if c != labels[i]])
    return noisy


def flipped_ids(clean: Path, rate: float, kind: str, seed: int) -> set[str]:
    """The ids `noisy_root` flips (the same draw), without writing anything."""
    from imatdata.manifest import read_table

    table = read_table(clean / "train", columns=["id", "label"])
    labels = table.column("label").to_numpy()
    ids = table.column("id").to_pylist()
    return {ids[i] for i in np.flatnonzero(inject(labels, rate, kind, seed) != labels)}


def noisy_root(clean: Path, root: Path, rate: float, kind: str, seed: int) -> set[str]:
    """root/raw/{train (flipped), val, test} from the clean shards; returns the flipped ids."""
    import pyarrow as pa

    from imatdata.manifest import RAW_SCHEMA, ShardWriter, read_table

    if root.exists():
        shutil.rmtree(root)
    flipped: set[str] = set()
    for split in ("train", "val", "test"):
        table = read_table(clean / split).select(RAW_SCHEMA.names)
        if split == "train":
            labels = table.column("label").to_numpy()
            noisy = inject(labels, rate, kind, seed)
            ids = table.column("id").to_pylist()
            flipped = {ids[i] for i in np.flatnonzero(noisy != labels)}
            table = table.set_column(table.schema.get_field_index("label"), "label",
                                     pa.array(noisy, pa.int64()))
        with ShardWriter(root / "raw" / split, schema=RAW_SCHEMA, row_group_rows=256) as w:
            for batch in table.cast(RAW_SCHEMA).to_batches(max_chunksize=256):
                w.write_batch(batch)
    return flipped


# --- scoring ----------------------------------------------------------------------------------


def cleanlab_issues(probs: np.ndarray, labels: np.ndarray, work: Path) -> list[int]:
    """cleanlab's find_label_issues on the same probabilities (its own virtualenv): the
    flagged rows, ranked by self-confidence."""
    if not CLEANLAB_PYTHON.is_file():
        raise SystemExit(f"no cleanlab at {CLEANLAB_PYTHON}: python3 -m venv /tmp/cl && "
                         "/tmp/cl/bin/pip install cleanlab")
    np.save(work / "cl_probs.npy", probs.astype(np.float64))
    np.save(work / "cl_labels.npy", labels)
    code = ("import json, sys, numpy as np\n"
            "from cleanlab.filter import find_label_issues\n"
            f"p = np.load({str(work / 'cl_probs.npy')!r}); y = np.load({str(work / 'cl_labels.npy')!r})\n"
            "p = p / p.sum(1, keepdims=True)\n"
            "r = find_label_issues(y, p, return_indices_ranked_by='self_confidence')\n"
            "print(json.dumps([int(i) for i in r]))\n")
    done = subprocess.run([str(CLEANLAB_PYTHON), "-c", code], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit("cleanlab failed")
    return json.loads(done.stdout)


def precision_recall(chosen: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    hits = int(truth[chosen].sum())
    return {"n": int(len(chosen)), "precision": hits / len(chosen) if len(chosen) else 0.0,
            "recall": hits / int(truth.sum()) if truth.sum() else 0.0}


def score_rankings(oof_path: Path, flipped: set[str], work: Path) -> dict[str, Any]:
    from imattrain.audit import read_oof, rank_suspects

    oof = read_oof(oof_path)
    truth = np.array([i in flipped for i in oof.ids])
    cl_rows = np.asarray(cleanlab_issues(oof.probs, oof.labels, work), dtype=np.int64)
    k_true, k_cl = int(truth.sum()), len(cl_rows)
    out: dict[str, Any] = {"audited": len(oof.ids), "flips": k_true,
                           "oof_top1_vs_given": float((oof.probs.argmax(1) == oof.labels).mean()),
                           "cleanlab": {"flagged": precision_recall(cl_rows, truth),
                                        "top_k_true": precision_recall(cl_rows[:k_true], truth)}}
    for method in ("cl", "self-confidence", "margin"):
        r = rank_suspects(oof.probs, oof.labels, method)
        # suspects.parquet's order (flagged rows by score), then the unflagged rows by score.
        order = np.lexsort((-r.score, ~r.flagged))
        out[method] = {"flagged": precision_recall(np.flatnonzero(r.flagged), truth),
                       "top_k_true": precision_recall(order[:k_true], truth),
                       "top_k_cleanlab": precision_recall(order[:k_cl], truth)}
    return out


# --- training and test top-1 ------------------------------------------------------------------


def train_flags(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--image-size", str(args.image_size), "--epochs",
            str(args.epochs), "--batch-size", str(args.batch_size), "--seed", "0", "--quiet"]


def train_and_test(data: Path, out: Path, args: argparse.Namespace,
                   extra: list[str] | None = None) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    _run(["-m", "imattrain", "run", "--data", str(data), "--out", str(out), *train_flags(args),
          *(extra or [])])
    wall = time.perf_counter() - t0
    report = json.loads(_run(["-m", "imattrain", "eval", "--checkpoint", str(out), "--data",
                              str(data), "--split", "test", "--json"], capture=True))
    return {"test_top1": report["top1"], "wall_s": wall}


def clean_root(root: Path, *extra: str) -> dict[str, int]:
    _run(["-m", "imatdata", "clean", "--root", str(root), "--min-size", "0", "--dedup", "off",
          "--quiet", *extra])
    import pyarrow.parquet as pq

    from imatdata.manifest import read_table

    dropped = pq.read_table(root / "clean" / "dropped.parquet").to_pydict()
    kept = read_table(root / "clean" / "train").num_rows
    raw = read_table(root / "raw" / "train").num_rows
    drops = sum(1 for s in dropped["split"] if s == "train")
    assert kept + drops == raw, (kept, drops, raw)
    return {"raw": raw, "kept": kept, "dropped": drops}


def run_setting(kind: str, rate: float, args: argparse.Namespace, clean_top1: float | None) -> dict[str, Any]:
    root = args.work / f"{kind}-{int(rate * 100)}"
    flipped = noisy_root(args.data, root, rate, kind, args.seed)
    clean_root(root)
    audit = root / "audit"
    t0 = time.perf_counter()
    _run(["-m", "imattrain", "audit", "--data", str(root / "clean"), "--out", str(audit),
          "--folds", str(args.folds), *train_flags(args)])
    audit_wall = time.perf_counter() - t0
    result: dict[str, Any] = {"kind": kind, "rate": rate, "audit_wall_s": audit_wall,
                              **score_rankings(audit / "oof_probs.parquet", flipped, root)}
    if rate not in args.retrain:
        return result
    noisy = train_and_test(root / "clean", root / "run-noisy", args)
    # The drop: the suspects of --drop-method, ranked again from the same probabilities.
    ranked = root / f"audit-{args.drop_method}"
    _run(["-m", "imattrain", "audit", "--probs", str(audit / "oof_probs.parquet"), "--data",
          str(root / "clean"), "--out", str(ranked), "--method", args.drop_method, "--sheet", "0",
          "--force", "--quiet"])
    result["drop_clean"] = clean_root(root, "--drop-ids", str(ranked / "suspects.parquet"))
    dropped = train_and_test(root / "clean", root / "run-dropped", args)
    result.update(noisy_test_top1=noisy["test_top1"], dropped_test_top1=dropped["test_top1"],
                  run_wall_s=noisy["wall_s"],
                  audit_vs_runs=audit_wall / (args.folds * noisy["wall_s"]))
    if clean_top1 is not None and clean_top1 > noisy["test_top1"]:
        result["recovered"] = ((dropped["test_top1"] - noisy["test_top1"])
                               / (clean_top1 - noisy["test_top1"]))
    return result


def redrop(args: argparse.Namespace) -> dict[str, Any]:
    """Drop a finished setting's suspects scoring at least --min-score (in a copy of its
    root) and train again; the figures, with the setting's noisy and clean runs beside."""
    src = args.work / args.setting
    which = "oracle" if args.oracle else f"min{args.min_score:g}"
    root = args.work / f"{args.setting}-{which}{'-steps' if args.same_steps else ''}"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(src / "raw", root / "raw")
    if args.oracle:
        # The ceiling: exactly the injected flips, as a suspects file of ids.
        import pyarrow as pa
        import pyarrow.parquet as pq

        kind, percent = args.setting.rsplit("-", 1)
        flipped = sorted(flipped_ids(args.data, int(percent) / 100, kind, args.seed))
        pq.write_table(pa.table({"id": pa.array(flipped, pa.string())}), root / "oracle.parquet")
        drop = clean_root(root, "--drop-ids", str(root / "oracle.parquet"))
    else:
        ranked = root / f"audit-{args.drop_method}"
        _run(["-m", "imattrain", "audit", "--probs", str(src / "audit" / "oof_probs.parquet"),
              "--data", str(src / "clean"), "--out", str(ranked), "--method", args.drop_method,
              "--sheet", "0", "--quiet"])
        drop = clean_root(root, "--drop-ids", str(ranked / "suspects.parquet"), "--min-score",
                          str(args.min_score))
    extra = []
    if args.same_steps:
        # As many optimiser steps as the noisy run: the epochs grow by raw / kept, and the
        # recipe the noisy run's epochs chose is kept (the auto recipe follows the epochs).
        from imattrain.config import auto_recipe

        augment = auto_recipe(args.epochs, False, "cosine")["augment"]
        args.epochs = int(round(args.epochs * drop["raw"] / drop["kept"]))
        extra = ["--augment", augment]
    dropped = train_and_test(root / "clean", root / "run-dropped", args, extra)
    results = json.loads((args.work / "results.json").read_text())
    setting = next(s for s in results["settings"] if f"{s['kind']}-{int(s['rate'] * 100)}" == args.setting)
    clean_top1, noisy_top1 = results["clean_test_top1"], setting["noisy_test_top1"]
    out = {"setting": args.setting, "oracle": args.oracle, "min_score": args.min_score,
           "method": args.drop_method,
           "same_steps": args.same_steps, "epochs": args.epochs,
           "drop_clean": drop, "dropped_test_top1": dropped["test_top1"],
           "noisy_test_top1": noisy_top1, "clean_test_top1": clean_top1,
           "recovered": (dropped["test_top1"] - noisy_top1) / (clean_top1 - noisy_top1)}
    (root / "drop.json").write_text(json.dumps(out, indent=2))
    return out


def show(results: dict[str, Any]) -> None:
    print(f"clean labels: test top-1 {results.get('clean_test_top1')}")
    for r in results["settings"]:
        print(f"\n{r['kind']} {100 * r['rate']:.0f}%: {r['flips']} flips of {r['audited']} "
              f"(out-of-fold top-1 vs given labels {r['oof_top1_vs_given']:.3f}); audit "
              f"{r['audit_wall_s']:.0f} s")
        print(f"  {'method':16} {'flagged':>7} {'prec':>6} {'recall':>6}   {'P@flips':>7}   "
              f"{'P@k_cleanlab':>12}")
        for m in ("cl", "self-confidence", "margin", "cleanlab"):
            x = r[m]
            pk = x.get("top_k_cleanlab", x["flagged"])["precision"]
            print(f"  {m:16} {x['flagged']['n']:7d} {x['flagged']['precision']:6.3f} "
                  f"{x['flagged']['recall']:6.3f}   {x['top_k_true']['precision']:7.3f}   "
                  f"{pk:12.3f}")
        if "noisy_test_top1" in r:
            rec = f", recovered {r['recovered']:.2f} of the loss" if "recovered" in r else ""
            print(f"  test top-1: noisy {r['noisy_test_top1']:.4f}, after dropping "
                  f"{r['drop_clean']['dropped']} suspects {r['dropped_test_top1']:.4f}{rec}; "
                  f"one run {r['run_wall_s']:.0f} s, audit / (K x run) {r['audit_vs_runs']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the clean shards (balanced, small)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--source", type=Path, default=recipes.DEBIAN_DIR)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--test-per-class", type=int, default=200)
    r = sub.add_parser("run", help="inject noise, audit, compare with cleanlab, retrain")
    r.add_argument("--data", type=Path, required=True, help="clean shards (from `prepare`)")
    r.add_argument("--work", type=Path, default=Path("/tmp/imat-audit/work"))
    r.add_argument("--kinds", default="uniform,pairs")
    r.add_argument("--rates", default="0.2,0.05")
    r.add_argument("--folds", type=int, default=4)
    r.add_argument("--seed", type=int, default=0, help="which rows are flipped")
    c = sub.add_parser("rescore", help="score the audits of a finished `run` again (no training)")
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--work", type=Path, default=Path("/tmp/imat-audit/work"))
    c.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("drop", help="a setting `run` finished, trained again after dropping its "
                                    "suspects that score at least --min-score")
    d.add_argument("--work", type=Path, default=Path("/tmp/imat-audit/work"))
    d.add_argument("--setting", required=True, help="e.g. uniform-20 (a folder of --work)")
    d.add_argument("--min-score", type=float, default=0.0)
    d.add_argument("--oracle", action="store_true",
                   help="drop exactly the injected flips instead (the ceiling of dropping)")
    d.add_argument("--data", type=Path, default=Path("/tmp/imat-audit/clean"),
                   help="the shards `run` started from (for --oracle's flips)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--same-steps", action="store_true",
                   help="train the smaller set for as many steps as the noisy run (more epochs)")
    for q in (r, d):
        q.add_argument("--model", default="resnet18")
        q.add_argument("--image-size", type=int, default=32)
        q.add_argument("--epochs", type=int, default=8)
        q.add_argument("--batch-size", type=int, default=64)
        q.add_argument("--drop-method", default="cl", choices=("cl", "self-confidence", "margin"))
    r.add_argument("--retrain-rates", default="0.2",
                   help="rates whose settings also train noisy vs dropped ('' for none)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        recipes.prepare(args.out, args.source, size=args.size, most=args.per_class,
                        least=args.per_class, val_per_class=args.val_per_class,
                        test_per_class=args.test_per_class)
        return 0
    if args.command == "rescore":
        results = json.loads((args.work / "results.json").read_text())
        for r in results["settings"]:
            root = args.work / f"{r['kind']}-{int(r['rate'] * 100)}"
            flipped = flipped_ids(args.data, r["rate"], r["kind"], args.seed)
            r.update(score_rankings(root / "audit" / "oof_probs.parquet", flipped, root))
        (args.work / "results.json").write_text(json.dumps(results, indent=2))
        show(results)
        return 0
    if args.command == "drop":
        print(json.dumps(redrop(args), indent=2))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "settings": []}
    path = args.work / "results.json"
    clean_top1 = None
    args.retrain = {float(x) for x in args.retrain_rates.split(",") if x.strip()}
    if args.retrain:
        clean_top1 = train_and_test(args.data, args.work / "run-clean", args)["test_top1"]
        results["clean_test_top1"] = clean_top1
    for rate in (float(x) for x in args.rates.split(",")):
        for kind in args.kinds.split(","):
            results["settings"].append(run_setting(kind, rate, args, clean_top1))
            path.write_text(json.dumps(results, indent=2))  # after each setting: a cut-off run keeps them
    show(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
