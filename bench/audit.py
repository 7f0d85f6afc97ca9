"""Does `imattrain audit` find mislabelled images, and does feeding them back pay?

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
   drops, so the trainings below differ only by the labels); the flipped ids go to
   SETTING/flips.json;
2. runs `imattrain audit --folds K` on it (timed), then scores the out-of-fold probabilities
   it wrote with each method (cl, self-confidence, margin; `rank_suspects`, no training)
   and with cleanlab's `find_label_issues` (default filter, ranked by self-confidence, in
   the cleanlab virtualenv; `--no-cleanlab` on a machine without it): precision and recall
   of each flagged set against the flips, and precision of each ranking's top k
   (suspects.parquet's order: flagged rows by score, then the rest) for k = the number of
   flips and k = cleanlab's count;
3. for the rates of `--retrain-rates` (default 0.2), trains every `--variants` entry with
   every `--seeds` seed (`imattrain run`, then `imattrain eval` on test): `clean` (the true
   labels), `noisy`, `drop@S` (`imatdata clean --drop-ids suspects.parquet --min-score S`),
   `relabel@S` (`imattrain run --relabel suspects.parquet --relabel-min-score S`) and
   `oracle` (dropping exactly the flips: the ceiling of dropping). "Recovered" = (variant -
   noisy) / (clean - noisy) of the mean test top-1 over the seeds: one seed is not enough,
   as runs differ by up to 4 points on 3,000 images. The noisy runs' wall time is the "one
   training run" of the wall-time target.

Every training uses the same flags (`--model`, `--image-size`, `--epochs`, `--batch-size`,
`--lr`, `--workers`, and any `--train-args`, e.g. `--train-args '--augment none'`). Results go to stdout and to WORK/results.json (saved after the audit and after
every run, so a run cut off keeps what it finished), the runs to WORK/SETTING/retrain.json.

    .venv/bin/python bench/audit.py rescore --data /tmp/imat-audit/clean   # score again, no training
    .venv/bin/python bench/audit.py retrain --setting uniform-20 --variants drop@0.9 --seeds 0,1,2,3
    .venv/bin/python bench/audit.py subset --out bench/audit-data --train 24000 --test 6000
    .venv/bin/python bench/audit.py cleanlab --oof DIR/oof_probs.parquet --flips DIR/flips.json

`retrain` adds variants or seeds to a finished setting (runs already done are not trained
again). `subset` writes a smaller copy of Fashion-MNIST's idx files (each class equally) that
`prepare --source` reads, to carry to a machine without the Debian package (a GPU without
internet); `cleanlab` scores an audit made there with `--no-cleanlab` against cleanlab here.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import recipes  # noqa: E402 - bench/recipes.py: the Fashion-MNIST shard builder

VARIANTS = ("clean", "noisy", "drop", "relabel", "oracle")
DEFAULT_VARIANTS = "clean,noisy,drop@0.95,relabel@0.95,oracle"
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


def score_rankings(oof_path: Path, flipped: set[str], work: Path,
                   cleanlab: bool = True) -> dict[str, Any]:
    """Precision and recall of each method's flagged set and top k against the flips; with
    `cleanlab` False (a machine without it) cleanlab's columns are left out, and `rescore`
    adds them later from the same oof_probs.parquet."""
    from imattrain.audit import read_oof, rank_suspects

    oof = read_oof(oof_path)
    truth = np.array([i in flipped for i in oof.ids])
    k_true = int(truth.sum())
    out: dict[str, Any] = {"audited": len(oof.ids), "flips": k_true,
                           "oof_top1_vs_given": float((oof.probs.argmax(1) == oof.labels).mean())}
    k_cl = None
    if cleanlab:
        cl_rows = np.asarray(cleanlab_issues(oof.probs, oof.labels, work), dtype=np.int64)
        k_cl = len(cl_rows)
        out["cleanlab"] = {"flagged": precision_recall(cl_rows, truth),
                           "top_k_true": precision_recall(cl_rows[:k_true], truth)}
    for method in ("cl", "self-confidence", "margin"):
        r = rank_suspects(oof.probs, oof.labels, method)
        # suspects.parquet's order (flagged rows by score), then the unflagged rows by score.
        order = np.lexsort((-r.score, ~r.flagged))
        out[method] = {"flagged": precision_recall(np.flatnonzero(r.flagged), truth),
                       "top_k_true": precision_recall(order[:k_true], truth)}
        if k_cl is not None:
            out[method]["top_k_cleanlab"] = precision_recall(order[:k_cl], truth)
    return out


# --- training and test top-1 ------------------------------------------------------------------


def train_flags(args: argparse.Namespace, seed: int = 0, workers: int | None = None) -> list[str]:
    flags = ["--model", args.model, "--image-size", str(args.image_size), "--epochs",
             str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(seed), "--quiet"]
    if args.lr is not None:
        flags += ["--lr", str(args.lr)]
    flags += shlex.split(args.train_args)
    workers = args.workers if workers is None else workers
    if workers is not None:
        flags += ["--workers", str(workers)]
    return flags


def train_and_test(data: Path, out: Path, args: argparse.Namespace,
                   extra: list[str] | None = None, seed: int = 0,
                   workers: int | None = None) -> dict[str, Any]:
    """`imattrain run` then test top-1; a finished run with the same flags (out/test.json)
    is not trained again."""
    flags = [*train_flags(args, seed, workers), *(extra or [])]
    done = out / "test.json"
    if done.is_file():
        old = json.loads(done.read_text())
        if old.get("flags") == flags and old.get("data") == str(data):
            return old
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    _run(["-m", "imattrain", "run", "--data", str(data), "--out", str(out), *flags])
    wall = time.perf_counter() - t0
    report = json.loads(_run(["-m", "imattrain", "eval", "--checkpoint", str(out), "--data",
                              str(data), "--split", "test", "--json"], capture=True))
    result = {"test_top1": report["top1"], "wall_s": wall, "flags": flags, "data": str(data)}
    done.write_text(json.dumps(result, indent=2))
    return result


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


def setting_flips(args: argparse.Namespace, setting: str) -> set[str]:
    """The ids a setting flipped: its flips.json (written by `run`, so a setting audited on
    another machine is scored here), else drawn again from --data and --seed."""
    saved = args.work / setting / "flips.json"
    if saved.is_file():
        return set(json.loads(saved.read_text()))
    kind, percent = setting.rsplit("-", 1)
    return flipped_ids(args.data, int(percent) / 100, kind, args.seed)


def direct_clean(root: Path, drop: set[str] | frozenset[str] = frozenset()) -> dict[str, int]:
    """root/clean written straight from root/raw, less the train ids in `drop`, for a machine
    where `imatdata clean` cannot run (`--no-clean`: no imagehash there). The shards hold
    every check's pass here (real, decodable, distinct photos), so only the drop differs."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from imatdata.manifest import CLEAN_SCHEMA, ShardWriter, read_table

    if (root / "clean").exists():
        shutil.rmtree(root / "clean")
    counts = {}
    for split in ("train", "val", "test"):
        table = read_table(root / "raw" / split)
        raw = table.num_rows
        if split == "train" and drop:
            table = table.filter(pc.invert(pc.is_in(table.column("id"),
                                                    value_set=pa.array(sorted(drop), pa.string()))))
            counts = {"raw": raw, "kept": table.num_rows, "dropped": raw - table.num_rows}
        table = table.append_column("phash", pa.nulls(table.num_rows, pa.int64())).cast(CLEAN_SCHEMA)
        with ShardWriter(root / "clean" / split, schema=CLEAN_SCHEMA, row_group_rows=256) as w:
            for batch in table.to_batches(max_chunksize=256):
                w.write_batch(batch)
    return counts or {"raw": raw, "kept": raw, "dropped": 0}


