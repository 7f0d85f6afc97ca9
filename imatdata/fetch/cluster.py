"""`imatdata fetch --ray ADDRESS`: one fetch's loops as tasks on a Ray cluster.

The split is `--loops`' split carried onto Ray: task k of n takes the records whose key is
k mod n, with its share of --concurrency, --per-host, --memory and the resume slack
(`loops._loop_share`), and runs one event loop with its own image workers and journal files
on whichever node Ray gives it. So every cap holds for the cluster as a whole with no
messages at all: a host's 16 slots are cut into n shares, and a key spreads each host's
records evenly over the tasks. (A cluster-wide semaphore in an actor would cost a round trip
per request; that is why there are never more tasks than --per-host slots.)

The tasks write journal files straight into the shared root, a folder every node mounts at
the same path or an `s3://` prefix; the driver (this process) hands out the tasks, shows one
bar from what each task reports to a small actor on this node, seals full shards as the
tasks write (`store.Sealer`, as for local loops) and settles raw/ at the end, as a local
fetch does. Nothing large passes through the driver: the run's record keys go to the object
store once and each task streams the lists itself.

Faults: a task whose node dies is run again by Ray on another node (`max_retries`); the new
attempt first reads what the lost one journaled and fetches only the rest, under a newer
run id so its rows win. A rerun of the command resumes from the journal like any fetch.
Ctrl-C here asks every task to stop; each flushes its journal first. If this process is
killed, Ray ends the job's tasks with it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from imatdata import storage
from imatdata.errors import UserError
from imatdata.fetch.config import MIN_MEMORY
from imatdata.fetch.loops import Run, _fetch_all, _loop_share, _raise_for, default_loops
from imatdata.fetch.report import Counters, Progress
from imatdata.fetch.store import done_keys, index_store, new_run_id

_STOP_GRACE_S = 30.0  # how long stopped tasks get to flush their journals before being killed
_MAX_RETRIES = 3  # attempts Ray makes after a task's node or worker dies


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray on this machine and on every node: pip install 'imat[ray]'") from None
    return ray


# --- the driver -----------------------------------------------------------------------------------


def fetch_on_ray(run: Run) -> dict[str, int]:
    """Fetch every record of `run` without a row on the Ray cluster `run.opts.ray`; the
    fetchers' figures, summed. `run.counters` gets every attempt's rows."""
    ray = _ray()
    started_here = _connect(ray, run.opts.ray or "auto", run.root)
    try:
        return _drive(ray, _portable(run))
    finally:
        if started_here:
            ray.shutdown()


def _connect(ray: Any, address: str, root: Any) -> bool:
    """Join the cluster (or start one, for `local`); whether this call started the connection."""
    if ray.is_initialized():
        return False  # a library caller's own connection
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")} if storage.is_remote(root) else {}
    os.environ.setdefault("RAY_SCHEDULER_EVENTS", "0")  # no autoscaler tips on the driver's stderr
    if address not in ("local", "auto"):
        _probe(address)  # Ray itself retries an address where nothing answers for minutes
    kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "runtime_env": {"env_vars": env} if env else None}
    try:
        if address == "local":
            from imatdata.procs import available_cpus

            ray.init(num_cpus=available_cpus(), include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError... by version
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--ray {address}: cannot join a Ray cluster there ({first}); start one with "
                        "`ray start --head`, or use --ray local") from None
    return True


def _probe(address: str) -> None:
    """A clear error now if nothing listens at the head's host:port."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise UserError(f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc}); start one with "
                        "`ray start --head`, or use --ray local") from None


def _portable(run: Run) -> Run:
    """The run as every node must see it: the lists and the root by absolute path (a Ray
    worker's working directory is not this one)."""
    scan = replace(run.scan, sources=[replace(s, source=replace(s.source, path=Path(os.path.abspath(s.source.path))))
                                      for s in run.scan.sources])
    root = run.root if storage.is_remote(run.root) else Path(os.path.abspath(run.root))
    return replace(run, scan=scan, root=root)


