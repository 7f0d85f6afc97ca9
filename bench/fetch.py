"""Benchmark `imatdata fetch` against a local image server, in one run.

Throughput (default): N URLs of realistic photos (600-900 px JPEGs, 60-200 KB, from
`sample.photo_corpus`), resized to --max-side 512, measured three ways:

  * the machine's ceiling: cores x the single-core rate of the image work alone
    (decode + resize + encode + sha256, no network), and the same work run on all cores at
    once (what the cores really deliver together), both measured before and after the
    downloaders (a shared VM's cores drift) and averaged;
  * `imatdata fetch` (the real CLI, in a subprocess);
  * a naive thread-pool downloader, the usual Kaggle script: urllib + PIL + save to files;
  * img2dataset, when given (`--img2dataset PATH` to its executable, or found on PATH): one
    process per core, parquet output, the same resize (keep ratio, longer side <= 512, only
    if bigger), JPEG q90 and sha256. Install it in a venv of its own, e.g.
    `python -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset`.

For each: wall time, images/s, CPU ms per image (the process tree's user+system time),
and the server's own CPU time, since it runs on the same cores in a separate process (a lean
static HTTP/1.1 server, so that it takes as little of the downloaders' cores as it can).

Memory (--memory N): N tiny images (`sample.big_catalogue`), and the peak resident memory
of the whole `imatdata fetch` process tree (main + image workers), sampled from /proc,
with the RSS at each quarter of the run so a trend is visible; also the peak bytes on disk
under the output root against the final size (rows wait in the journal until sealed).

    .venv/bin/python bench/fetch.py [--n 10000] [--threads 32] [--no-naive] [--img2dataset PATH] [--loops 1,4]
    .venv/bin/python bench/fetch.py --memory 200000
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from imatdata.fetch.images import DEFAULT_RESIZE_FILTER, RESIZE_FILTERS, process_image
from imatsample import Catalogue, TinyRange, big_catalogue, photo_corpus, write_lists

ROOT = Path(__file__).resolve().parents[1]
IMATDATA = [sys.executable, "-m", "imatdata"]


# --- the server, in its own process -----------------------------------------------------------


def _catalogue(kind: str, n: int) -> Catalogue:
    if kind == "tiny":
        return big_catalogue(n, n_bodies=32, size=32)
    pool = photo_corpus(48, seed=0)
    cat = Catalogue(kind="photos", seed=0)
    cat.ranges.append(TinyRange(n=n, bodies=tuple(pool), labels=tuple(range(1, 49)), split="train",
                                prefix="/photo/"))
    return cat


class _LeanHTTP(asyncio.Protocol):
    """A minimal HTTP/1.1 static server: GET <prefix><i>.jpg -> body i of the catalogue.

    The benchmark measures downloaders, not the server, yet the server shares their cores;
    the sample server (aiohttp, fault injection, tracking) spent ~0.4 ms of CPU per image,
    about 4% of a 2-core machine at these rates. This one answers from pre-built headers.
    """

    def __init__(self, ranges: list[TinyRange]) -> None:
        self.ranges = ranges
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ")
            close = any(line.lower().replace(b" ", b"") == b"connection:close" for line in lines[1:]) \
                or parts[-1] == b"HTTP/1.0"
            body = self._body(parts[1].decode("latin-1") if len(parts) == 3 else "")
            status = b"200 OK" if body is not None else b"404 Not Found"
            body = body if body is not None else b"not found"
            kind = b"image/jpeg" if status == b"200 OK" else b"text/plain"
            self.transport.writelines([
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind + b"\r\nContent-Length: "
                + str(len(body)).encode() + (b"\r\nConnection: close" if close else b"") + b"\r\n\r\n",
                body if parts[0] != b"HEAD" else b""])
            if close:
                self.transport.close()
                return

    def _body(self, path: str) -> bytes | None:
        path = path.split("?", 1)[0]
        for r in self.ranges:
            i = r.index_of(path)
            if i is not None:
                return r.bodies[i % len(r.bodies)]
        return None


def _serve(kind: str, n: int, conn) -> None:  # runs in a spawned process
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ranges = _catalogue(kind, n).ranges
        servers = [await loop.create_server(lambda: _LeanHTTP(ranges), "127.0.0.1", 0, backlog=1024)]
        port = servers[0].sockets[0].getsockname()[1]
        try:  # where localhost resolves to ::1 first, clients must find us there too
            servers.append(await loop.create_server(lambda: _LeanHTTP(ranges), "::1", port, backlog=1024))
        except OSError:
            pass
        conn.send(port)
        await loop.run_in_executor(None, conn.recv)  # any message: stop
        for server in servers:
            server.close()

    asyncio.run(main())


class Server:
    """The sample server in a separate process, so its CPU time is its own."""

    def __init__(self, kind: str, n: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(kind, n, child), daemon=True)
        self.proc.start()
        self.port = self._conn.recv()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def close(self) -> None:
        self._conn.send("stop")
        self.proc.join(10)


def proc_cpu_s(pid: int) -> float:
    """user+system CPU seconds of one live process (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# --- the ceiling ------------------------------------------------------------------------------


def single_core_rate(bodies: list[bytes], seconds: float, max_side: int, resize_filter: str) -> tuple[float, float]:
    """(images/s by the wall clock, images/s by this process's CPU time) on one core.

    On a busy machine the wall-clock rate understates the core; the CPU-time rate does not.
    """
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        process_image(bodies[done % len(bodies)], max_side, resize_filter=resize_filter)
        done += 1
    return done / (time.perf_counter() - start), done / (time.process_time() - cpu)


def _timed_rate(job: tuple[float, int, str]) -> float:  # runs in a spawned process
    seconds, max_side, resize_filter = job
    return single_core_rate(photo_corpus(48, seed=0), seconds, max_side, resize_filter)[0]


def all_cores_rate(cores: int, seconds: float, max_side: int, resize_filter: str) -> float:
    """images/s of the image work alone with every core busy at once (one process each).

    `cores x single-core rate` assumes the cores scale perfectly; on a shared VM they do not
    (both cores of this 2-core machine busy gave ~91% of twice one core's rate). This is the
    most any downloader could reach here, with no network, server or writing at all."""
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        return sum(pool.map(_timed_rate, [(seconds, max_side, resize_filter)] * cores))


# --- the naive downloader ---------------------------------------------------------------------


def naive_download(list_path: Path, out_dir: Path, threads: int, max_side: int, resize_filter: str) -> int:
    """What most competition download scripts do: a thread pool, urllib, PIL, one file each."""
    from PIL import Image

    records = json.loads(list_path.read_text())["images"]
    out_dir.mkdir(parents=True, exist_ok=True)

    def one(rec: dict) -> bool:
        try:
            data = urllib.request.urlopen(rec["url"], timeout=30).read()
            img = Image.open(io.BytesIO(data)).convert("RGB")
            img.thumbnail((max_side, max_side), RESIZE_FILTERS[resize_filter])
            img.save(out_dir / f"{rec['id']}", format="JPEG", quality=90)
            return True
        except Exception:
            return False

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, records))