def run_setting(kind: str, rate: float, args: argparse.Namespace,
                save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Flip, clean, audit and score one setting (`save` it then: a run cut off during the
    retraining keeps the audit's figures), then train its --variants."""
    name = f"{kind}-{int(rate * 100)}"
    root = args.work / name
    flipped = noisy_root(args.data, root, rate, kind, args.seed)
    (root / "flips.json").write_text(json.dumps(sorted(flipped)))
    if args.direct:
        direct_clean(root)
    else:
        clean_root(root)
    audit = root / "audit"
    t0 = time.perf_counter()
    _run(["-m", "imattrain", "audit", "--data", str(root / "clean"), "--out", str(audit),
          "--folds", str(args.folds), *train_flags(args)])
    audit_wall = time.perf_counter() - t0
    result: dict[str, Any] = {"kind": kind, "rate": rate, "audit_wall_s": audit_wall,
                              **score_rankings(audit / "oof_probs.parquet", flipped, root,
                                               cleanlab=args.cleanlab)}
    if rate not in args.retrain:
        return result
    save(result)
    args.setting = name
    done = retrain(args)
    result["retrain"] = summarise(done)
    walls = [r["wall_s"] for r in done.get("noisy", {}).get("runs", {}).values() if r.get("wall_s")]
    if walls:
        result["run_wall_s"] = float(np.mean(walls))
        result["audit_vs_runs"] = audit_wall / (args.folds * result["run_wall_s"])
    return result


# --- retraining: does the audit's feedback pay? ----------------------------------------------


def _variant(spec: str) -> tuple[str, float | None]:
    """'drop@0.95' -> ('drop', 0.95); 'noisy' -> ('noisy', None)."""
    name, _, score = spec.partition("@")
    if name not in VARIANTS:
        raise SystemExit(f"--variants: {spec!r} is not one of {', '.join(VARIANTS)} (@SCORE "
                         "optional for drop and relabel)")
    if score and name not in ("drop", "relabel"):
        raise SystemExit(f"--variants: only drop and relabel take @SCORE (got {spec!r})")
    return name, float(score) if score else None


def true_labels(clean: Path) -> dict[str, int]:
    from imatdata.manifest import read_table

    table = read_table(clean / "train", columns=["id", "label"])
    return dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))


