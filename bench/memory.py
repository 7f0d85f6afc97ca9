"""Peak memory of `imatdata fetch` when every body is large (issue #14).

A lean server process listens on --hosts loopback addresses (127.0.0.1, 127.0.0.2, ...: one
"host" each, so the per-host cap does not serialise the run) and answers every path with the
same --size bytes of random data (they end up `not_image`: what matters is the bytes held).
`imatdata fetch` runs with its default flags (plus --allow-private for the loopback
addresses, and whatever --extra adds) while a thread samples the resident memory of its
whole process tree (the fetch, its loops and its image workers) from /proc.

    .venv/bin/python bench/memory.py                      # 128 bodies of 19 MiB from 32 hosts
    .venv/bin/python bench/memory.py --chunked            # the same without Content-Length
    .venv/bin/python bench/memory.py --extra='--memory 512MiB'

The test suite runs a scaled-down case through `run_case` (tests/test_fetch.py). psutil is
used for the memory figures when installed, else /proc (Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
_SEND_CHUNK = 1024 * 1024


# --- the server, in its own process (its memory is not the fetch's) ------------------------------


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes, chunked: bool) -> None:
    view = memoryview(body)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            close = b"connection: close" in head.lower()
            framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n" + framing
                         + (b"\r\nConnection: close" if close else b"") + b"\r\n\r\n")
            # Piece by piece with drain: the server never holds a copy per connection.
            for at in range(0, len(body), _SEND_CHUNK):
                part = view[at:at + _SEND_CHUNK]
                writer.write(b"%x\r\n" % len(part) + part + b"\r\n" if chunked else part)
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


def _serve(hosts: list[str], size: int, chunked: bool) -> None:  # `memory.py --serve ...`
    async def main() -> None:
        body = os.urandom(size)

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await _handle(r, w, body, chunked)

        first = await asyncio.start_server(handle, hosts[0], 0, backlog=1024)
        port = first.sockets[0].getsockname()[1]
        servers = [first] + [await asyncio.start_server(handle, h, port, backlog=1024) for h in hosts[1:]]
        print(port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # EOF: stop
        for s in servers:
            s.close()

    asyncio.run(main())


class Server:
    """The body server on `hosts` (one port for all), in a process of its own (started from
    this file, so that it works when a test loads this module by path too)."""

    def __init__(self, hosts: list[str], size: int, chunked: bool = False) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", ",".join(hosts), str(size),
                                      "chunked" if chunked else "length"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip():
            self.close()
            raise RuntimeError("the body server did not start")
        self.port = int(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- process-tree memory ----------------------------------------------------------------------


def _rss(pid: int) -> int:
    try:
        import psutil  # type: ignore[import-not-found]

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        pass
    except Exception:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _descendants(root_pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = [], [root_pid]
    while frontier:
        pid = frontier.pop()
        kids = [c for c, p in parents.items() if p == pid]
        tree += kids
        frontier += kids
    return tree


class TreeSampler(threading.Thread):
    """Peak resident memory of a process, of its descendants, and of both together."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_tree = self.peak_main = self.peak_children = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            main = _rss(self.pid)
            children = sum(_rss(p) for p in _descendants(self.pid))
            self.peak_main = max(self.peak_main, main)
            self.peak_children = max(self.peak_children, children)
            self.peak_tree = max(self.peak_tree, main + children)
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# --- one case -----------------------------------------------------------------------------------


@dataclass
class Result:
    records: int
    statuses: dict[str, int]
    wall_s: float
    peak_tree: int
    peak_main: int
    peak_children: int

    def line(self) -> str:
        return (f"peak RSS: process tree {self.peak_tree / MIB:.0f} MiB (fetch process {self.peak_main / MIB:.0f} MiB, "
                f"its children {self.peak_children / MIB:.0f} MiB at their peak); {self.records} records in "
                f"{self.wall_s:.1f}s: {self.statuses}")


def run_case(work: Path, n: int = 128, hosts: int = 32, size: int = 19 * MIB, chunked: bool = False,
             extra: list[str] | None = None, timeout: float = 600) -> Result:
    """Serve `n` bodies of `size` bytes from `hosts` loopback addresses and fetch them with
    `imatdata fetch` (default flags + --allow-private + `extra`), sampling its tree's memory."""
    addresses = [f"127.0.0.{i + 1}" for i in range(hosts)]
    with Server(addresses, size, chunked) as server:
        images = [{"id": f"{i:032x}.jpg", "url": f"http://{addresses[i % hosts]}:{server.port}/{i}.jpg", "class": 1}
                  for i in range(n)]
        work.mkdir(parents=True, exist_ok=True)
        src = work / "train.json"
        src.write_text(json.dumps({"images": images}))
        root = work / "m"
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "imatdata", "fetch", str(src), "--root", str(root),
                                 "--allow-private", "--quiet", *(extra or [])], cwd=ROOT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        try:
            code = proc.wait(timeout)
        finally:
            sampler.stop()
            if proc.poll() is None:
                proc.kill()
        wall = time.monotonic() - t0
    if code != 0:
        raise RuntimeError(f"imatdata fetch exited with code {code}")
    summary = json.loads((root / "raw" / "fetch_summary.json").read_text())
    statuses = {k: v for k, v in summary["splits"]["train"].items() if k != "records"}
    return Result(summary["records"], statuses, wall, sampler.peak_tree, sampler.peak_main, sampler.peak_children)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        _serve(sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4] == "chunked")
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="records (one body each)")
    parser.add_argument("--hosts", type=int, default=32, help="loopback addresses 127.0.0.1... serving them")
    parser.add_argument("--size", type=float, default=19.0, help="body size in MiB")
    parser.add_argument("--chunked", action="store_true", help="no Content-Length (chunked transfer encoding)")
    parser.add_argument("--extra", default="", help="more imatdata fetch flags, e.g. '--memory 512MiB'")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imat-bench-memory-"))
    try:
        print(f"{args.n} bodies of {args.size:g} MiB ({'chunked' if args.chunked else 'Content-Length'}) from "
              f"{args.hosts} hosts; imatdata fetch {args.extra or '(default flags)'} --allow-private")
        result = run_case(work, args.n, args.hosts, int(args.size * MIB), args.chunked, shlex.split(args.extra))
        print(result.line())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
