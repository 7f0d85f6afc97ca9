"""Peak memory of the fetch image workers on images near the pixel limit (issue #14).

Generates, in a throw-away child process (so its own big arrays never count), images that
are cheap to download and dear to decode: the 9000x9000 ones of the issue (16-bit grey PNG,
RGBA PNG, progressive and CMYK JPEG, palette PNG, WebP) and others just under the per-image
decode limit (`images.DEFAULT_MAX_DECODE_BYTES`). Then sends them all at once, `--copies`
times each, through the real `ImagePool` with the default worker count (all cores, as
fetch) while a thread samples the resident memory of this process and its workers from
/proc every 10 ms. Prints each image's status and the peaks: per worker and whole tree.

    .venv/bin/python bench/decode_memory.py                 # default workers, 2 copies
    .venv/bin/python bench/decode_memory.py --workers 4 --copies 4
    .venv/bin/python bench/decode_memory.py --speed         # + ms per normal photo

It uses only `ImagePool(workers, max_side, max_pixels)` and `process_image(body)`, so it
runs unchanged against an older checkout (`PYTHONPATH=/path/to/old`) for a before/after.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

MIB = 1024 * 1024
CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "imat-decode-bench-v1"

# name -> (description, generator source run in a child process). Flat colours and
# gradients keep the bodies small (100-500 KB) whatever the pixel count, as in the issue.
IMAGES: dict[str, str] = {
    "g16-9000.png": "Image.fromarray(np.tile((np.arange(9000) * 7).astype(np.uint16), (9000, 1))).save(out, 'PNG')",
    "rgba-9000.png": "Image.new('RGBA', (9000, 9000), (10, 200, 30, 128)).save(out, 'PNG')",
    "pal-9000.png": "Image.new('P', (9000, 9000), 3).save(out, 'PNG', transparency=3)",
    "cmyk-9000.jpg": "Image.new('CMYK', (9000, 9000), (10, 200, 30, 0)).save(out, 'JPEG', quality=50)",
    "prog-9000.jpg": "Image.new('RGB', (9000, 9000), (10, 200, 30)).save(out, 'JPEG', quality=50, progressive=True)",
    "rgb-9000.webp": "Image.new('RGB', (9000, 9000), (10, 200, 30)).save(out, 'WEBP', quality=10)",
    "rgb-9000.gif": "Image.new('RGB', (9000, 9000), (10, 200, 30)).save(out, 'GIF')",
    # Just under the decode limit: accepted, decoded one at a time.
    "g16-7900.png": "Image.fromarray(np.tile((np.arange(7900) * 8).astype(np.uint16), (7900, 1))).save(out, 'PNG')",
    "rgba-5600.png": "Image.new('RGBA', (5600, 5600), (10, 200, 30, 128)).save(out, 'PNG')",
    "pal-9400.png": "Image.new('P', (9400, 9400), 3).save(out, 'PNG', transparency=3)",
    "prog-6000x4000.jpg": "Image.new('RGB', (6000, 4000), (10, 200, 30)).save(out, 'JPEG', quality=50, progressive=True)",
    "camera-6000x4000.jpg": "Image.effect_noise((6000, 4000), 40).convert('RGB').save(out, 'JPEG', quality=85)",
}


def generate() -> dict[str, bytes]:
    """The test images, made once per machine (in a child process) and cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    for name, source in IMAGES.items():
        path = CACHE / name
        if not path.exists():
            code = ("import io, sys, numpy as np\nfrom PIL import Image\nout = io.BytesIO()\n" + source
                    + f"\nopen({str(path) + '.tmp'!r}, 'wb').write(out.getvalue())")
            subprocess.run([sys.executable, "-c", code], check=True)
            os.replace(str(path) + ".tmp", path)
    return {name: (CACHE / name).read_bytes() for name in IMAGES}


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


class Sampler(threading.Thread):
    """Peak RSS of this process, of each child and of all together, every 10 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.parent = 0
        self.per_child: Counter[int] = Counter()
        self.total = 0
        self._done = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._done.wait(0.01):
            own = rss(me)
            kids = {c: rss(c) for c in children(me)}
            self.parent = max(self.parent, own)
            for c, v in kids.items():
                self.per_child[c] = max(self.per_child[c], v)
            self.total = max(self.total, own + sum(kids.values()))

    def stop(self) -> None:
        self._done.set()
        self.join()


async def through_pool(bodies: list[bytes], workers: int) -> list:
    from imatdata.fetch.images import DEFAULT_MAX_PIXELS
    from imatdata.fetch.imagepool import ImagePool

    pool = ImagePool(workers, 512, DEFAULT_MAX_PIXELS)
    await pool.start()
    try:
        results = await asyncio.gather(*(pool.process(b) for b in bodies))
        await asyncio.sleep(0.1)
        # What the workers keep once idle: memory a decoder did not give back.
        print("RSS per worker when idle afterwards (MiB): " + ", ".join(f"{rss(p) / MIB:.0f}" for p in pool.pids()))
        return results
    finally:
        await pool.close()


def speed(repeat: int) -> None:
    """ms per image in this process for the photos fetch mostly sees."""
    from PIL import Image

    from imatdata.fetch.images import process_image

    def jpeg(size: tuple[int, int]) -> bytes:
        out = io.BytesIO()
        Image.effect_noise(size, 30).convert("RGB").resize(size).save(out, "JPEG", quality=88)
        return out.getvalue()

    cases = {"900x640 jpeg": jpeg((900, 640)), "600x800 jpeg": jpeg((600, 800)),
             "6000x4000 jpeg": (CACHE / "camera-6000x4000.jpg").read_bytes()}
    for name, body in cases.items():
        assert process_image(body).status == "ok"
        t = time.perf_counter()
        for _ in range(repeat):
            process_image(body)
        print(f"  {name:16s} {1000 * (time.perf_counter() - t) / repeat:7.2f} ms/image")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=None, help="image workers (default: fetch's, all cores)")
    ap.add_argument("--copies", type=int, default=2, help="times each image is sent (all at once)")
    ap.add_argument("--speed", action="store_true", help="also time normal photos in this process")
    ap.add_argument("--repeat", type=int, default=50, help="repeats per photo for --speed")
    args = ap.parse_args()

    bodies = generate()
    workers = args.workers or max(1, len(os.sched_getaffinity(0)))
    names = [n for n in bodies for _ in range(args.copies)]
    sampler = Sampler()
    sampler.start()
    time.sleep(0.05)
    t = time.perf_counter()
    results = asyncio.run(through_pool([bodies[n] for n in names], workers))
    elapsed = time.perf_counter() - t
    sampler.stop()

    print(f"{len(names)} bodies ({args.copies} of each image), {workers} workers, {elapsed:.1f} s")
    seen = set()
    for name, res in zip(names, results):
        if name not in seen:
            seen.add(name)
            print(f"  {name:22s} {len(bodies[name]) / 1024:7.0f} KiB  {res.status:10s} {res.error or ''}")
    worker_peaks = sorted(sampler.per_child.values(), reverse=True)
    print("peak RSS per worker (MiB): " + ", ".join(f"{v / MIB:.0f}" for v in worker_peaks))
    print(f"peak RSS of this process: {sampler.parent / MIB:.0f} MiB")
    print(f"peak RSS of the process tree: {sampler.total / MIB:.0f} MiB")
    if args.speed:
        print("speed of normal photos (process_image in this process):")
        speed(args.repeat)


if __name__ == "__main__":
    main()