# --- process-tree memory --------------------------------------------------------------------------


def tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def disk_bytes(folder: Path) -> int:
    """Bytes of every file under `folder` (files that vanish mid-walk are skipped)."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


class RssSampler(threading.Thread):
    """Samples the process tree's resident memory and, given a folder, the bytes under it."""

    def __init__(self, pid: int, every: float = 0.5, folder: Path | None = None) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.folder = pid, every, folder
        self.samples: list[tuple[float, int]] = []
        self.disk: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self._halt.is_set():
            self.samples.append((time.monotonic() - start, tree_rss_bytes(self.pid)))
            if self.folder is not None:
                self.disk.append(disk_bytes(self.folder))
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# --- runs ---------------------------------------------------------------------------------------------


def run_imat(list_path: Path, root: Path, extra: list[str], sample_rss: bool = False) -> dict:
    cpu0 = children_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.Popen([*IMATDATA, "fetch", str(list_path), "--root", str(root), "--allow-net", "127.0.0.0/8",
                             "--quiet", *extra], cwd=ROOT)
    sampler = RssSampler(proc.pid, folder=root) if sample_rss else None
    if sampler:
        sampler.start()
    code = proc.wait()
    wall = time.perf_counter() - t0
    if sampler:
        sampler.stop()
    if code != 0:
        raise SystemExit(f"imatdata fetch failed with exit code {code}")
    summary = json.loads((root / "raw" / "fetch_summary.json").read_text())
    return {"wall": wall, "cpu": children_cpu_s() - cpu0, "ok": summary["this_run"].get("ok", 0),
            "records": summary["records"], "fetch_s": summary["elapsed_s"], "summary": summary,
            "rss": sampler.samples if sampler else [], "disk": sampler.disk if sampler else [],
            "final_disk": disk_bytes(root)}


def run_naive(list_path: Path, out: Path, threads: int, max_side: int, resize_filter: str) -> dict:
    cpu0 = children_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--naive-worker", str(list_path), str(out), str(threads),
                           str(max_side), resize_filter], capture_output=True, text=True, check=True)
    return {"wall": time.perf_counter() - t0, "cpu": children_cpu_s() - cpu0, "ok": int(proc.stdout.strip())}


