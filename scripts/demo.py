"""`make demo`: the whole imat pipeline on the embedded sample, end to end, on CPU.

local image server on 127.0.0.1 → imatdata fetch → clean → stats → imattrain run → predict,
then a short report of what happened and where every output is. The server is stopped
whatever happens. Each step is the real command-line tool, exactly as a user would type it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc

from imatdata import manifest

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if not found:
        sys.exit(f"demo: {name} is not installed; run `make demo` (it installs the project first)")
    return found


def step(title: str, argv: list[str], env: dict[str, str]) -> float:
    print(f"\n\033[1m== {title}\033[0m\n$ {' '.join(Path(a).name if i == 0 else a for i, a in enumerate(argv))}",
          flush=True)
    start = time.monotonic()
    result = subprocess.run(argv, env=env)
    if result.returncode != 0:
        raise SystemExit(f"demo: step '{title}' failed with exit code {result.returncode}")
    return time.monotonic() - start


def start_server(data_dir: Path, seed: int) -> subprocess.Popen:
    data_dir.mkdir(parents=True, exist_ok=True)
    info = data_dir / "server.json"
    info.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "imatsample", "serve", "--out", str(data_dir),
                             "--kind", "demo", "--seed", str(seed)])
    deadline = time.monotonic() + 60
    while not info.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise SystemExit("demo: the sample image server did not start")
        time.sleep(0.1)
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT if os.name != "nt" else signal.CTRL_BREAK_EVENT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def report(out: Path, root: Path, run_dir: Path, submission: Path, timings: dict[str, float]) -> None:
    raw = manifest.read_table(root / "raw", columns=["split", "status"])
    print("\n\033[1m== imat demo: what happened\033[0m")
    for split in sorted(set(raw.column("split").to_pylist())):
        rows = raw.filter(pc.equal(raw.column("split"), split))
        counts = rows.column("status").value_counts().to_pylist()
        ok = next((c["counts"] for c in counts if c["values"] == "ok"), 0)
        failed = ", ".join(f"{c['values']} {c['counts']}" for c in counts if c["values"] != "ok")
        print(f"  fetched {split:5s}: {rows.num_rows} URLs, {ok} images ok" + (f"; {failed}" if failed else ""))
    dropped_path = root / "clean" / "dropped.parquet"
    if dropped_path.exists():
        dropped = manifest.read_table([dropped_path], columns=["reason"])
        reasons = ", ".join(f"{c['values']} {c['counts']}"
                            for c in dropped.column("reason").value_counts().to_pylist())
        print(f"  cleaned: {dropped.num_rows} rows left out ({reasons or 'none'})")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [m for m in metrics if "top3" in m]
    if epochs:
        first, last = epochs[0], epochs[-1]
        # The epoch the trainer chose for best.pt (imattrain.selection), as its metrics say.
        chosen = epochs[-1].get("best_epoch")
        best = next((m for m in epochs if m["epoch"] == chosen), epochs[-1])
        print(f"  trained: {len(epochs)} epochs; val top-1 {first['top1']:.1%} → {last['top1']:.1%}, "
              f"top-3 {first['top3']:.1%} → {last['top3']:.1%}; best.pt is epoch {best['epoch']} "
              f"(top-1 {best['top1']:.1%}, top-3 {best['top3']:.1%})")
    rows = submission.read_text().splitlines()
    print(f"  predicted: {len(rows) - 1} test ids in {submission}")
    print("\n  where everything is:")
    print(f"    URL lists      {out / 'data'}")
    print(f"    raw shards     {root / 'raw'}")
    print(f"    clean shards   {root / 'clean'}   (dropped rows: {dropped_path})")
    print(f"    stats & plots  {root / 'stats'}")
    print(f"    training run   {run_dir}   (metrics.jsonl, curves.png, checkpoints/)")
    print(f"    submission     {submission}")
    total = sum(timings.values())
    print("\n  time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {total:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo"), help="where the demo writes (default ./demo)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    root, run_dir, submission = out / "manifests", out / "runs" / "demo", out / "submission.csv"
    env = {**os.environ, "IMAT_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    imatdata, imattrain = tool("imatdata"), tool("imattrain")
    data = out / "data"
    timings: dict[str, float] = {}

    server = start_server(data, args.seed)
    try:
        timings["fetch"] = step(
            "fetch: download the train/val/test lists from the local server (with faults planted)",
            [imatdata, "fetch", str(data / "train.json"), str(data / "val.json"), str(data / "test.json"),
             "--allow-net", "127.0.0.0/8", "--allow-net", "::1/128", "--timeout", "5", "--retries", "2"],
            env)
    finally:
        stop_server(server)
    timings["clean"] = step("clean: verify, drop small, duplicate, placeholder and leaked images",
                            [imatdata, "clean", "--min-size", "64"], env)
    timings["stats"] = step("stats: the dataset at a glance",
                            [imatdata, "stats", "--tree", str(Path(__file__).resolve().parents[1]
                                                              / "imatdata" / "data" / "product_tree.json")], env)
    timings["train"] = step(
        "train: a small CNN on CPU",
        [imattrain, "run", "--model", "resnet18", "--image-size", str(args.image_size), "--epochs", str(args.epochs),
         "--batch-size", "32", "--lr", "0.05", "--schedule", "cosine", "--augment", "basic",
         "--device", "cpu", "--workers", "0", "--seed", str(args.seed), "--out", str(run_dir)], env)
    timings["predict"] = step(
        "predict: the competition submission for every test id",
        [imattrain, "predict", "--checkpoint", str(run_dir / "checkpoints" / "best.pt"), "--split", "test",
         "--out", str(submission)], env)
    report(out, root, run_dir, submission, timings)


if __name__ == "__main__":
    main()
