"""Benchmark `imatdata fetch` against img2dataset at its best, on a real web server, in one run.

Throughput (default): N URLs over ~300 distinct real photographs (crops and rescales of the
photos that packages ship, 600-900 px JPEGs, see `real_photos`), resized to --max-side 512:

  * the server: nginx when installed (`apt-get install nginx-light`), one worker, static
    files, keep-alive; otherwise a lean Python server, and the report says so;
  * img2dataset (`--img2dataset PATH`, or found on PATH; install it in a venv of its own:
    `python -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset`): one process per core,
    its thread count swept (--i2d-threads, default 16,32,64,128) on a first slice of the
    URLs, then its best setting runs the full list. Parquet output, the same resize (keep
    ratio, longer side <= 512 — `keep_ratio_largest`: its `keep_ratio` makes the *shorter*
    side 512, a larger image than imat's —, only if bigger, INTER_AREA), JPEG q90, sha256,
    no EXIF extraction (imat stores none), shards of N / (4 x processes) so every process has
    work (its default of 10,000 per shard would leave one process idle);
  * `imatdata fetch` (the real CLI, in a subprocess), in the same rounds as img2dataset's best,
    alternating which goes first (--rounds, default 2): a shared VM's speed drifts, so the
    ratio is taken round by round and over the whole;
  * optionally (--naive) a thread-pool downloader, the usual Kaggle script;
  * the image work alone (decode + resize + encode + sha256 on all cores, no network): the
    most any downloader could reach here.

For each: wall time, images/s, CPU ms per image (the process tree's user+system time), and
the server's CPU per image (it shares the cores).

Real photos: the bench looks for the photographs that scikit-image and scikit-learn ship
(their wheels, or the packages if importable) and Debian's lomiri-wallpapers-20.04 (in
/usr/share/backgrounds). Without any it falls back to the synthetic `sample.photo_corpus`,
and says so. To get them:

    apt-get install lomiri-wallpapers-20.04          # two large photos
    pip download --no-deps scikit-image scikit-learn -d ~/.cache/imat-bench   # eleven more

Memory (--memory N): N tiny images (`sample.big_catalogue`), and the peak resident memory
of the whole `imatdata fetch` process tree (main + image workers), sampled from /proc,
with the RSS at each quarter of the run so a trend is visible; also the peak bytes on disk
under the output root against the final size (rows wait in the journal until sealed).

    .venv/bin/python bench/fetch.py [--n 10000] [--img2dataset PATH] [--i2d-threads 16,32,64,128] [--rounds 2]
    .venv/bin/python bench/fetch.py --memory 200000

Ray (--ray-nodes N [--ray-cpus C]): starts a local cluster as tests/test_ray.py does and puts
its address wherever --imat-args says {ray}; e.g. 2 nodes of 1 core against --loops 2 on the
same 2 cores, with the per-run and per-record cost of going through Ray:

    .venv/bin/python bench/fetch.py --n 10000 --ray-nodes 2 --imat-args "--loops 2;--ray {ray}"
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from imatdata.fetch.images import DEFAULT_RESIZE_FILTER, RESIZE_FILTERS, process_image
from imatsample import big_catalogue, photo_corpus

ROOT = Path(__file__).resolve().parents[1]
IMATDATA = [sys.executable, "-m", "imatdata"]


# --- real photographs ------------------------------------------------------------------------------

# Colour photographs shipped by packages (file stems): scikit-image's data, scikit-learn's
# sample images, two of Debian's lomiri-wallpapers-20.04. Their other images (renders,
# diagrams, grey scans) are left out.
PHOTO_STEMS = ("astronaut", "chelsea", "coffee", "motorcycle_left", "motorcycle_right", "rocket", "hubble_deep_field",
               "retina", "ihc", "china", "flower", "Kleiber_by_Lukas_Baubkus", "Infinite-Sea_by_Aury88")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def photo_places() -> list[Path]:
    """Where packaged photos may be: the packages if importable, wheels in the bench cache
    and the working directory, Debian's wallpapers."""
    places = [Path("/usr/share/backgrounds"), Path.home() / ".cache" / "imat-bench"]
    for module, sub in (("skimage", "data"), ("sklearn", "datasets/images")):
        try:
            spec = __import__("importlib.util").util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin:
            places.append(Path(spec.origin).parent / sub)
    return places