def run_img2dataset(exe: str, list_path: Path, out: Path, processes: int, threads: int, max_side: int) -> dict:
    """img2dataset on the same URLs, with the same resize, quality and hash as imatdata fetch."""
    records = json.loads(list_path.read_text())["images"]
    table_path = list_path.with_name("img2dataset-input.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": [r["url"] for r in records], "id": [str(r["id"]) for r in records]}), table_path)
    cmd = [exe, "--url_list", str(table_path), "--input_format", "parquet", "--url_col", "url",
           "--save_additional_columns", "['id']", "--output_format", "parquet", "--output_folder", str(out),
           "--image_size", str(max_side), "--resize_mode", "keep_ratio", "--resize_only_if_bigger", "True",
           "--encode_quality", "90", "--encode_format", "jpg", "--compute_hash", "sha256",
           "--processes_count", str(processes), "--thread_count", str(threads), "--timeout", "30",
           "--number_sample_per_shard", "10000", "--enable_wandb", "False"]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    cpu0 = children_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"img2dataset failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    ok = sum(json.loads(p.read_text()).get("successes", 0) for p in out.glob("*_stats.json"))
    return {"wall": wall, "cpu": children_cpu_s() - cpu0, "ok": ok}


def measure_ceiling(bodies: list[bytes], cores: int, args: argparse.Namespace, when: str) -> tuple[float, float, float]:
    """(ceiling images/s, CPU ms per image on one core, images/s with all cores at once), printed."""
    wall_rate, cpu_rate = single_core_rate(bodies, args.ceiling_seconds, args.max_side, args.resize_filter)
    ceiling, work_ms = cores * cpu_rate, 1000 / cpu_rate
    print(f"[{when}] image work alone (decode + {args.resize_filter} resize + encode + sha256): {work_ms:.1f} ms "
          f"of CPU per image, {cpu_rate:.1f} images/s per core ({wall_rate:.1f} by the wall clock) -> ceiling "
          f"{ceiling:.1f} images/s on {cores} cores")
    together = all_cores_rate(cores, args.ceiling_seconds, args.max_side, args.resize_filter)
    print(f"[{when}] the same work on all {cores} cores at once, nothing else running: {together:.1f} images/s "
          f"= {100 * together / ceiling:.1f}% of the ceiling (the most any downloader can reach here)")
    return ceiling, work_ms, together


def throughput(args: argparse.Namespace) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="imat-bench-fetch-"))
    try:
        bodies = photo_corpus(48, seed=0)
        sizes = sorted(len(b) for b in bodies)
        print(f"corpus: {args.n} URLs over 48 distinct photos, {sizes[0] // 1000}-{sizes[-1] // 1000} KB, "
              f"median {sizes[len(sizes) // 2] // 1000} KB; {cores} cores")
        ceiling, work_ms, together = measure_ceiling(bodies, cores, args, "before the runs")
        server = Server("photos", args.n)
        try:
            lists = write_lists(_ListCatalogue(args.n), server, work / "lists")
            rows = []
            imat = None
            for loops in ([x.strip() for x in args.loops.split(",") if x.strip()] or [None]):
                s0 = server.cpu_s()
                root = work / f"m-{loops}"
                r = run_imat(lists["train"], root, ["--max-side", str(args.max_side), "--resize-filter",
                                                    args.resize_filter, *(["--loops", loops] if loops else [])])
                r["server_cpu"] = server.cpu_s() - s0
                shutil.rmtree(root, ignore_errors=True)
                rows.append(("imatdata fetch" + (f" --loops {loops}" if loops else ""), r))
                imat = imat or r
            if not args.no_naive:
                s0 = server.cpu_s()
                naive = run_naive(lists["train"], work / "naive", args.threads, args.max_side, args.resize_filter)
                naive["server_cpu"] = server.cpu_s() - s0
                rows.append((f"naive ThreadPool({args.threads}) urllib+PIL", naive))
            i2d = args.img2dataset or shutil.which("img2dataset")
            if i2d:
                s0 = server.cpu_s()
                other = run_img2dataset(i2d, lists["train"], work / "i2d", cores, args.threads, args.max_side)
                other["server_cpu"] = server.cpu_s() - s0
                rows.append((f"img2dataset ({cores} proc x {args.threads} threads)", other))
            else:
                print("img2dataset: not found (pass --img2dataset PATH); not compared")
        finally:
            server.close()
        # On a shared VM the cores' speed drifts over minutes (one core alone runs faster when
        # its sibling idles); measuring again after the runs shows by how much, and the
        # ratios use the mean of both measurements.
        after = measure_ceiling(bodies, cores, args, "after the runs")
        ceiling, work_ms, together = ((a + b) / 2 for a, b in zip((ceiling, work_ms, together), after))
        print(f"ratios below use the mean: ceiling {ceiling:.1f} images/s, all cores at once {together:.1f}")
        print()
        print(f"{'downloader':38} {'ok':>6} {'wall s':>7} {'img/s':>7} {'imat x':>6} {'% ceil':>7} {'% all-core':>10} "
              f"{'CPU ms/img':>10} {'CPU-bound % ceil':>16} {'server CPU ms/img':>17}")
        imat_rate = imat["ok"] / imat["wall"]
        for name, r in rows:
            rate = r["ok"] / r["wall"]
            cpu_ms = 1000 * r["cpu"] / max(1, r["ok"])
            # On an otherwise idle machine a CPU-bound downloader runs at cores / (CPU per image).
            print(f"{name:38} {r['ok']:6d} {r['wall']:7.1f} {rate:7.1f} {imat_rate / max(rate, 1e-9):5.2f}x "
                  f"{100 * rate / ceiling:6.1f}% {100 * rate / together:9.1f}% {cpu_ms:10.1f} {100 * work_ms / cpu_ms:15.1f}% "
                  f"{1000 * r['server_cpu'] / max(1, r['ok']):17.1f}")
        rate = imat["ok"] / imat["fetch_s"]
        print(f"imatdata fetch, its fetch phase only (validation to final shards, from fetch_summary.json; "
              f"the wall time above adds start-up and the stats files): {imat['fetch_s']:.1f}s, {rate:.1f} img/s, "
              f"{100 * rate / ceiling:.1f}% of the ceiling, {100 * rate / together:.1f}% of the all-core rate")
        print("'CPU-bound % ceil' = image-work CPU / the downloader's whole process-tree CPU per image (start-up,"
              " event loop, workers, journal, final shards and stats files included): the share of the ceiling it"
              " reaches when it has the cores to itself. The server's CPU, on the same cores, is not counted.")
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _ListCatalogue(Catalogue):
    """The photo catalogue's records without its bodies (the lists only need ids and URLs)."""

    def __init__(self, n: int) -> None:
        super().__init__(kind="photos", seed=0)
        self.ranges.append(TinyRange(n=n, bodies=(b"",), labels=tuple(range(1, 49)), split="train",
                                     prefix="/photo/"))


