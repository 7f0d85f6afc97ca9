"""`imatdata fetch --loops N`: several event-loop processes share one run.

Real child processes against the sample server: the fault catalogue still maps fault by
fault, the caps hold for the run as a whole, and a kill -9 of the fetch, or of one loop,
loses only work in flight and resumes to exactly one row per record.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from imatdata.fetch import store
from imatdata.fetch import journal_dir
from imatdata.manifest import list_shards
from imatsample import big_catalogue, build_catalogue, serve_in_thread, two_host_trickles, write_lists
from test_fetch import FAST, cli, fetch_lib, group_gone, kill_fetch, rows, spawn_fetch, wait_while_running


def test_fault_catalogue_over_two_loops(tmp_path: Path, monkeypatch) -> None:
    sealed = []
    real_seal = store.seal_journal
    monkeypatch.setattr(store, "seal_journal", lambda *a, **k: sealed.append(real_seal(*a, **k)) or sealed[-1])
    cat = build_catalogue("faults", seed=0)
    with serve_in_thread(cat) as srv:
        lists = write_lists(cat, srv, tmp_path / "lists")
        # Small shards sealed often: the parent seals journal rows while both loops write them.
        summary = fetch_lib([lists[s] for s in ("train", "val", "test")], tmp_path / "m", loops=2, workers=2,
                            shard_rows=8, journal_rows=2, journal_seconds=0.05, seal_seconds=0.02)
        requests = srv.total_requests
        # Rerun: nothing left to do, nothing fetched.
        fetch_lib([lists[s] for s in ("train", "val", "test")], tmp_path / "m", loops=2, workers=2)
        assert srv.total_requests == requests
    got = rows(tmp_path / "m")
    expected = cat.expected()
    assert Counter(r["id"] for r in got) == Counter(expected.keys()), "one row per input record"
    wrong = {cat.by_id[r["id"]].kind: r["status"] for r in got if r["status"] != expected[r["id"]]}
    assert not wrong, wrong
    # The loops' reports are merged: the summary counts every row of this run.
    assert summary.attempted == len(got) and sum(summary.this_run.values()) == len(got)
    assert summary.this_run == dict(Counter(r["status"] for r in got))
    assert summary.requests >= len(got)
    assert any(sealed), "no shard was sealed while the loops ran"


def test_caps_hold_for_the_run_as_a_whole(tmp_path: Path) -> None:
    cat = two_host_trickles(40)
    with serve_in_thread(cat) as srv:
        src = write_lists(cat, srv, tmp_path / "lists")["train"]
        from imatdata.fetch.download import NetConfig
        from imatdata.fetch import FetchOptions, run_fetch

        net = NetConfig(per_host=3, concurrency=5, timeout=10, allow_nets=("127.0.0.0/8",))
        run_fetch(FetchOptions([src], root=tmp_path / "m", net=net, quiet=True, stats=False, loops=2,
                               workers=2))
        assert srv.max_concurrency("127.0.0.1") <= 3 and srv.max_concurrency("localhost") <= 3
        assert srv.max_concurrency() <= 5
        # Each loop alone has at most 3 requests in flight: more means both ran at once.
        assert srv.max_concurrency() >= 4
    assert len(rows(tmp_path / "m")) == 40


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                out.append(int(entry.name))
    return out


def _start(src: Path, root: Path, pending: int, journal_rows: int) -> subprocess.Popen[bytes]:
    return spawn_fetch(src, root, workers=2, loops=2, pending=pending, journal_rows=journal_rows,
                       journal_seconds=0.2)


def _wait_for_journal(proc: subprocess.Popen[bytes], jdir: Path, files: int) -> None:
    wait_while_running(proc, lambda: len(list(jdir.glob("j-*.parquet"))) >= files)


def test_kill_9_of_the_fetch_stops_every_loop_and_rerun_resumes(tmp_path: Path) -> None:
    # Enough records that the loops cannot journal them all between the 6th journal file and
    # the kill, should this process be slow to run (it once was, on a fresh clone).
    n, pending, journal_rows = 3000, 8, 16
    cat = big_catalogue(n, n_bodies=8, size=24)
    root = tmp_path / "m"
    with serve_in_thread(cat) as srv:
        src = write_lists(cat, srv, tmp_path)["train"]
        proc = _start(src, root, pending, journal_rows)
        jdir = journal_dir(root, "train")
        _wait_for_journal(proc, jdir, 6)
        # The fetch process only: its loops must notice.
        assert kill_fetch(proc), "loops or image workers outlived the killed fetch"
        names = [p.name for p in jdir.glob("j-*.parquet")]
        assert {name.split("-")[2] for name in names} == {"000", "001"}, names  # both loops wrote
        journaled = sum(pq.read_metadata(jdir / name).num_rows for name in names)
        before = srv.total_requests
        assert 0 < journaled < n and not list_shards(root / "raw" / "train")
        fetch_lib([src], root, loops=2, workers=2)
        second_run = srv.total_requests - before
    got = rows(root)
    assert len(got) == n and len({r["id"] for r in got}) == n
    assert all(r["status"] == "ok" for r in got)
    # Each loop flushes its journal as it stops: lost work is what was in flight or unflushed.
    lost = before - journaled
    assert lost <= 2 * (pending + journal_rows + 4), (before, journaled)
    assert second_run == n - journaled


def test_a_loop_killed_mid_run_is_one_clear_error_and_rerun_resumes(tmp_path: Path) -> None:
    n = 1200
    cat = big_catalogue(n, n_bodies=8, size=24)
    root = tmp_path / "m"
    with serve_in_thread(cat) as srv:
        src = write_lists(cat, srv, tmp_path)["train"]
        proc = _start(src, root, 8, 16)
        _wait_for_journal(proc, journal_dir(root, "train"), 4)
        loops = [pid for pid in _children(proc.pid)
                 if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(loops) == 2, loops
        os.kill(loops[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1 and "a fetch loop process died" in lines[0], lines
        assert group_gone(proc.pid, 15), "the other loop and every image worker stop too"
        code, _, err = cli(str(src), "--root", str(root), "--loops", "2", "--workers", "2", *FAST)
        assert code == 0, err
    got = rows(root)
    assert len(got) == n and len({r["id"] for r in got}) == n
    assert all(r["status"] == "ok" for r in got)


def test_loops_share_the_memory_budget_and_large_bodies_still_pass(tmp_path: Path) -> None:
    # --memory 2MiB over two loops is 1 MiB each, less than one 3 MiB body: each loop lets one
    # body at a time go over its share, so every row completes (no deadlock, no timeout).
    from test_fetch import _bench_memory

    bench = _bench_memory()
    result = bench.run_case(tmp_path, n=8, hosts=4, size=3 * bench.MIB, chunked=True,
                            extra=["--loops", "2", "--workers", "2", "--memory", "2MiB", "--timeout", "10"])
    assert result.records == 8 and result.statuses == {"not_image": 8}


def test_loops_share_one_heavy_decode_slot(tmp_path: Path, monkeypatch) -> None:
    """Each loop's image pool takes the heavy slot from the same lock file, so a run decodes
    one large image at a time however many loops it has (imagepool: several pools given one
    `heavy_lock` path exclude each other)."""
    from imatdata.fetch import loops
    from imatdata.fetch.config import FetchOptions

    seen = []

    def fake_parallel(run: loops.Run, n: int) -> dict[str, int]:
        shares = [loops._loop_share(run, k, n) for k in range(n)]
        seen.append((run.heavy_lock, [s.heavy_lock for s in shares], Path(run.heavy_lock).parent.is_dir()))
        return {}

    monkeypatch.setattr(loops, "_fetch_parallel", fake_parallel)
    monkeypatch.setattr(loops, "_loop_count", lambda opts, total: 3)
    opts = FetchOptions(["x.json"], root=tmp_path, loops=3, workers=3, quiet=True, stats=False)
    scan = loops.ScanResult.__new__(loops.ScanResult)
    scan.split_keys = {}
    loops._fetch(loops.Run(opts, tmp_path, scan, done={}, total=10_000))
    (lock, shared, existed), = seen
    assert lock is not None and shared == [lock] * 3 and existed
    assert not Path(lock).parent.exists()  # the lock's folder goes with the run
