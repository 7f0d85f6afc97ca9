"""The storage seam: files appear whole or not at all, temporaries are never listed, URLs
are refused in one line rather than read as folders."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from imatdata import storage
from imatdata.errors import UserError
from imatdata.manifest import resolve_root, write_table_atomic


def test_atomic_file_appears_only_when_committed(tmp_path: Path) -> None:
    final = tmp_path / "deep" / "out.bin"
    final.parent.mkdir()
    final.write_bytes(b"old")
    with storage.AtomicFile(final) as f, f.open() as fh:
        fh.write(b"new")
        assert final.read_bytes() == b"old"  # readers still see the old file
        assert [p.name for p in storage.children(final.parent)] == [f".out.bin.{os.getpid()}.tmp", "out.bin"]
    assert final.read_bytes() == b"new"
    assert storage.children(final.parent) == [final]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    final = tmp_path / "out.bin"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with storage.AtomicFile(final) as f, f.open() as fh:
            fh.write(b"half")
            raise RuntimeError("killed")
    assert final.read_bytes() == b"old"
    assert storage.children(tmp_path) == [final]


def test_write_bytes_atomic_makes_folders_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c.json"
    storage.write_bytes_atomic(b"1", target)
    storage.write_bytes_atomic(b"2", target)
    assert target.read_bytes() == b"2"
    assert storage.children(target.parent) == [target]
    write_table_atomic(pa.table({"x": [1, 2]}), tmp_path / "t.parquet")
    with storage.parquet_file(tmp_path / "t.parquet") as f:
        assert f.read().column("x").to_pylist() == [1, 2]


def test_stale_temporaries_are_swept_and_finished_files_kept(tmp_path: Path) -> None:
    keep = [tmp_path / "part-00000.parquet", tmp_path / ".hidden-but-not-temp"]
    stale = [tmp_path / ".part-00001.parquet.123.tmp", tmp_path / ".x.tmp"]
    for p in keep + stale:
        p.write_bytes(b"x")
    storage.remove_stale_temps(tmp_path)
    assert storage.children(tmp_path) == sorted(keep)
    storage.remove_stale_temps(tmp_path / "missing")  # nothing to sweep is fine
    assert storage.children(tmp_path / "missing") == []


def test_replace_and_remove_tree(tmp_path: Path) -> None:
    staging, final = tmp_path / "staging", tmp_path / "final"
    staging.mkdir()
    (staging / "f").write_bytes(b"x")
    storage.replace(staging, final)
    assert storage.is_dir(final) and not storage.exists(staging)
    storage.remove_tree(final)
    storage.remove_tree(final)  # twice is fine
    assert not storage.exists(final)


@pytest.mark.parametrize("text", ["gs://b/p", "https://host/x"])
def test_urls_are_refused_in_one_line_not_made_into_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             text: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^--root .*: only local folders and s3://bucket/prefix are supported"):
        resolve_root(text)
    monkeypatch.setenv("IMAT_ROOT", text)
    with pytest.raises(UserError, match=r"^IMAT_ROOT .*: only local folders and s3://bucket/prefix are supported"):
        resolve_root(None)
    assert list(tmp_path.iterdir()) == []
    assert storage.location("relative/s3:/x") == Path("relative/s3:/x")  # only a scheme at the start
    assert isinstance(storage.location("s3://bucket/prefix"), storage.S3Path)


def test_cli_s3_root_at_an_unreachable_endpoint_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_EC2_METADATA_DISABLED": "true", "IMAT_S3_CONNECT_TIMEOUT": "1"}
    script = str(Path(sys.executable).with_name("imatdata"))
    proc = subprocess.run([script, "stats", "--root", "s3://bucket/prefix"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"cannot reach the S3 endpoint http://127.0.0.1:{port}" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_lock_file_is_released_when_the_holder_is_killed(tmp_path: Path) -> None:
    lock = tmp_path / "raw" / ".fetch.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from imatdata.storage import RunLock
        with RunLock(Path({str(lock)!r}), "busy"):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="busy"):
            with storage.RunLock(lock, "busy"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with storage.RunLock(lock, "busy"):  # kill -9 released it: no stale lock
        pass