def load_photos(paths: list[Path], only_known: bool) -> dict[str, bytes]:
    """Photo files (by stem) from folders, files, and wheels or zips (their image members)."""
    found: dict[str, bytes] = {}

    def take(name: str, read) -> None:
        stem = Path(name).stem
        if Path(name).suffix.lower() in _IMAGE_SUFFIXES and stem not in found and (not only_known or stem in PHOTO_STEMS):
            found[stem] = read()

    for path in paths:
        if path.is_dir():
            for f in sorted(path.iterdir()):
                if f.suffix in (".whl", ".zip"):
                    load_zip(f, take)
                elif f.is_file():
                    take(f.name, f.read_bytes)
        elif path.suffix in (".whl", ".zip") and path.is_file():
            load_zip(path, take)
        elif path.is_file():
            take(path.name, path.read_bytes)
    return found


def load_zip(path: Path, take) -> None:
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            take(name, lambda name=name: z.read(name))


def real_photos(originals: dict[str, bytes], n: int, seed: int = 0) -> list[bytes]:
    """`n` distinct JPEGs of 600-900 px made from `originals`: a random crop of each photo in
    turn (55-100% of its width, aspect 2:3 to 3:2, mirrored half the time), scaled so its
    longer side is 600-900 px, saved at quality 80-92, as photos on the web are."""
    from PIL import Image

    rng = random.Random(seed)
    sources = []
    for stem in sorted(originals):
        img = Image.open(io.BytesIO(originals[stem])).convert("RGB")
        img.thumbnail((2400, 2400), Image.Resampling.LANCZOS)  # a 6000 px original: crops at a web scale
        sources.append(img)
    bodies = []
    for i in range(n):
        img = sources[i % len(sources)]
        w, h = img.size
        cw = max(1, int(w * rng.uniform(0.55, 1.0)))
        ch = max(1, min(h, int(cw / rng.uniform(0.66, 1.5))))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = img.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = rng.randint(600, 900) / max(crop.size)
        crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                           Image.Resampling.LANCZOS)
        out = io.BytesIO()
        crop.save(out, "JPEG", quality=rng.randint(80, 92))
        bodies.append(out.getvalue())
    return bodies


def bench_corpus(args: argparse.Namespace) -> tuple[list[bytes], str]:
    """(the distinct bodies to serve, a line saying what they are)."""
    paths = [Path(p).expanduser() for p in args.photos] if args.photos else photo_places()
    originals = load_photos(paths, only_known=not args.photos)
    if len(originals) >= 4:
        bodies = real_photos(originals, args.distinct)
        what = f"{len(bodies)} real photos cut from {len(originals)} originals ({', '.join(sorted(originals))})"
    else:
        bodies = photo_corpus(args.distinct, seed=0)
        what = (f"{len(bodies)} SYNTHETIC photo-like images (sample.photo_corpus): no packaged photos found "
                f"in {', '.join(map(str, paths))} (see the docstring to get them)")
    return bodies, what


# --- the servers -------------------------------------------------------------------------------