def variant_data(spec: str, args: argparse.Namespace) -> tuple[Path, list[str], dict[str, Any]]:
    """The clean shards a variant trains on (built once per variant), its extra `run` flags,
    and what it changed: rows dropped or relabelled, how many of them were injected flips,
    and for relabelling how many got their true class back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name, min_score = _variant(spec)
    src = args.work / args.setting
    if name == "clean":
        return args.data, [], {}
    if name == "noisy":
        return src / "clean", [], {}
    suspects_file = src / f"audit-{args.drop_method}" / "suspects.parquet"
    if name == "relabel":
        # `imattrain run --relabel`: the noisy shards, the suspects' suggested class.
        extra = ["--relabel", str(suspects_file)]
        if min_score is not None:
            extra += ["--relabel-min-score", str(min_score)]
        data = src / "clean"
    else:
        extra, data = [], src / f"v-{spec}" / "clean"
    info_path = src / f"v-{spec}.json"
    if info_path.is_file() and (name == "relabel" or data.is_dir()):
        return data, extra, json.loads(info_path.read_text())
    flipped = setting_flips(args, args.setting)
    if name == "oracle":
        chosen = {"id": sorted(flipped)}
    else:
        suspects = pq.read_table(suspects_file).to_pydict()
        keep = [k for k, s in enumerate(suspects["score"]) if min_score is None or s >= min_score]
        chosen = {c: [suspects[c][k] for k in keep] for c in ("id", "suggested")}
    info: dict[str, Any] = {"changed": len(chosen["id"]),
                            "flips_among": sum(i in flipped for i in chosen["id"])}
    info["precision"] = info["flips_among"] / info["changed"] if info["changed"] else 0.0
    info["recall"] = info["flips_among"] / len(flipped) if flipped else 0.0
    if name == "relabel":
        truth = true_labels(args.data)
        info["restored"] = sum(truth[i] == s for i, s in zip(chosen["id"], chosen["suggested"]))
    else:
        root = data.parent
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(src / "raw", root / "raw")
        if name == "oracle":
            # The ceiling of dropping: exactly the injected flips, as a suspects file of ids.
            ids = root / "oracle.parquet"
            pq.write_table(pa.table({"id": pa.array(chosen["id"], pa.string())}), ids)
            info["drop_clean"] = (direct_clean(root, set(chosen["id"])) if args.direct else
                                  clean_root(root, "--drop-ids", str(ids)))
        else:
            drop = ["--drop-ids", str(suspects_file)]
            if min_score is not None:
                drop += ["--min-score", str(min_score)]
            info["drop_clean"] = (direct_clean(root, set(chosen["id"])) if args.direct else
                                  clean_root(root, *drop))
    info_path.write_text(json.dumps(info, indent=2))
    return data, extra, info


def retrain(args: argparse.Namespace) -> dict[str, Any]:
    """Train every variant with every seed (runs already done are kept) and test them."""
    src = args.work / args.setting
    ranked = src / f"audit-{args.drop_method}"
    if not (ranked / "suspects.parquet").is_file():
        _run(["-m", "imattrain", "audit", "--probs", str(src / "audit" / "oof_probs.parquet"),
              "--data", str(src / "clean"), "--out", str(ranked), "--method", args.drop_method,
              "--sheet", "0", "--force", "--quiet"])
    path = src / "retrain.json"
    done: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    seeds = [int(x) for x in args.seeds.split(",")]
    jobs = []
    for spec in args.variants.split(","):
        data, extra, info = variant_data(spec, args)
        entry = done.setdefault(spec, {"info": info, "runs": {}})
        for seed in seeds:
            if str(seed) not in entry["runs"]:
                # The clean runs serve every setting of --work.
                out = (args.work if spec == "clean" else src) / f"run-{spec}-s{seed}"
                jobs.append((spec, seed, data, out, extra))
    lock = threading.Lock()

    def one(job: tuple[str, int, Path, Path, list[str]], workers: int | None) -> None:
        spec, seed, data, out, extra = job
        result = train_and_test(data, out, args, extra, seed=seed, workers=workers)
        with lock:
            done[spec]["runs"][str(seed)] = result
            path.write_text(json.dumps(done, indent=2))  # after each run: a cut-off keeps them

    # The noisy runs alone (their wall time is the "one run" of the audit's target), then the
    # rest --parallel at a time, the loader workers shared out (a small model leaves a big
    # GPU mostly idle, so runs side by side finish sooner than one after another).
    alone = [j for j in jobs if j[0] == "noisy" or args.parallel <= 1]
    rest = [j for j in jobs if j not in alone]
    for job in alone:
        one(job, args.workers)
    if rest:
        from concurrent.futures import ThreadPoolExecutor

        share = None if args.workers is None else max(1, args.workers // args.parallel)
        pool = ThreadPoolExecutor(args.parallel)
        try:
            for future in [pool.submit(one, job, share) for job in rest]:
                future.result()
        finally:  # interrupted or failed: start no more runs
            pool.shutdown(wait=True, cancel_futures=True)
    show_retrain(summarise(done), args.setting)
    return done


def summarise(done: dict[str, Any]) -> dict[str, Any]:
    """Per variant: mean test top-1 over its seeds, each seed's, and what it changed; per
    variant but clean and noisy, the share of the noise's cost it recovered (of the means)."""
    out: dict[str, Any] = {}
    for v, e in done.items():
        tops = [r["test_top1"] for _, r in sorted(e["runs"].items())]
        if tops:
            out[v] = {"mean": float(np.mean(tops)), "seeds": tops, **e["info"]}
    clean, noisy = out.get("clean", {}).get("mean"), out.get("noisy", {}).get("mean")
    if clean is not None and noisy is not None and clean > noisy:
        for v, x in out.items():
            if v not in ("clean", "noisy"):
                x["recovered"] = (x["mean"] - noisy) / (clean - noisy)
    return out


