"""`imatdata fetch --ray ADDRESS`: one fetch's loops as tasks on a real local Ray cluster.

A head and a second node, each of 1 CPU, started as a user starts them (`ray start --head`,
`ray start --address`; see `ray_cluster.py`), against the sample server: the fault catalogue
gives what a local fetch gives, the per-host cap holds across nodes, Ctrl-C stops the
cluster's tasks, and a node lost mid-run still leaves one row per record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'imat[ray]')")

from imatdata.fetch import journal_dir  # noqa: E402
from imatdata.fetch.report import SUMMARY_NAME  # noqa: E402
from imatsample import big_catalogue, build_catalogue, serve_in_thread, two_host_trickles, write_lists  # noqa: E402
from imatsample.raycluster import RayCluster, local_cluster, raylet_pid  # noqa: E402
from test_fetch import FAST, cli, fetch_lib, rows, spawn_fetch  # noqa: E402

pytestmark = pytest.mark.timeout(240)

# The columns a fetch decides; fetched_at, attempts and error wording may differ by timing.
_SAME = ("id", "split", "label", "url", "status", "http_status", "sha256", "orig_bytes", "orig_width",
         "orig_height", "image", "image_format", "width", "height")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    with local_cluster(nodes=2, cpus=1) as cluster:
        yield cluster


def fetch_cli(*args: object, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`imatdata fetch ARGS` in a fresh process, as a user runs it: Ray reads its settings
    (the cluster's auth token among them) once per process, at import."""
    out = subprocess.run([sys.executable, "-m", "imatdata", "fetch", *map(str, args), *FAST], capture_output=True,
                         text=True, timeout=180, env=env)
    return out.returncode, out.stderr


def _by_id(root: Path) -> dict[str, tuple]:
    return {r["id"]: tuple(r.get(c) for c in _SAME) for r in rows(root)}


def test_fault_catalogue_through_ray_is_a_local_fetch(ray_cluster: RayCluster, tmp_path: Path) -> None:
    cat = build_catalogue("faults", seed=0)
    with serve_in_thread(cat) as srv:
        lists = write_lists(cat, srv, tmp_path / "lists")
        sources = [lists[s] for s in ("train", "val", "test")]
        fetch_lib(sources, tmp_path / "local", workers=2)
        # Two tasks, one on each node (each takes the node's only CPU).
        code, err = fetch_cli(*sources, "--root", tmp_path / "ray", "--ray", ray_cluster.address, "--loops", 2)
        assert code == 0, err
        first = json.loads((tmp_path / "ray" / "raw" / SUMMARY_NAME).read_text())
        requests = srv.total_requests
        code, err = fetch_cli(*sources, "--root", tmp_path / "ray", "--ray", ray_cluster.address, "--loops", 2)
        assert code == 0 and srv.total_requests == requests, "a rerun fetches nothing"
    local, on_ray = _by_id(tmp_path / "local"), _by_id(tmp_path / "ray")
    assert Counter(r["id"] for r in rows(tmp_path / "ray")) == Counter(cat.expected().keys()), "one row per record"
    assert on_ray == local, {k: (on_ray[k][4], local[k][4]) for k in local if on_ray.get(k) != local[k]}
    # The tasks' reports are merged: the summary counts every row of the run.
    assert first["attempted"] == len(on_ray) and first["this_run"] == dict(Counter(v[4] for v in on_ray.values()))
    assert first["requests"] >= len(on_ray) and first["bytes_downloaded"] > 0


def test_per_host_cap_holds_across_nodes(ray_cluster: RayCluster, tmp_path: Path) -> None:
    cat = two_host_trickles(40)
    with serve_in_thread(cat) as srv:
        src = write_lists(cat, srv, tmp_path / "lists")["train"]
        code, err = fetch_cli(src, "--root", tmp_path / "m", "--ray", ray_cluster.address, "--loops", 2,
                              "--per-host", 3, "--concurrency", 5)
        assert code == 0, err
        assert srv.max_concurrency("127.0.0.1") <= 3 and srv.max_concurrency("localhost") <= 3
        assert srv.max_concurrency() <= 5
        # One task alone has at most 3 requests in flight: more means both nodes fetched at once.
        assert srv.max_concurrency() >= 4
    assert len(rows(tmp_path / "m")) == 40


def _spawn(src: Path, root: Path, address: str) -> subprocess.Popen[bytes]:
    # Small journal files, written often: the test acts once a few are down.
    return spawn_fetch(src, root, ray=address, loops=2, pending=8, journal_rows=16, journal_seconds=0.2)


def _journal_tags(root: Path) -> list[str]:
    """The task tag of each journal file written so far."""
    return [p.name.split("-")[2] for p in journal_dir(root, "train").glob("j-*.parquet")]


