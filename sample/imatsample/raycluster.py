"""A real local Ray cluster for the tests and bench/fetch.py --ray-nodes: a head and more
nodes on this machine, each started as a user starts one (`ray start --head`, then
`ray start --address`), in a temporary folder, on free ports, on 127.0.0.1, with a token of
its own. Each node is one `ray start --block` process leading a process group of its own:
stopping a node kills that group (never `ray stop`, which would stop every Ray on the
machine), and `raylet_pid` finds a node's raylet so a test can kill it.

    with local_cluster(nodes=2, cpus=1) as cluster:    # cluster.address: host:port
        ...                                             # a client needs cluster.env()
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


def ray_binary() -> str | None:
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else shutil.which("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayCluster:
    address: str  # 127.0.0.1:port of the head's GCS
    folder: Path
    cpus: int = 1  # each node's
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def add_node(self) -> subprocess.Popen[bytes]:
        node = _start_node(["--address", self.address], self.cpus, self.folder)
        _wait_for_nodes(self.address, self.folder, len(self.nodes) + 1)
        self.nodes.append(node)
        return node

    def stop_node(self, node: subprocess.Popen[bytes]) -> None:
        _kill_group(node)
        if node in self.nodes:
            self.nodes.remove(node)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            _kill_group(node)
        self.nodes.clear()


def _start_node(args: list[str], cpus: int, folder: Path) -> subprocess.Popen[bytes]:
    ray = ray_binary()
    assert ray is not None
    cmd = [ray, "start", "--block", *args, "--num-cpus", str(cpus), "--node-ip-address", "127.0.0.1",
           "--disable-usage-stats", "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
           "--min-worker-port", "0", "--max-worker-port", "0"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(folder), **_auth(folder)}
    log = open(folder / f"node-{time.monotonic_ns()}.log", "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _auth(folder: Path) -> dict[str, str]:
    """Token authentication with the cluster's own token, as Ray sets up a new cluster by
    default, but never the user's ~/.ray/auth_token (whose presence would switch a cluster's
    nodes or clients to it)."""
    token = folder / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def _wait_for_nodes(address: str, folder: Path, count: int, timeout: float = 60) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True,
                                 timeout=20, env={**os.environ, **_auth(folder)})
        except subprocess.TimeoutExpired:
            continue
        if out.returncode == 0 and out.stdout.strip().isdigit() and int(out.stdout.strip()) >= count:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the Ray cluster at {address} did not reach {count} nodes")


def _kill_group(node: subprocess.Popen[bytes]) -> None:
    """SIGKILL the node's whole process group (SIGTERM would make it drain for up to 30 s),
    and wait until none of it runs (zombies left to an init that does not reap them count
    as gone)."""
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    node.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _group_members(node.pid):
        time.sleep(0.1)


def _group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group, by /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[0] != "Z" and int(stat[2]) == pgid:
            members.append(int(entry.name))
    return members


def raylet_pid(node: subprocess.Popen[bytes]) -> int:
    """The raylet process of a node started by `_start_node`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != node.pid:
                continue
            cmd = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
        if cmd.endswith(b"/raylet"):
            return int(entry.name)
    raise LookupError("no raylet in that node's process group")


@contextmanager
def local_cluster(nodes: int = 2, cpus: int = 1) -> Iterator[RayCluster]:
    """Start a head and `nodes - 1` more nodes of `cpus` CPUs each; this process's
    environment points Ray clients at the cluster's token meanwhile. Everything is killed
    and removed on exit."""
    if ray_binary() is None:
        raise RuntimeError("Ray is not installed (pip install 'imat[ray]')")
    folder = Path(tempfile.mkdtemp(prefix="imr-", dir="/tmp"))  # short: Ray's socket paths have a limit
    port = free_port()
    cluster = RayCluster(address=f"127.0.0.1:{port}", folder=folder, cpus=cpus)
    saved = {k: os.environ.get(k) for k in _auth(folder)}
    try:
        cluster.nodes.append(_start_node(["--head", "--port", str(port), "--include-dashboard=false"], cpus, folder))
        _wait_for_nodes(cluster.address, folder, 1)
        for _ in range(nodes - 1):
            cluster.add_node()
        os.environ.update(_auth(folder))  # this process and what it spawns are the cluster's clients
        yield cluster
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)