def show_retrain(summary: dict[str, Any], setting: str) -> None:
    print(f"  {setting}: test top-1, mean over seeds [each seed]")
    for v, x in summary.items():
        seeds = " ".join(f"{t:.4f}" for t in x["seeds"])
        what = (f"  {x['changed']} rows, precision {x['precision']:.3f}, recall {x['recall']:.3f}"
                if "changed" in x else "")
        if "restored" in x:
            what += f", {x['restored']} given their true class back"
        rec = f"  recovered {x['recovered']:+.2f}" if "recovered" in x else ""
        print(f"    {v:14} {x['mean']:.4f} [{seeds}]{rec}{what}")


def show(results: dict[str, Any]) -> None:
    for r in results["settings"]:
        print(f"\n{r['kind']} {100 * r['rate']:.0f}%: {r['flips']} flips of {r['audited']} "
              f"(out-of-fold top-1 vs given labels {r['oof_top1_vs_given']:.3f}); audit "
              f"{r['audit_wall_s']:.0f} s")
        print(f"  {'method':16} {'flagged':>7} {'prec':>6} {'recall':>6}   {'P@flips':>7}   "
              f"{'P@k_cleanlab':>12}")
        for m in ("cl", "self-confidence", "margin", "cleanlab"):
            if m not in r:
                continue
            x = r[m]
            pk = x.get("top_k_cleanlab", x["flagged"] if m == "cleanlab" else {}).get("precision")
            print(f"  {m:16} {x['flagged']['n']:7d} {x['flagged']['precision']:6.3f} "
                  f"{x['flagged']['recall']:6.3f}   {x['top_k_true']['precision']:7.3f}   "
                  + (f"{pk:12.3f}" if pk is not None else f"{'-':>12}"))
        if "retrain" in r:
            show_retrain(r["retrain"], f"{r['kind']}-{int(r['rate'] * 100)}")
        if "audit_vs_runs" in r:
            print(f"  one run {r['run_wall_s']:.0f} s, audit / (K x run) {r['audit_vs_runs']:.2f}")