def memory(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="imat-bench-mem-"))
    try:
        server = Server("tiny", args.memory)
        try:
            lists = write_lists(big_catalogue(args.memory, n_bodies=1, size=8), server, work / "lists")
            s0 = server.cpu_s()
            r = run_imat(lists["train"], work / "m", [], sample_rss=True)
            server_cpu = server.cpu_s() - s0
        finally:
            server.close()
        samples = r["rss"]
        peak = max(rss for _, rss in samples)
        print(f"memory: {r['records']} records of tiny images, {r['ok']} ok, wall {r['wall']:.1f}s "
              f"({r['ok'] / r['wall']:.0f} img/s), fetch CPU {r['cpu']:.0f}s, server CPU {server_cpu:.0f}s")
        print(f"peak RSS of the fetch process tree: {peak / 2**20:.0f} MiB")
        end = samples[-1][0]
        marks = []
        for q in (0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
            t_q = q * end
            window = [rss for t, rss in samples if t <= t_q]
            marks.append(f"{int(q * 100)}%: {max(window) / 2**20:.0f} MiB")
        print("peak RSS so far at each fraction of the run time: " + ", ".join(marks))
        # Rows sit in the journal until sealed into shards; without sealing, the end of a run
        # held every row twice (journal + rebuilt shards).
        peak_disk = max(r["disk"] + [r["final_disk"]])
        print(f"disk under the root: peak {peak_disk / 2**20:.1f} MiB during the run, {r['final_disk'] / 2**20:.1f} MiB "
              f"at the end (peak / final = {peak_disk / max(1, r['final_disk']):.2f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--naive-worker":
        list_path, out, threads, max_side, resize_filter = sys.argv[2:7]
        print(naive_download(Path(list_path), Path(out), int(threads), int(max_side), resize_filter))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="photo URLs for the throughput run")
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--resize-filter", default=DEFAULT_RESIZE_FILTER, choices=list(RESIZE_FILTERS),
                        help="for the ceiling, imatdata fetch and the naive downloader alike")
    parser.add_argument("--threads", type=int, default=32, help="threads of the naive downloader")
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--img2dataset", help="img2dataset executable (default: the one on PATH, if any)")
    parser.add_argument("--ceiling-seconds", type=float, default=8.0)
    parser.add_argument("--loops", default="", help="comma-separated --loops values to run imatdata fetch "
                        "with, one row each (default: its own choice); e.g. 1,4 on a 16-core machine")
    parser.add_argument("--memory", type=int, default=0, help="run the memory part with this many tiny images")
    args = parser.parse_args()
    if args.memory:
        memory(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