NGINX_CONF = """
worker_processes 1;
daemon off;
master_process on;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000;
    keepalive_timeout 60s;
    types {{ image/jpeg jpg; }}
    default_type application/octet-stream;
    client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp; fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;
    server {{
        listen 127.0.0.1:{port} backlog=4096 reuseport;
        root {root}/www;
    }}
}}
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nginx_path() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()),
                                         None)


class Nginx:
    """nginx serving `<root>/www/photo/<j>.jpg`: one worker process (it needs a few percent
    of one core at these rates), no access log, sendfile, long keep-alive."""

    name = "nginx"

    def __init__(self, exe: str, root: Path) -> None:
        self.port = free_port()
        (root / "tmp").mkdir(exist_ok=True)
        conf = root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(root=root, port=self.port))
        self.proc = subprocess.Popen([exe, "-c", str(conf), "-p", str(root)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(self.url("/photo/0.jpg"), timeout=1).read()
                break
            except urllib.error.HTTPError as exc:
                self.close()
                raise SystemExit(f"nginx answers {exc.code} for /photo/0.jpg (see {root / 'error.log'})") from None
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise SystemExit(f"nginx did not start: {self.proc.stderr.read().decode()[-500:]}") from None
                time.sleep(0.05)
        self.name = f"nginx {subprocess.run([exe, '-v'], capture_output=True, text=True).stderr.strip().split('/')[-1]}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def cpu_s(self) -> float:
        """CPU of the master and its workers (the workers are its children)."""
        pids = [self.proc.pid] + [int(c) for c in _children_of(self.proc.pid)]
        return sum(proc_cpu_s(pid) for pid in pids)

    def close(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _children_of(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


class _LeanHTTP(asyncio.Protocol):
    """A minimal HTTP/1.1 static server, for machines without nginx: GET /photo/<j>.jpg."""

    def __init__(self, bodies: dict[str, bytes]) -> None:
        self.bodies = bodies
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
            path = parts[1].decode("latin-1").split("?", 1)[0] if len(parts) == 3 else ""
            body = self.bodies.get(path)
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


def _serve(www: str, conn) -> None:  # runs in a spawned process
    bodies = {"/" + str(p.relative_to(www)): p.read_bytes() for p in Path(www).rglob("*.jpg")}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _LeanHTTP(bodies), "127.0.0.1", 0, backlog=1024)
        conn.send(server.sockets[0].getsockname()[1])
        await loop.run_in_executor(None, conn.recv)  # any message: stop
        server.close()

    asyncio.run(main())


class LeanServer:
    """The fallback: `_LeanHTTP` in a separate process, so its CPU time is its own."""

    name = "python asyncio server (nginx not installed: apt-get install nginx-light)"

    def __init__(self, root: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(str(root / "www"), child), daemon=True)
        self.proc.start()
        self.port = self._conn.recv()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def close(self) -> None:
        self._conn.send("stop")
        self.proc.join(10)


def start_server(root: Path, bodies: list[bytes], use_nginx: bool) -> Nginx | LeanServer:
    """Write the bodies under `root/www/photo/` and serve them."""
    folder = root / "www" / "photo"
    folder.mkdir(parents=True)
    for j, body in enumerate(bodies):
        (folder / f"{j}.jpg").write_bytes(body)
    for p in [folder, *folder.parents][:4]:  # nginx's worker may run as another user (nobody)
        p.chmod(0o755)
    exe = nginx_path() if use_nginx else None
    return Nginx(exe, root) if exe else LeanServer(root)


def write_list(path: Path, server, n: int, distinct: int) -> Path:
    """An iMaterialist-style list: URL i serves photo i mod `distinct` (the query keeps URLs distinct)."""
    images = [{"id": f"{i:032x}.jpg", "url": server.url(f"/photo/{i % distinct}.jpg?w=750&i={i}"), "class": 1 + i % 48}
              for i in range(n)]
    path.write_text(json.dumps({"images": images}))
    return path


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
    """(images/s by the wall clock, images/s by this process's CPU time) on one core."""
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        process_image(bodies[done % len(bodies)], max_side, resize_filter=resize_filter)
        done += 1
    return done / (time.perf_counter() - start), done / (time.process_time() - cpu)


def _timed_rate(job: tuple[str, float, int, str]) -> tuple[float, float]:  # runs in a spawned process
    folder, seconds, max_side, resize_filter = job
    bodies = [p.read_bytes() for p in sorted(Path(folder).glob("*.jpg"))]
    return single_core_rate(bodies, seconds, max_side, resize_filter)


def image_work_rate(folder: Path, cores: int, seconds: float, max_side: int, resize_filter: str) -> tuple[float, float]:
    """(images/s with every core doing the image work at once, CPU ms per image): the most any
    downloader could reach here, with no network, server or writing at all."""
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        rates = pool.map(_timed_rate, [(str(folder), seconds, max_side, resize_filter)] * cores)
    return sum(wall for wall, _ in rates), 1000 * cores / sum(cpu for _, cpu in rates)


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


def img2dataset_input(list_path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = json.loads(list_path.read_text())["images"]
    table_path = list_path.with_suffix(".parquet")
    pq.write_table(pa.table({"url": [r["url"] for r in records], "id": [str(r["id"]) for r in records]}), table_path)
    return table_path


def run_img2dataset(exe: str, table_path: Path, n: int, out: Path, processes: int, threads: int, max_side: int) -> dict:
    """img2dataset on the same URLs, with the same resize, quality and hash as imatdata fetch.
    Shards of n / (4 x processes) URLs: every process gets several (img2dataset's default,
    10,000, would leave all but one idle on a list this size)."""
    per_shard = max(1, -(-n // (4 * processes)))
    cmd = [exe, "--url_list", str(table_path), "--input_format", "parquet", "--url_col", "url",
           "--save_additional_columns", "['id']", "--output_format", "parquet", "--output_folder", str(out),
           "--image_size", str(max_side), "--resize_mode", "keep_ratio_largest", "--resize_only_if_bigger", "True",
           "--downscale_interpolation", "area", "--encode_quality", "90", "--encode_format", "jpg",
           "--compute_hash", "sha256", "--extract_exif", "False", "--processes_count", str(processes),
           "--thread_count", str(threads), "--timeout", "30", "--number_sample_per_shard", str(per_shard),
           "--enable_wandb", "False"]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")
    cpu0 = children_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"img2dataset failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    ok = sum(json.loads(p.read_text()).get("successes", 0) for p in out.glob("*_stats.json"))
    shutil.rmtree(out, ignore_errors=True)
    return {"wall": wall, "cpu": children_cpu_s() - cpu0, "ok": ok}


def timed(server, run, *args, **kw) -> dict:
    """`run(*args)` with the server's CPU time over it added."""
    s0 = server.cpu_s()
    r = run(*args, **kw)
    r["server_cpu"] = server.cpu_s() - s0
    return r


def line(name: str, r: dict, ref: float | None = None) -> str:
    rate = r["ok"] / r["wall"]
    ratio = f"{rate / ref:5.2f}x" if ref else "     "
    return (f"{name:44} {r['ok']:6d} {r['wall']:7.1f} {rate:7.1f} {ratio} {1000 * r['cpu'] / max(1, r['ok']):10.2f} "
            f"{1000 * r['server_cpu'] / max(1, r['ok']):10.2f}")


HEADER = f"{'downloader':44} {'ok':>6} {'wall s':>7} {'img/s':>7} {'/i2d':>6} {'CPU ms/img':>10} {'server ms':>10}"


def throughput(args: argparse.Namespace) -> None:
    if not args.ray_nodes:
        return _throughput(args, None)
    from imatsample.raycluster import local_cluster

    with local_cluster(args.ray_nodes, args.ray_cpus) as cluster:
        print(f"Ray: a local cluster of {args.ray_nodes} nodes x {args.ray_cpus} CPUs at {cluster.address}")
        _throughput(args, cluster.address)


def ray_fixed_cost(server, work: Path, n_bodies: int, flags: dict[str, list[str]], reps: int = 3) -> dict[str, float]:
    """Median wall time of each variant on a list of 16 URLs: what a run costs besides its
    records (for --ray: joining the cluster, starting the tasks' workers and pools)."""
    tiny = write_list(work / "tiny.json", server, 16, n_bodies)
    walls: dict[str, list[float]] = {name: [] for name in flags}
    for _ in range(reps):
        for name, extra in flags.items():
            root = work / "tiny-m"
            walls[name].append(run_imat(tiny, root, extra)["wall"])
            shutil.rmtree(root, ignore_errors=True)
    return {name: sorted(w)[len(w) // 2] for name, w in walls.items()}


def _throughput(args: argparse.Namespace, ray_address: str | None) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="imat-bench-fetch-"))
    try:
        t0 = time.perf_counter()
        bodies, what = bench_corpus(args)
        sizes = sorted(len(b) for b in bodies)
        print(f"corpus: {args.n} URLs over {what}; {sizes[0] // 1000}-{sizes[-1] // 1000} KB, median "
              f"{sizes[len(sizes) // 2] // 1000} KB (built in {time.perf_counter() - t0:.0f}s); {cores} cores")
        server = start_server(work / "srv", bodies, use_nginx=not args.no_nginx)
        print(f"server: {server.name}")
        www = work / "srv" / "www" / "photo"
        together, work_ms = image_work_rate(www, cores, args.ceiling_seconds, args.max_side, args.resize_filter)
        print(f"image work alone (decode + {args.resize_filter} resize + encode + sha256), all {cores} cores at once: "
              f"{together:.1f} images/s, {work_ms:.2f} ms of CPU per image")
        try:
            full = write_list(work / "train.json", server, args.n, len(bodies))
            i2d = args.img2dataset or shutil.which("img2dataset")
            best_threads = None
            if i2d:
                sweep_n = min(args.n, args.sweep_n)
                sweep_list = write_list(work / "sweep.json", server, sweep_n, len(bodies))
                sweep_table = img2dataset_input(sweep_list)
                print(f"\nimg2dataset thread sweep ({cores} processes, {sweep_n} URLs each):")
                print(HEADER)
                best_rate = 0.0
                for threads in [int(t) for t in args.i2d_threads.split(",") if t.strip()]:
                    r = timed(server, run_img2dataset, i2d, sweep_table, sweep_n, work / "i2d", cores, threads,
                              args.max_side)
                    print(line(f"img2dataset {cores} proc x {threads} threads", r), flush=True)
                    if r["ok"] / r["wall"] > best_rate:
                        best_rate, best_threads = r["ok"] / r["wall"], threads
                print(f"best: {best_threads} threads per process")
                table = img2dataset_input(full)
            else:
                print("img2dataset: not found (pass --img2dataset PATH); not compared")
            base = ["--max-side", str(args.max_side), "--resize-filter", args.resize_filter]
            variants = [v.replace("{ray}", ray_address or "{ray}").split() for v in args.imat_args.split(";")] \
                if args.imat_args else [[]]
            print(f"\n{args.rounds} rounds of {args.n} URLs, the order alternating "
                  f"(imatdata fetch {' '.join(base)}{' + extra flags per row' if args.imat_args else ''}):")
            print(HEADER)
            imat_runs, i2d_runs = [], []
            extra_runs: dict[str, list[dict]] = {}
            for k in range(args.rounds):
                order = ["imat", "i2d"] if k % 2 == 0 else ["i2d", "imat"]
                for who in order:
                    if who == "imat":
                        for v, flags in enumerate(variants):
                            root = work / "m"
                            r = timed(server, run_imat, full, root, base + flags)
                            shutil.rmtree(root, ignore_errors=True)
                            if v == 0:
                                imat_runs.append(r)
                            else:
                                extra_runs.setdefault(" ".join(flags), []).append(r)
                            ref = i2d_runs[k]["ok"] / i2d_runs[k]["wall"] if len(i2d_runs) > k else None
                            print(line(f"round {k + 1}: imatdata fetch {' '.join(flags)}".rstrip(), r, ref), flush=True)
                    elif best_threads is not None:
                        r = timed(server, run_img2dataset, i2d, table, args.n, work / "i2d", cores, best_threads,
                                  args.max_side)
                        i2d_runs.append(r)
                        print(line(f"round {k + 1}: img2dataset {cores} x {best_threads}", r), flush=True)
                if len(i2d_runs) > k and len(imat_runs) > k:
                    ratio = (imat_runs[k]["ok"] / imat_runs[k]["wall"]) / (i2d_runs[k]["ok"] / i2d_runs[k]["wall"])
                    print(f"round {k + 1}: imat / img2dataset = {ratio:.2f}x")
            if args.naive:
                r = timed(server, run_naive, full, work / "naive", args.threads, args.max_side, args.resize_filter)
                print(line(f"naive ThreadPool({args.threads}) urllib+PIL", r))
            if ray_address:
                fixed = ray_fixed_cost(server, work, len(bodies), {" ".join(f) or "(none)": base + f for f in variants})
                print("\nwall on 16 URLs (median of 3), the per-run cost: " +
                      ", ".join(f"{name}: {wall:.2f} s" for name, wall in fixed.items()))
        finally:
            server.close()
        imat_rate = sum(r["ok"] for r in imat_runs) / sum(r["wall"] for r in imat_runs)
        print(f"\nimatdata fetch: {imat_rate:.1f} images/s over {len(imat_runs)} runs = {100 * imat_rate / together:.0f}% "
              f"of the image work alone on all cores ({together:.1f})")
        for flags, runs in extra_runs.items():
            rate = sum(r["ok"] for r in runs) / sum(r["wall"] for r in runs)
            print(f"imatdata fetch {flags}: {rate:.1f} images/s over {len(runs)} runs = "
                  f"{100 * rate / imat_rate:.0f}% of the first variant")
            if ray_address and "--ray" in flags:
                first = " ".join(variants[0]) or "(none)"
                per_run = fixed[flags] - fixed[first]
                walls = (sum(r["wall"] for r in runs) / len(runs), sum(r["wall"] for r in imat_runs) / len(imat_runs))
                per_record = (walls[0] - walls[1] - per_run) / args.n
                print(f"  Ray's overhead: {per_run:.2f} s per run, {1e6 * per_record:.0f} us per record "
                      f"(wall {walls[0]:.1f} s vs {walls[1]:.1f} s, less the per-run cost, over {args.n} records)")
        if i2d_runs:
            i2d_rate = sum(r["ok"] for r in i2d_runs) / sum(r["wall"] for r in i2d_runs)
            print(f"img2dataset at its best ({cores} x {best_threads} threads): {i2d_rate:.1f} images/s")
            cpu = {name: sum(r["cpu"] + r["server_cpu"] for r in runs) / sum(r["ok"] for r in runs)
                   for name, runs in (("imat", imat_runs), ("i2d", i2d_runs))}
            print(f"CPU per image, server included: imat {1000 * cpu['imat']:.2f} ms, img2dataset "
                  f"{1000 * cpu['i2d']:.2f} ms -> {cpu['i2d'] / cpu['imat']:.2f}x as many images per CPU-second "
                  "(the ratio on otherwise idle cores, if both keep every core busy)")
            print(f"RATIO imat / img2dataset-best = {imat_rate / i2d_rate:.2f}x (server: {server.name})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def memory(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="imat-bench-mem-"))
    try:
        tiny = big_catalogue(1, n_bodies=1, size=8).ranges[0].bodies[0]
        server = start_server(work / "srv", [tiny], use_nginx=not args.no_nginx)
        try:
            listed = write_list(work / "train.json", server, args.memory, 1)
            s0 = server.cpu_s()
            r = run_imat(listed, work / "m", [], sample_rss=True)
            server_cpu = server.cpu_s() - s0
        finally:
            server.close()
        samples = r["rss"]
        peak = max(rss for _, rss in samples)
        print(f"memory: {r['records']} records of tiny images ({server.name}), {r['ok']} ok, wall {r['wall']:.1f}s "
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
    parser.add_argument("--distinct", type=int, default=300, help="distinct photos the URLs cycle through")
    parser.add_argument("--photos", nargs="*", help="photo files, folders or wheels/zips to cut the corpus from "
                        "(default: the packaged photos found, see above)")
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--resize-filter", default=DEFAULT_RESIZE_FILTER, choices=list(RESIZE_FILTERS),
                        help="for the ceiling, imatdata fetch and the naive downloader alike")
    parser.add_argument("--img2dataset", help="img2dataset executable (default: the one on PATH, if any)")
    parser.add_argument("--i2d-threads", default="16,32,64,128", help="img2dataset thread counts per process to sweep")
    parser.add_argument("--sweep-n", type=int, default=4000, help="URLs for each run of the sweep")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of imat vs img2dataset's best, order alternating")
    parser.add_argument("--imat-args", default="", help="extra imatdata fetch flags, ';' between variants, "
                        "one row each per round; the first is the one compared, e.g. ';--workers 4'")
    parser.add_argument("--no-nginx", action="store_true", help="serve with the Python server even if nginx is here")
    parser.add_argument("--naive", action="store_true", help="also run the naive thread-pool downloader")
    parser.add_argument("--threads", type=int, default=32, help="threads of the naive downloader")
    parser.add_argument("--ceiling-seconds", type=float, default=5.0)
    parser.add_argument("--memory", type=int, default=0, help="run the memory part with this many tiny images")
    parser.add_argument("--ray-nodes", type=int, default=0, help="start a local Ray cluster of this many nodes "
                        "for the run; '{ray}' in --imat-args is its address")
    parser.add_argument("--ray-cpus", type=int, default=1, help="CPUs each Ray node offers")
    args = parser.parse_args()
    if args.memory:
        memory(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