def write_subset(source: Path, out: Path, train: int, test: int, seed: int = 0) -> None:
    """Fashion-MNIST's four idx files holding `train` train and `test` test images (each
    class equally, seeded): small enough to carry to a machine without the Debian package,
    and read by `prepare --source` as the full set is."""
    import gzip

    x, y, tx, ty = recipes.load_fashion_mnist(source)
    rng = np.random.default_rng(seed)

    def pick(labels: np.ndarray, n: int) -> np.ndarray:
        per = n // 10
        rows = [rng.permutation(np.flatnonzero(labels == c))[:per] for c in range(10)]
        return np.sort(np.concatenate(rows))

    out.mkdir(parents=True, exist_ok=True)
    for prefix, images, labels, n in (("train", x, y, train), ("t10k", tx, ty, test)):
        rows = pick(labels, n)
        head = (2051).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (len(rows), 28, 28))
        with gzip.open(out / f"{prefix}-images-idx3-ubyte.gz", "wb", compresslevel=9) as f:
            f.write(head + images[rows].tobytes())
        head = (2049).to_bytes(4, "big") + len(rows).to_bytes(4, "big")
        with gzip.open(out / f"{prefix}-labels-idx1-ubyte.gz", "wb", compresslevel=9) as f:
            f.write(head + labels[rows].astype(np.uint8).tobytes())
    print(f"{train} train and {test} test images -> {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("subset", help="write a smaller copy of Fashion-MNIST's idx files")
    s.add_argument("--source", type=Path, default=recipes.DEBIAN_DIR)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--train", type=int, default=24000)
    s.add_argument("--test", type=int, default=10000)
    p = sub.add_parser("prepare", help="write the clean shards (balanced, small)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--source", type=Path, default=recipes.DEBIAN_DIR)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--test-per-class", type=int, default=200)
    r = sub.add_parser("run", help="inject noise, audit, compare with cleanlab, retrain")
    r.add_argument("--kinds", default="uniform,pairs")
    r.add_argument("--rates", default="0.2,0.05")
    r.add_argument("--folds", type=int, default=4)
    r.add_argument("--retrain-rates", default="0.2",
                   help="rates whose settings also train the --variants ('' for none)")
    r.add_argument("--no-cleanlab", dest="cleanlab", action="store_false",
                   help="leave cleanlab out (a machine without it); `rescore` adds it later")
    c = sub.add_parser("rescore", help="score the audits of a finished `run` again (no training), "
                                       "cleanlab included")
    o = sub.add_parser("cleanlab", help="score one audit's oof_probs.parquet against its flips "
                                         "file, cleanlab included (for a run made elsewhere "
                                         "with --no-cleanlab)")
    o.add_argument("--oof", type=Path, required=True)
    o.add_argument("--flips", type=Path, required=True, help="the setting's flips.json")
    t = sub.add_parser("retrain", help="a setting `run` finished: test top-1 of models trained "
                                        "on each variant of its labels, with several seeds")
    t.add_argument("--setting", required=True, help="e.g. uniform-20 (a folder of --work)")
    for q in (r, c, t):
        q.add_argument("--data", type=Path, default=Path("/tmp/imat-audit/clean"),
                       help="clean shards (from `prepare`): the true labels")
        q.add_argument("--work", type=Path, default=Path("/tmp/imat-audit/work"))
        q.add_argument("--seed", type=int, default=0, help="which rows are flipped")
    for q in (r, t):
        q.add_argument("--variants", default=DEFAULT_VARIANTS,
                       help="what each retraining trains on: clean (the true labels), noisy, "
                            "drop[@S] (without the suspects scoring >= S), relabel[@S] (their "
                            "suggested class instead), oracle (without exactly the flips)")
        q.add_argument("--seeds", default="0,1", help="training seeds of every variant")
        q.add_argument("--model", default="resnet18")
        q.add_argument("--image-size", type=int, default=32)
        q.add_argument("--epochs", type=int, default=8)
        q.add_argument("--batch-size", type=int, default=64)
        q.add_argument("--lr", type=float, default=None, help="every training's --lr (default: imattrain's)")
        q.add_argument("--train-args", default="",
                       help="more `imattrain run` flags for every training, e.g. '--augment none "
                            "--label-smoothing 0' (a recipe that fits the flips)")
        q.add_argument("--workers", type=int, default=None,
                       help="loader workers of every training (default: imattrain's)")
        q.add_argument("--no-clean", dest="direct", action="store_true",
                       help="write the noisy and dropped shards directly instead of running "
                            "`imatdata clean` (a machine without imagehash)")
        q.add_argument("--parallel", type=int, default=1,
                       help="retrainings side by side after the noisy ones (each gets "
                            "--workers / N loader workers)")
        q.add_argument("--drop-method", default="cl", choices=("cl", "self-confidence", "margin"))
    args = parser.parse_args(argv)
    if args.command == "subset":
        write_subset(args.source, args.out, args.train, args.test)
        return 0
    if args.command == "prepare":
        recipes.prepare(args.out, args.source, size=args.size, most=args.per_class,
                        least=args.per_class, val_per_class=args.val_per_class,
                        test_per_class=args.test_per_class)
        return 0
    if args.command == "rescore":
        results = json.loads((args.work / "results.json").read_text())
        for r in results["settings"]:
            root = args.work / f"{r['kind']}-{int(r['rate'] * 100)}"
            flipped = setting_flips(args, root.name)
            r.update(score_rankings(root / "audit" / "oof_probs.parquet", flipped, root))
        (args.work / "results.json").write_text(json.dumps(results, indent=2))
        show(results)
        return 0
    if args.command == "retrain":
        retrain(args)
        return 0
    if args.command == "cleanlab":
        import tempfile

        flipped = set(json.loads(args.flips.read_text()))
        with tempfile.TemporaryDirectory() as tmp:
            scored = score_rankings(args.oof, flipped, Path(tmp))
        print(json.dumps(scored, indent=2))
        show({"settings": [{"kind": args.oof.parent.name, "rate": scored["flips"] / scored["audited"],
                            "audit_wall_s": float("nan"), **scored}]})
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "settings": []}
    path = args.work / "results.json"
    args.retrain = {float(x) for x in args.retrain_rates.split(",") if x.strip()}

    def save(setting: dict[str, Any]) -> None:  # after each step: a cut-off run keeps them
        results["settings"] = [r for r in results["settings"]
                               if (r["kind"], r["rate"]) != (setting["kind"], setting["rate"])]
        results["settings"].append(setting)
        path.write_text(json.dumps(results, indent=2))

    for rate in (float(x) for x in args.rates.split(",")):
        for kind in args.kinds.split(","):
            save(run_setting(kind, rate, args, save))
    show(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
