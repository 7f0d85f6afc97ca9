"""The fetch itself: records to the network and the image workers, rows to the journal.

`run_fetch` validates the lists, reads what earlier runs finished (`store`), runs one event
loop here, or several, each a spawned process with its own share of the records, request
caps, image workers and journal files (`--loops`), while a thread seals full shards; then
settles raw/ and writes the summary and the class statistics.

What every loop needs is one picklable `Run`; a loop's own state (its journal, image pool,
tasks) lives in `_Loop`, inside its process.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from imatdata.errors import UserError
from imatdata.fetch.config import MIN_MEMORY, FetchOptions
from imatdata.fetch.download import ByteBudget, Download, Fetcher
from imatdata.fetch.imagepool import ImagePool
from imatdata.fetch.images import ImageResult
from imatdata.fetch.report import Counters, FetchSummary, Progress, write_summary
from imatdata.fetch.sources import Record, ScanResult, invalid_key, read_records, record_key, resolve_sources, scan_sources
from imatdata.fetch.store import LOCK_NAME, Journal, Sealer, contains, done_so_far, new_run_id, settle
from imatdata.manifest import resolve_root
from imatdata.procs import available_cpus, safe_path_children
from imatdata.storage import RunLock

OnTick = Callable[[Counters], None]


def default_loops(cores: int) -> int:
    """One event loop up to 4 cores, then one per 4 cores. A loop spends ~1.3 ms of its own
    CPU per image (HTTP, feeding the workers, the journal), so one keeps up with about seven
    cores of image work on local photos and fewer on HTTPS; several keep every core busy."""
    return 1 if cores <= 4 else -(-cores // 4)


@dataclass
class Run:
    """What a fetch's loops share. A loop process gets its own copy (pickled by the spawn
    start method), so it holds plain data only."""

    opts: FetchOptions
    root: Path
    scan: ScanResult
    done: dict[str, np.ndarray]  # split -> sorted keys of the records that already have a row
    total: int = 0  # records to fetch in this run (the bar's total)
    run_id: str = field(default_factory=new_run_id)  # every journal file of this run starts with it
    part: tuple[int, int] = (0, 1)  # (k, n): this loop takes the records whose key is k mod n
    counters: Counters = field(default_factory=Counters)
    # The file whose lock is the heavy-decode slot (imagepool): one for all the loops, so a
    # run decodes at most one large image at a time however many loops and workers it has.
    heavy_lock: str | None = None

    @property
    def workers(self) -> int:
        return self.opts.workers or available_cpus()

    @property
    def pending(self) -> int:
        return self.opts.pending or max(2 * self.opts.net.concurrency, 64)

    def journal(self) -> Journal:
        k, n = self.part
        opts = self.opts
        return Journal(self.root, opts.journal_rows, opts.journal_seconds, run=self.run_id,
                       tag=f"{k:03d}-" if n > 1 else "", flush_bytes=opts.journal_bytes,
                       window_size=opts.net.concurrency + opts.resume_slack,
                       window_rows=max(1, opts.resume_slack // 2))


# --- rows ---------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(timezone.utc)


def base_row(split: str, rec: Record, key: int) -> dict[str, Any]:
    return {"id": rec.id, "split": split, "label": rec.label, "url": rec.url, "_key": key,
            "attempts": 0, "fetched_at": _now()}


def invalid_row(split: str, rec: Record, key: int, problem: str) -> dict[str, Any]:
    row = base_row(split, rec, key)
    row.update(status="invalid", error=problem)
    return row


def failure_row(split: str, rec: Record, key: int, d: Download) -> dict[str, Any]:
    row = base_row(split, rec, key)
    row.update(status=d.status, error=d.error, http_status=d.http_status, attempts=min(d.attempts, 127))
    return row


def image_row(split: str, rec: Record, key: int, d: Download, res: ImageResult) -> dict[str, Any]:
    row = base_row(split, rec, key)
    row.update(status=res.status, error=res.error, http_status=d.http_status, attempts=min(d.attempts, 127),
               orig_bytes=res.orig_bytes, sha256=res.sha256, orig_width=res.orig_width,
               orig_height=res.orig_height)
    if res.status == "ok":
        row.update(image=res.image, image_format=res.image_format, width=res.width, height=res.height)
    return row


# --- one event loop -----------------------------------------------------------------------------


class _Loop:
    """One event loop's work: a task per record without a row (at most `run.pending` at
    once), each fetching, handing its body to the image pool and journaling its row."""

    def __init__(self, run: Run, journal: Journal, pool: ImagePool, progress: Progress,
                 on_tick: OnTick | None) -> None:
        self.run, self.journal, self.pool, self.progress, self.on_tick = run, journal, pool, progress, on_tick
        self.pending = asyncio.Semaphore(run.pending)
        self.tasks: set[asyncio.Task[None]] = set()
        self.failures: list[BaseException] = []

    async def feed(self, fetcher: Fetcher) -> None:
        """Start a task per record of this loop's share that has no row yet; wait for them all."""
        k, n = self.run.part
        for scanned in self.run.scan.sources:
            src = scanned.source
            split_done = self.run.done[src.split]
            skipped = 0
            for rec in read_records(src, self.run.opts.limit):
                if self.failures:
                    raise self.failures[0]
                problem = scanned.invalid.get(rec.index)
                key = (invalid_key(src.split, src.path.name, rec.index) if problem is not None
                       else record_key(src.split, rec.id))
                if (n > 1 and key % n != k) or contains(split_done, key):
                    skipped += 1
                    if skipped % 2048 == 0:
                        await asyncio.sleep(0)  # resuming a long list: let the loop breathe
                    continue
                if problem is not None:
                    self.journal.add(src.split, invalid_row(src.split, rec, key, problem))
                    self.run.counters.count(src.split, "invalid")
                    continue
                await self.pending.acquire()
                task = asyncio.create_task(self.one(fetcher, src.split, rec, key))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                if self.journal.due():
                    # Waits for a flush under way too: no new records start while the disk
                    # lags, so a journal file stays near its flush size.
                    await self.journal.flush()
        if self.tasks:
            await asyncio.gather(*self.tasks)
        if self.failures:
            raise self.failures[0]

    async def one(self, fetcher: Fetcher, split: str, rec: Record, key: int) -> None:
        d: Download | None = None
        try:
            d = await fetcher.fetch(rec.url or "")
            if d.status == "ok" and d.body is not None:
                row = image_row(split, rec, key, d, await self.pool.process(d.body))
            else:
                row = failure_row(split, rec, key, d)
            d.release()  # the row is built: the body's bytes go back now, not after the flush below
            self.journal.add(split, row, saving=d.saving is not None)
            d.saving = None  # the journal gives the unit back once the row is on disk
            self.run.counters.count(split, row["status"])
            await self.journal.flush(only_if_due=True)
        except Exception as exc:  # a bug, not a network problem: stop the run, keep the journal
            self.failures.append(exc)
        finally:
            if d is not None:
                d.release()
            self.pending.release()

    async def ticker(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self.report()
            await self.journal.flush(only_if_due=True)

    def report(self) -> None:
        self.progress.update(self.run.counters)
        if self.on_tick is not None:
            self.on_tick(self.run.counters)

    async def cancel(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _fetch_all(run: Run, on_tick: OnTick | None = None) -> dict[str, int]:
    """Fetch every record of `run.part` without a row; the fetcher's figures."""
    _return_freed_bodies_to_os()
    opts = run.opts
    journal = run.journal()
    pool = ImagePool(run.workers, opts.max_side, opts.max_pixels, opts.resize_filter, batch=opts.image_batch,
                     heavy_lock=run.heavy_lock)
    await pool.start()
    # A body counts against the budget from before its request until its row is built, so it
    # also bounds what the pool's queue, its sockets and the workers hold (their copies of a
    # body come on top: see config.DEFAULT_MEMORY).
    budget = ByteBudget(opts.net.memory)
    with Progress(run.total, opts.quiet) as progress:
        loop = _Loop(run, journal, pool, progress, on_tick)
        tick = asyncio.create_task(loop.ticker())
        try:
            async with Fetcher(opts.net, budget=budget, window=journal.window) as fetcher:
                await loop.feed(fetcher)
                stats = fetcher.stats
            await journal.flush()
            loop.report()
        except BaseException:
            await loop.cancel()
            journal.flush_now()  # keep every finished row: the rerun resumes after them
            raise
        finally:
            tick.cancel()
            await pool.close()
    return {"requests": stats.requests, "retries": stats.retries, "host_pauses": stats.host_pauses,
            "hosts_given_up": stats.hosts_given_up, "bytes_in": stats.bytes_in}


def _return_freed_bodies_to_os() -> None:
    """Make glibc give a freed body's memory back to the OS at once.

    glibc serves allocations above its mmap threshold with mmap (returned on free), but it
    raises that threshold to the size of each such block freed, up to 32 MiB; after the first
    large body, the next ones come from the heap, where freed space stays resident. Holding
    the threshold at 1 MiB keeps large bodies in mmap, so the resident size follows the
    bodies held (--memory) rather than the most ever held. No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD; setting it turns off the raising
    except (OSError, AttributeError):
        pass  # not glibc (musl has no mallopt): nothing to tune


# --- several loops ------------------------------------------------------------------------------


def _loop_count(opts: FetchOptions, remaining: int) -> int:
    """Loops for this run: as asked (or `default_loops`, for runs of some size), but never more
    than there are image workers, per-host or global request slots, or MiBs of --memory to
    share out."""
    workers = opts.workers or available_cpus()
    if opts.loops is not None:
        wanted = opts.loops
    else:  # not worth the processes for a small run
        wanted = min(default_loops(available_cpus()), max(1, remaining // 256))
    return max(1, min(wanted, workers, opts.net.per_host, opts.net.concurrency, opts.net.memory // MIN_MEMORY))


def _share(total: int, k: int, parts: int) -> int:
    """Part k of `total` split over `parts` as evenly as integers allow (they sum to total)."""
    return total // parts + (1 if k < total % parts else 0)


def _loop_share(run: Run, k: int, loops: int) -> Run:
    """Loop k's `Run`: its records, and its share of --concurrency, --per-host, --memory, the
    pending bound, the resume slack and the image workers, so every cap still holds for the
    run as a whole."""
    opts = run.opts
    net = replace(opts.net, concurrency=_share(opts.net.concurrency, k, loops),
                  per_host=_share(opts.net.per_host, k, loops), memory=_share(opts.net.memory, k, loops))
    child = replace(opts, net=net, workers=_share(run.workers, k, loops), loops=1, quiet=True,
                    pending=max(1, _share(run.pending, k, loops)), stats=False,
                    resume_slack=_share(opts.resume_slack, k, loops))
    return replace(run, opts=child, part=(k, loops), counters=Counters())


def _fetch_parallel(run: Run, loops: int) -> dict[str, int]:
    """Run `loops` event loops in child processes, loop k taking the records whose key is k
    mod `loops` (`_loop_share`). Each writes its own journal files; this process shows the
    progress and merges what they report into `run.counters`.

    A failing loop stops the others (they flush their journals first, so a rerun resumes).
    Each host's failure history is per loop: a dead host is detected by every loop."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no forked copies of this process's threads
    shared = ctx.Array("q", _SHARED * loops, lock=False)  # done, ok, failed, started per loop
    procs, conns = [], []
    try:
        for k in range(loops):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_loop_process, name=f"imatdata-fetch-loop-{k}",
                               args=(_loop_share(run, k, loops), shared, send, os.getpid()))
            with safe_path_children():  # no struct.py from the working directory in a loop
                proc.start()
            send.close()
            procs.append(proc)
            conns.append(recv)
        results = _watch_loops(procs, conns, shared, Progress(run.total, run.opts.quiet))
    except BaseException:
        _stop_loops(procs, [bool(shared[_SHARED * k + 3]) for k in range(len(procs))])
        raise
    for proc in procs:
        proc.join()
    stats: Counter[str] = Counter()
    for _, part, part_stats in results.values():
        run.counters.merge(part)
        stats.update(part_stats)
    return dict(stats)


_SHARED = 4  # slots per loop in the shared array: done, ok, failed, started


def _watch_loops(procs: list[Any], conns: list[Any], shared: Any, progress: Progress) -> dict[int, tuple[Any, ...]]:
    """Show the loops' progress until each has reported; raise for the first that failed."""
    from multiprocessing.connection import wait

    results: dict[int, tuple[Any, ...]] = {}
    with progress:
        live = {conn: k for k, conn in enumerate(conns)}
        while live:
            for conn in wait(list(live), timeout=0.25):
                k = live.pop(conn)
                try:
                    results[k] = conn.recv()
                except EOFError:
                    procs[k].join(5)
                    results[k] = ("died", procs[k].exitcode)
                if results[k][0] != "done":
                    _raise_for(results[k])
            view = Counters()
            view.done, view.ok, view.failed = (sum(shared[i::_SHARED]) for i in range(3))
            progress.update(view)
    return results


def _raise_for(result: tuple[Any, ...]) -> None:
    kind = result[0]
    if kind == "interrupted":
        raise KeyboardInterrupt
    if kind == "error":
        raise UserError(result[1])
    if kind == "died":
        raise UserError(f"a fetch loop process died (exit code {result[1]}); rerun the same command "
                        "to resume")
    raise RuntimeError(f"a fetch loop failed: {result[1]} (its traceback is printed above)")


def _stop_loops(procs: list[Any], started: list[bool]) -> None:
    """Interrupt the loops still running (each flushes its journal), then reap them. A loop
    still starting (importing, in spawn's bootstrap) holds no rows: it is killed, not
    interrupted, which would print a traceback from the middle of an import."""
    for proc, running in zip(procs, started):
        if proc.is_alive():
            if running:
                os.kill(proc.pid, signal.SIGINT)
            else:
                proc.kill()
    deadline = time.monotonic() + 30
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


def _loop_process(run: Run, shared: Any, conn: Any, parent: int) -> None:
    """One loop's process: its share of the records, reported through `shared` and `conn`."""
    # A fetch started with SIGINT ignored (`imatdata fetch … &` from a script) passes that on,
    # and Python then installs no KeyboardInterrupt handler; but SIGINT is how the fetch (or
    # the loop itself, once the fetch is gone) stops a loop so that it flushes its journal.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    k = run.part[0]
    shared[_SHARED * k + 3] = 1  # from here on an interrupt flushes the journal (_stop_loops)

    def tick(c: Counters) -> None:
        shared[_SHARED * k:_SHARED * k + 3] = [c.done, c.ok, c.failed]
        if os.getppid() != parent:  # the fetch was killed (kill -9): keep what is done, stop
            os.kill(os.getpid(), signal.SIGINT)

    def report(*message: Any) -> None:
        try:
            conn.send(message)
        except OSError:
            pass  # the fetch is gone; the journal holds the rows

    try:
        stats = asyncio.run(_fetch_all(run, on_tick=tick))
        report("done", run.counters, stats)
    except UserError as exc:
        report("error", str(exc))
    except KeyboardInterrupt:
        report("interrupted")
    except BaseException as exc:
        traceback.print_exc()
        report("bug", f"{type(exc).__name__}: {exc}")


# --- the run ------------------------------------------------------------------------------------


def run_fetch(opts: FetchOptions) -> FetchSummary:
    """Validate, fetch what is missing, settle raw/ shards, write summary and stats."""
    root = resolve_root(opts.root)
    started = time.monotonic()
    # Validation comes first and writes nothing: a bad list leaves the disk as it was.
    scan = scan_sources(resolve_sources(opts.sources, opts.split), limit=opts.limit, skip_invalid=opts.skip_invalid)
    with RunLock(root / "raw" / LOCK_NAME,
                 f"another imatdata fetch is writing {root / 'raw'}; wait for it or stop it"):
        done = done_so_far(root, scan.split_keys, retry_failed=opts.retry_failed, prune=opts.prune)
        already = sum(int(d.size) for d in done.values())
        total = sum(int(k.size) for k in scan.split_keys.values())
        run = Run(opts, root, scan, done, total=total - already)
        stats = _fetch(run)
        if opts.stats:
            _preload("imatdata.stats.plots")  # ~1 s of matplotlib import, hidden behind the settle
        settled = settle(root, scan.split_keys, opts.shard_rows)
    elapsed = time.monotonic() - started
    summary = FetchSummary(
        root=str(root), elapsed_s=round(elapsed, 3), records=total, already_done=already,
        attempted=run.counters.done, this_run=dict(run.counters.by_status), splits=settled.splits,
        requests=stats.get("requests", 0), retries=stats.get("retries", 0),
        host_pauses=stats.get("host_pauses", 0), hosts_given_up=stats.get("hosts_given_up", 0),
        bytes_downloaded=stats.get("bytes_in", 0),
        images_per_s=round(run.counters.ok / elapsed, 2) if elapsed > 0 else 0.0,
        rows_dropped_not_in_input=settled.dropped, shards=settled.shards)
    write_summary(summary, root)
    if opts.stats:
        from imatdata.stats import write_stats

        write_stats(root, stage="raw")
    return summary


def _fetch(run: Run) -> dict[str, int]:
    """Fetch what is missing, here, over several loops or on a Ray cluster (`cluster`), while
    a thread seals full shards."""
    loops = _loop_count(run.opts, run.total)
    with Sealer(run.root, list(run.scan.split_keys), run.opts.shard_rows, run.opts.seal_seconds):
        if run.total > 0 and run.opts.ray:
            from imatdata.fetch.cluster import fetch_on_ray

            return fetch_on_ray(run)
        if run.total > 0 and loops > 1:
            with tempfile.TemporaryDirectory(prefix="imatdata-fetch-") as tmp:
                return _fetch_parallel(replace(run, heavy_lock=str(Path(tmp) / "heavy-decode.lock")), loops)
        if run.total > 0:
            return asyncio.run(_fetch_all(run))
    return {}


def _preload(module: str) -> threading.Thread:
    """Import `module` on a thread now, so a later import finds it done. Settling the shards
    runs mostly in Arrow's C++ code without the GIL and leaves a core idle; an import there
    costs no wall time. A failed import is left for the real one to report."""
    def load() -> None:
        try:
            importlib.import_module(module)
        except Exception:
            pass

    thread = threading.Thread(target=load, name=f"preload-{module}", daemon=True)
    thread.start()
    return thread