def _wait_for_both_tasks(proc: subprocess.Popen[bytes], root: Path, files: int, timeout: float = 120) -> None:
    """Until both tasks have journaled and there are `files` journal files in all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        tags = _journal_tags(root)
        if len(tags) >= files and set(tags) == {"000", "001"}:
            return
        time.sleep(0.02)
    assert proc.poll() is None, "fetch finished before the test could act: " + proc.stderr.read().decode()
    raise AssertionError(f"the tasks wrote only {_journal_tags(root)}")


def _assert_one_ok_row_each(root: Path, n: int) -> None:
    got = rows(root)
    assert len(got) == n and len({r["id"] for r in got}) == n
    assert Counter(r["status"] for r in got) == {"ok": n}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_stopping_the_driver_stops_the_cluster_tasks_and_a_rerun_resumes(ray_cluster: RayCluster, tmp_path: Path,
                                                                          sig: int) -> None:
    """Ctrl-C: the tasks are asked to stop and flush their journals. kill -9: Ray ends the
    tasks of a driver that is gone (within a second here)."""
    n = 3000
    cat = big_catalogue(n, n_bodies=8, size=24)
    root = tmp_path / "m"
    with serve_in_thread(cat) as srv:
        src = write_lists(cat, srv, tmp_path)["train"]
        proc = _spawn(src, root, ray_cluster.address)
        _wait_for_both_tasks(proc, root, 4)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
        if sig == signal.SIGINT:
            assert proc.returncode != 0 and b"KeyboardInterrupt" in err, err
        deadline = time.monotonic() + 15
        stopped = -1
        while srv.total_requests != stopped and time.monotonic() < deadline:
            stopped = srv.total_requests
            time.sleep(1)
        time.sleep(2)
        assert srv.total_requests == stopped, "a task on the cluster still fetches after the driver stopped"
        assert stopped < n
        code, err = fetch_cli(src, "--root", root, "--ray", ray_cluster.address)
        assert code == 0, err
        assert srv.total_requests - stopped < n, "the rerun resumed from the journal"
    _assert_one_ok_row_each(root, n)


def test_bad_address_is_one_line_exit_2_and_nothing_written(tmp_path: Path) -> None:
    cat = build_catalogue("faults", seed=0)
    with serve_in_thread(cat) as srv:
        src = write_lists(cat, srv, tmp_path / "lists")["train"]
        for address, expect in (("127.0.0.1:1", "no Ray cluster answers there"),
                                ("ray://x", "expected the host:port"), ("head", "expected the host:port")):
            code, _, err = cli(str(src), "--root", str(tmp_path / "m"), "--ray", address, *FAST)
            assert code == 2, err
            lines = err.strip().splitlines()
            assert len(lines) == 1 and expect in lines[0], lines
            assert not list((tmp_path / "m").glob("raw/*/*.parquet")) and srv.total_requests == 0


def test_ray_local_starts_a_cluster_of_its_own_and_stops_it(tmp_path: Path) -> None:
    cat = build_catalogue("faults", seed=0)
    # A home of its own: a new local Ray writes its token to ~/.ray.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path)}
    with serve_in_thread(cat) as srv:
        src = write_lists(cat, srv, tmp_path / "lists")["train"]
        code, err = fetch_cli(src, "--root", tmp_path / "m", "--ray", "local", env=env)
        assert code == 0, err
    expected = {k: v for k, v in cat.expected().items() if cat.by_id[k].split == "train"}
    assert {r["id"]: r["status"] for r in rows(tmp_path / "m")} == expected
    # Its GCS server and raylet are gone (those of the test cluster live in /tmp/imr-*).
    ps = subprocess.run(["ps", "-eo", "stat,args"], capture_output=True, text=True).stdout.splitlines()
    left = [line for line in ps if not line.startswith("Z") and ("gcs_server" in line or "/raylet " in line)
            and "/tmp/imr-" not in line]
    assert not left, left


def test_a_node_lost_mid_run_still_gives_one_row_per_record(ray_cluster: RayCluster, tmp_path: Path) -> None:
    """The second node's raylet is killed while its task fetches: Ray runs the task again on
    the head, which fetches only what the lost attempt did not journal. Runs last: it puts a
    fresh second node back for whatever follows."""
    n = 3000
    cat = big_catalogue(n, n_bodies=8, size=24)
    root = tmp_path / "m"
    with serve_in_thread(cat) as srv:
        src = write_lists(cat, srv, tmp_path)["train"]
        proc = _spawn(src, root, ray_cluster.address)
        _wait_for_both_tasks(proc, root, 4)  # so one of them runs on the node about to die
        second = ray_cluster.nodes[1]
        os.kill(raylet_pid(second), signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
        ray_cluster.stop_node(second)
        if proc.returncode != 0:  # Ray gave up on the task: one clear line, and a rerun resumes
            assert proc.returncode == 2 and b"rerun the same command" in err, err
            code, err2 = fetch_cli(src, "--root", root, "--ray", ray_cluster.address)
            assert code == 0, err2
        assert srv.total_requests < 2 * n
    _assert_one_ok_row_each(root, n)
    ray_cluster.add_node()