def task_count(opts: Any, node_cpus: list[int], remaining: int) -> int:
    """Tasks for a run on nodes with these CPU counts: --loops if given, else what
    `default_loops` gives each node; never more than there are per-host or global request
    slots, MiBs of --memory or --workers to share out, nor one per 256 records of a small run."""
    wanted = opts.loops or min(sum(default_loops(c) for c in node_cpus), max(1, remaining // 256))
    return max(1, min(wanted, opts.workers or wanted, opts.net.per_host, opts.net.concurrency,
                      opts.net.memory // MIN_MEMORY))


def _drive(ray: Any, run: Run) -> dict[str, int]:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
    node_cpus = [c for c in node_cpus if c > 0] or [1]
    n = task_count(run.opts, node_cpus, run.total)
    # Each task's Ray CPUs (and its image workers unless --workers): an equal share of the
    # cluster's, but never more than one node has, or the task could never be placed.
    cpus = max(1, min(max(node_cpus), sum(node_cpus) // n))
    if run.opts.workers is None:
        run = replace(run, opts=replace(run.opts, workers=cpus * n))
    marker = run.root / "raw" / f".ray-{run.run_id}"
    storage.write_bytes_atomic(b"", marker)  # each task checks it sees this root
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    # The progress actor lives on this node: a lost worker node must not take it along.
    board = ray.remote(num_cpus=0)(Board).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote(n)
    task = ray.remote(_task).options(num_cpus=cpus, max_retries=_MAX_RETRIES, retry_exceptions=False,
                                     scheduling_strategy="SPREAD")
    shared = ray.put(run)
    refs = {task.remote(shared, k, n, board): k for k in range(n)}
    try:
        results = _watch(ray, refs, board, Progress(run.total, run.opts.quiet))
    except BaseException:
        _stop(ray, list(refs), board)
        raise
    finally:
        storage.remove(marker)
    stats: dict[str, int] = {}
    for part_stats in results:
        for key, value in part_stats.items():
            stats[key] = stats.get(key, 0) + value
    run.counters.merge(ray.get(board.total.remote()))
    return stats


def _watch(ray: Any, refs: dict[Any, int], board: Any, progress: Progress) -> list[dict[str, int]]:
    """Show the tasks' progress until each has finished; raise for the first that failed."""
    results = []
    live = dict(refs)
    with progress:
        while live:
            ready, _ = ray.wait(list(live), num_returns=len(live), timeout=0.25)
            for ref in ready:
                k = live.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the node died more often than Ray retries, or similar
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise UserError(f"fetch task {k} was lost on the Ray cluster ({first}); rerun the same "
                                    "command to resume") from None
                if result[0] != "done":
                    _raise_for(result)
                results.append(result[1])
            progress.update(ray.get(board.view.remote()))
    return results


def _stop(ray: Any, refs: list[Any], board: Any) -> None:
    """Ask every task to stop (each flushes its journal), then cancel what still runs. Only
    what still runs: Ray's driver aborts when a task it cancelled reports back as finished."""
    running = refs
    try:
        ray.get(board.stop.remote(), timeout=5)
        _, running = ray.wait(refs, num_returns=len(refs), timeout=_STOP_GRACE_S)
    except Exception:
        pass  # the cluster is going away too: cancel what can be
    for ref in running:
        try:
            ray.cancel(ref, force=True)
        except Exception:
            pass  # finished already


class Board:
    """What the tasks report (a Ray actor on the driver's node): each attempt's counters, for
    the bar and the summary, how often each task started, and whether to stop."""

    def __init__(self, tasks: int) -> None:
        self.attempts: dict[tuple[int, int], Counters] = {}
        self.starts = [0] * tasks
        self.stopping = False

    def start(self, k: int) -> int:
        """Register an attempt of task k; its number (0 for the first)."""
        self.starts[k] += 1
        return self.starts[k] - 1

    def update(self, k: int, attempt: int, counters: Counters) -> bool:
        """Record an attempt's counters; whether it should stop."""
        self.attempts[(k, attempt)] = counters
        return self.stopping

    def stop(self) -> None:
        self.stopping = True

    def view(self) -> Counters:
        view = Counters()
        for c in self.attempts.values():
            view.done, view.ok, view.failed = view.done + c.done, view.ok + c.ok, view.failed + c.failed
        return view

    def total(self) -> Counters:
        total = Counters()
        for c in self.attempts.values():
            total.merge(c)
        return total


# --- one task, on some node -----------------------------------------------------------------------


def _task(run: Run, k: int, n: int, board: Any) -> tuple[Any, ...]:
    """Task k of n: one fetch loop over its share of the records. Returns what a local loop
    process reports: ("done", stats) or ("error" | "interrupted" | "bug", ...)."""
    import ray

    # SIGINT is how a stop reaches the loop (it flushes its journal first). A Ray worker runs
    # tasks on its main thread but with SIGINT blocked: unblocked for this task only.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        attempt = ray.get(board.start.remote(k))
        share = _loop_share(run, k, n)
        _check_node_sees(run)
        if attempt > 0:  # a lost attempt journaled rows: fetch only the rest, and win over them
            share = replace(share, run_id=new_run_id(), done=_done_now(share))
        pending: list[Any] = []

        def tick(c: Counters) -> None:
            if pending and ray.wait(pending, timeout=0)[0] and ray.get(pending.pop()):
                os.kill(os.getpid(), signal.SIGINT)
            if not pending:
                pending.append(board.update.remote(k, attempt, c))

        import asyncio

        stats = asyncio.run(_fetch_all(share, on_tick=tick))
        ray.get(board.update.remote(k, attempt, share.counters))
        return ("done", stats)
    except UserError as exc:
        return ("error", str(exc))
    except KeyboardInterrupt:
        return ("interrupted",)
    except BaseException as exc:
        traceback.print_exc()
        return ("bug", f"{type(exc).__name__}: {exc}")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, handler)


def _check_node_sees(run: Run) -> None:
    """Every node must read the same lists and write the same root as the driver."""
    import socket

    node = socket.gethostname()
    for scanned in run.scan.sources:
        if not os.path.isfile(scanned.source.path):
            raise UserError(f"node {node} cannot read {scanned.source.path}: with --ray the lists must be at the "
                            "same path on every node (a shared folder)")
    if not storage.exists(run.root / "raw" / f".ray-{run.run_id}"):
        raise UserError(f"node {node} does not see the root {run.root}: with --ray the root must be a folder "
                        "every node mounts at the same path, or s3://")


def _done_now(run: Run) -> dict[str, np.ndarray]:
    """The run's done keys plus the rows journaled since it began (by a lost attempt). The
    driver seals journal files into shards meanwhile: a file gone while it is read makes the
    index start over, and a row missed in the move is fetched again (the newest row wins)."""
    done = {}
    for split, wanted in run.scan.split_keys.items():
        done[split] = run.done[split]
        for _ in range(3):
            try:
                index = index_store(run.root, split)
            except UserError:
                time.sleep(0.2)
                continue
            done[split] = np.union1d(run.done[split], done_keys(index, wanted, run.opts.retry_failed))
            break
    return done
