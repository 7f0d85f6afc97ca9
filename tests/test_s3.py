"""Roots in an object store (`s3://bucket/prefix`), against a real S3 server (SeaweedFS on
127.0.0.1, see s3_server.py): the storage layer's guarantees, then the commands end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from s3_server import S3Server, s3_env, s3_server  # noqa: F401 - fixtures

from imatdata import s3, storage
from imatdata.errors import UserError
from imatdata.manifest import ShardWriter, list_shards, list_splits, read_table, resolve_root, write_table_atomic
from imatdata.s3 import S3Path

pytestmark = pytest.mark.timeout(240)


def _root(env: dict[str, str], prefix: str = "proj") -> S3Path:
    return S3Path(env["BUCKET"], prefix)


def _keys(server: S3Server, bucket: str) -> list[str]:
    from pyarrow import fs

    infos = server.admin_fs().get_file_info(fs.FileSelector(bucket, recursive=True, allow_not_found=True))
    return sorted(i.path.split("/", 1)[1] for i in infos if i.type == fs.FileType.File)


# --- the path type ---------------------------------------------------------------------------


def test_s3_path_is_a_pure_path_that_refuses_open() -> None:
    p = storage.location("s3://bucket/a/b/part-00001.parquet")
    assert isinstance(p, S3Path) and str(p) == "s3://bucket/a/b/part-00001.parquet"
    assert (p.name, p.stem, p.suffix) == ("part-00001.parquet", "part-00001", ".parquet")
    assert p.parent / "c" == S3Path("bucket", "a/b/c") and str(S3Path("bucket", "").parent) == "s3://bucket"
    assert p.with_name("x") == S3Path("bucket", "a/b/x") and storage.location("s3://bucket/a/") == S3Path("bucket", "a")
    with pytest.raises(TypeError, match="object-store location"):
        open(p, "rb")  # noqa: SIM115 - a leftover open() must fail loudly
    with pytest.raises(TypeError):
        Path(p)
    with pytest.raises(UserError, match="no bucket"):
        storage.location("s3://")
    with pytest.raises(UserError, match="only local folders and s3://"):
        storage.location("gs://bucket/x")
    assert storage.as_location("s3://b/k") == S3Path("b", "k") and storage.as_location("x") == Path("x")


# --- the storage layer on a real server ---------------------------------------------------------


def test_atomic_objects_small_and_large(s3_env: dict[str, str], s3_server: S3Server) -> None:
    root = _root(s3_env)
    small, big = root / "a" / "small.bin", root / "a" / "big.bin"
    storage.write_bytes_atomic(b"one", small)
    assert storage.read_bytes(small) == b"one" and storage.is_file(small) and storage.is_dir(root / "a")
    payload = os.urandom(s3.SMALL + 123_456)
    with storage.AtomicFile(big) as f:
        f.open().write(payload[:1000])
        f.open().write(payload[1000:])
        # Only an upload to a hidden temporary key is under way: no big.bin yet.
        assert storage.children(root / "a") == [small] and not storage.exists(big)
    assert storage.read_bytes(big) == payload and storage.size(big) == len(payload)
    assert _keys(s3_server, s3_env["BUCKET"]) == ["proj/a/big.bin", "proj/a/small.bin"]  # temporary gone
    # A failed write leaves the old object and no temporary, small or large.
    for target, data in ((small, b"x" * 10), (big, payload)):
        with pytest.raises(RuntimeError), storage.AtomicFile(target) as f:
            f.open().write(data)
            raise RuntimeError("killed")
    assert storage.read_bytes(small) == b"one" and storage.read_bytes(big) == payload
    assert _keys(s3_server, s3_env["BUCKET"]) == ["proj/a/big.bin", "proj/a/small.bin"]
    storage.replace(small, root / "a" / "moved.bin")
    assert [p.name for p in storage.children(root / "a")] == ["big.bin", "moved.bin"]
    storage.remove(root / "a" / "moved.bin")
    storage.remove(root / "a" / "absent")
    storage.remove_tree(root / "a")
    assert not storage.exists(root / "a") and storage.children(root / "a") == []


def test_parquet_shards_on_s3_are_whole_and_temps_are_swept(s3_env: dict[str, str], s3_server: S3Server) -> None:
    root = _root(s3_env)
    folder = root / "raw" / "train"
    table = pa.table({"id": [str(i) for i in range(300)], "image": [os.urandom(40_000) for _ in range(300)]})
    with ShardWriter(folder, schema=table.schema, shard_rows=200, row_group_rows=50) as w:
        w.write_batch(table)
    assert [p.name for p in list_shards(folder)] == ["part-00000.parquet", "part-00001.parquet"]
    assert read_table(folder).column("id").to_pylist() == table.column("id").to_pylist()
    assert list_splits(root / "raw") == ["train"]
    # What a killed writer could leave: a temporary key. Never listed as a shard, swept later.
    storage.write_bytes_atomic(b"half", folder / ".part-00002.parquet.999.tmp")
    assert [p.name for p in list_shards(folder)] == ["part-00000.parquet", "part-00001.parquet"]
    storage.remove_stale_temps(folder)
    assert not any(k.endswith(".tmp") for k in _keys(s3_server, s3_env["BUCKET"]))


def test_generations_replace_a_folder_whole(s3_env: dict[str, str], s3_server: S3Server) -> None:
    root = _root(s3_env)
    clean = root / "clean"
    with storage.new_generation(clean) as g:
        write_table_atomic(pa.table({"x": [1]}), g / "train" / "part-00000.parquet")
        write_table_atomic(pa.table({"x": [9]}), g / "dropped.parquet")
        assert list_splits(clean) == []  # nothing live until the block completes
    assert list_splits(clean) == ["train"] and read_table(clean / "train").column("x").to_pylist() == [1]
    assert [p.name for p in storage.children(clean)] == ["dropped.parquet", "train"]
    first = s3.current_generation(clean)
    # A failing build leaves the live generation as it was.
    with pytest.raises(RuntimeError), storage.new_generation(clean) as g:
        write_table_atomic(pa.table({"x": [2]}), g / "train" / "part-00000.parquet")
        raise RuntimeError("killed")
    assert s3.current_generation(clean, refresh=True) == first
    assert read_table(clean / "train").column("x").to_pylist() == [1]
    # A killed build (its generation left behind) is invisible, and swept by the next run.
    write_table_atomic(pa.table({"x": [3]}), clean / ".g-0000000000001-1" / "train" / "part-00000.parquet")
    assert read_table(clean / "train").column("x").to_pylist() == [1]
    storage.recover_generations(clean)
    assert not any(".g-0000000000001-1" in k for k in _keys(s3_server, s3_env["BUCKET"]))
    with storage.new_generation(clean) as g:
        write_table_atomic(pa.table({"x": [4]}), g / "train" / "part-00000.parquet")
    assert read_table(clean / "train").column("x").to_pylist() == [4]
    keys = _keys(s3_server, s3_env["BUCKET"])
    assert sum(k.endswith("part-00000.parquet") for k in keys) == 1 and first not in " ".join(keys)
    # Another process (a reader on another machine) sees the same live generation.
    out = subprocess.run([sys.executable, "-c", "from imatdata.manifest import read_table; from imatdata import storage;"
                          f"print(read_table(storage.location('{clean}/train')).column('x').to_pylist())"],
                         capture_output=True, text=True, env=os.environ | s3_env, timeout=60)
    assert out.stdout.strip() == "[4]", out.stderr


def test_run_lock_on_s3(s3_env: dict[str, str], s3_server: S3Server, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = _root(s3_env)
    with storage.RunLock(root, "busy here"):
        assert storage.is_file(root / ".imat.lock")
        with pytest.raises(UserError, match="busy here"):
            with storage.RunLock(root, "busy here"):
                pass
        # A second machine (another host name in a fresh lock object) is refused too.
    assert not storage.exists(root / ".imat.lock")
    storage.write_bytes_atomic(b'{"host": "other-machine", "pid": 1, "token": "t"}', root / ".imat.lock")
    with pytest.raises(UserError, match="busy there.*other-machine"):
        with storage.RunLock(root, "busy there"):
            pass
    # The same host's lock object left by a dead process is taken over at once.
    storage.write_bytes_atomic(('{"host": "%s", "pid": 1, "token": "t"}' % os.uname().nodename).encode(),
                               root / ".imat.lock")
    with storage.RunLock(root, "busy"):
        pass


def test_errors_are_one_line(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="bucket 'no-such-bucket-here' does not exist"):
        resolve_root("s3://no-such-bucket-here/x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    s3.reset()
    with pytest.raises(UserError, match="access denied") as e:
        resolve_root(f"s3://{s3_env['BUCKET']}/x")
    assert "wrong" not in str(e.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env["AWS_SECRET_ACCESS_KEY"])
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("IMAT_S3_CONNECT_TIMEOUT", "1")
    s3.reset()
    with pytest.raises(UserError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{port}"):
        resolve_root(f"s3://{s3_env['BUCKET']}/x")


# --- the commands, end to end ---------------------------------------------------------------------


def _imatdata(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    script = str(Path(sys.executable).with_name("imatdata"))
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=180, cwd=cwd,
                          env=os.environ | env)


def test_demo_fetch_clean_stats_on_s3(s3_env: dict[str, str], s3_server: S3Server, demo_catalogue, tmp_path: Path) -> None:
    from imatsample import serve_in_thread, write_lists

    work = tmp_path / "cwd"
    work.mkdir()
    root = f"s3://{s3_env['BUCKET']}/demo"
    with serve_in_thread(demo_catalogue) as srv:
        lists = write_lists(demo_catalogue, srv, tmp_path / "lists")
        fetched = _imatdata(["fetch", *map(str, lists.values()), "--allow-private", "--quiet", "--loops", "2",
                             "--workers", "2"],  # two loop processes, each journaling to S3
                            s3_env | {"IMAT_ROOT": root}, work)  # IMAT_ROOT works as --root does
        assert fetched.returncode == 0, fetched.stderr
    cleaned = _imatdata(["clean", "--root", root, "--quiet", "--workers", "1"], s3_env, work)
    assert cleaned.returncode == 0, cleaned.stderr
    described = _imatdata(["stats", "--root", root, "--json"], s3_env, work)
    assert described.returncode == 0, described.stderr
    import json

    data = json.loads(described.stdout)
    assert data["stage"] == "clean" and data["root"] == root
    raw = read_table(storage.location(root) / "raw", columns=["split", "status"])
    assert data["splits"]["train"]["records"] == raw.column("split").to_pylist().count("train") > 400
    assert list(work.iterdir()) == []  # nothing was made on local disk
    keys = _keys(s3_server, s3_env["BUCKET"])
    assert "demo/stats/stats.json" in keys and "demo/raw/fetch_summary.json" in keys
    assert not any(k.endswith(".tmp") or "/.journal/" in k or k.endswith(".lock") for k in keys), keys
    clean = storage.location(root) / "clean"
    assert sum(read_table(clean / s, columns=["id"]).num_rows for s in list_splits(clean)) + \
        read_table([clean / "dropped.parquet"], columns=["id"]).num_rows == raw.num_rows
    assert raw.column("status").to_pylist().count("ok") > 500


def test_kill_9_mid_fetch_to_s3_then_rerun_keeps_one_row_per_record(s3_env: dict[str, str], s3_server: S3Server,
                                                                    tmp_path: Path) -> None:
    from imatsample import big_catalogue, serve_in_thread, write_lists
    from test_fetch import fetch_lib, kill_fetch, spawn_fetch, wait_while_running

    from imatdata.fetch import journal_files
    from imatdata.manifest import split_dir

    n = 600
    cat = big_catalogue(n, n_bodies=8, size=24)
    root = storage.location(f"s3://{s3_env['BUCKET']}/k")
    with serve_in_thread(cat) as srv:
        src = write_lists(cat, srv, tmp_path)["train"]
        proc = spawn_fetch(src, root, workers=1, pending=8, journal_rows=8, journal_seconds=0.05, shard_rows=40,
                           seal_seconds=0.01)
        folder = split_dir(root, "raw", "train")
        wait_while_running(proc, lambda: len(list_shards(folder)) >= 2, timeout=90)
        kill_fetch(proc)
        stored = set()
        for path in list_shards(folder) + journal_files(root, "train"):
            stored.update(read_table([path], columns=["id"]).column("id").to_pylist())
        assert 0 < len(stored) < n
        before = srv.total_requests
        fetch_lib([src], root, shard_rows=40)
        second_run = srv.total_requests - before
    got = read_table(folder).column("id").to_pylist()
    assert len(got) == n and len(set(got)) == n
    assert second_run == n - len(stored), "every stored row was kept, every lost one fetched again"
    assert journal_files(root, "train") == []
    assert not any(k.endswith(".tmp") for k in _keys(s3_server, s3_env["BUCKET"]))


KILLABLE_CLEAN = """
import pathlib, sys, time
from imatdata import clean as clean_mod
from imatdata.cli import main

started = pathlib.Path(sys.argv[1])
real = clean_mod.write_table_atomic

def slow(*args, **kwargs):  # clean/<split> shards are written by now; dropped.parquet is next
    started.write_text("writing")
    time.sleep(60)
    return real(*args, **kwargs)

clean_mod.write_table_atomic = slow
sys.argv = ["imatdata", *sys.argv[2:]]
main()
"""


def test_kill_9_during_clean_on_s3_leaves_the_old_clean_then_rerun(s3_env: dict[str, str], s3_server: S3Server,
                                                                    tmp_path: Path) -> None:
    import time

    from imatsample.shards import jpeg, manifest_row
    from test_clean import picture

    root = storage.location(f"s3://{s3_env['BUCKET']}/c")
    rows = [manifest_row(f"r{i}", "train", i % 3, jpeg(picture(i))) for i in range(24)]
    from imatdata.manifest import RAW_SCHEMA

    write_table_atomic(pa.Table.from_pylist(rows, schema=RAW_SCHEMA), root / "raw" / "train" / "part-00000.parquet")
    first = _imatdata(["clean", "--root", str(root), "--quiet", "--workers", "1"], s3_env, tmp_path)
    assert first.returncode == 0, first.stderr
    clean = root / "clean"
    before = sorted(read_table(clean / "train", columns=["id"]).column("id").to_pylist())
    generation = s3.current_generation(clean, refresh=True)
    # A second clean, with fewer raw rows, killed while its new clean/ is half-written.
    write_table_atomic(pa.Table.from_pylist(rows[:10], schema=RAW_SCHEMA), root / "raw" / "train" / "part-00000.parquet")
    script, started = tmp_path / "killable.py", tmp_path / "started"
    script.write_text(KILLABLE_CLEAN)
    proc = subprocess.Popen([sys.executable, str(script), str(started), "clean", "--root", str(root), "--quiet",
                             "--workers", "1"], env=os.environ | s3_env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not started.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    keys = _keys(s3_server, s3_env["BUCKET"])
    assert sum("/clean/.g-" in k and k.endswith("part-00000.parquet") for k in keys) == 2  # the new one, unused
    assert s3.current_generation(clean, refresh=True) == generation
    assert sorted(read_table(clean / "train", columns=["id"]).column("id").to_pylist()) == before
    rerun = _imatdata(["clean", "--root", str(root), "--quiet", "--workers", "1"], s3_env, tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert s3.current_generation(clean, refresh=True) != generation
    kept = read_table(clean / "train", columns=["id"]).num_rows
    dropped = read_table([clean / "dropped.parquet"], columns=["id"]).num_rows
    assert kept + dropped == 10
    keys = _keys(s3_server, s3_env["BUCKET"])
    assert sum(k.endswith("part-00000.parquet") and "/clean/" in k for k in keys) == 1  # the leftover went
    assert not any(k.endswith(".lock") for k in keys)


@pytest.mark.parametrize("fault", ["wrong credentials", "missing bucket", "unreachable endpoint"])
def test_cli_errors_on_s3_are_one_line_and_write_nothing(s3_env: dict[str, str], s3_server: S3Server, tmp_path: Path,
                                                        fault: str) -> None:
    import socket

    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.json").write_text('{"images": [{"imageId": "1", "url": "http://127.0.0.1:9/1.jpg"}], '
                                      '"annotations": [{"imageId": "1", "labelId": "3"}]}')
    env, bucket = dict(s3_env), s3_env["BUCKET"]
    if fault == "wrong credentials":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif fault == "missing bucket":
        bucket = "no-such-bucket"
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{s.getsockname()[1]}"
        env["IMAT_S3_CONNECT_TIMEOUT"] = "1"
    expected = {"wrong credentials": "access denied", "missing bucket": "bucket 'no-such-bucket' does not exist",
                "unreachable endpoint": "cannot reach the S3 endpoint"}[fault]
    for args in (["fetch", str(lists / "train.json"), "--allow-private"], ["clean"], ["stats"]):
        proc = _imatdata([*args, "--root", f"s3://{bucket}/x"], env, tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert expected in proc.stderr and "not-the-secret" not in proc.stderr, proc.stderr
    assert _keys(s3_server, s3_env["BUCKET"]) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lists"]


# --- the trainer ---------------------------------------------------------------------------------


def _upload_clean(local: Path, root: S3Path) -> S3Path:
    """A local clean/ folder as the live generation of root/clean on S3."""
    clean = root / "clean"
    with storage.new_generation(clean) as generation:
        for path in sorted(local.rglob("*.parquet")):
            storage.write_bytes_atomic(path.read_bytes(), generation.joinpath(*path.relative_to(local).parts))
    return clean


def test_train_from_s3_resume_from_s3_and_predict_from_an_s3_checkpoint(s3_env: dict[str, str], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from train_shards import make_dataset
    from typer.testing import CliRunner

    from imattrain.checkpoint import load_checkpoint
    from imattrain.cli import app

    torch.set_num_threads(1)
    local = make_dataset(tmp_path / "clean", train_per_class=8, val_per_class=3, corrupt=1)
    clean = _upload_clean(local, _root(s3_env))
    runner = CliRunner()

    def imattrain(*args: str) -> str:
        result = runner.invoke(app, list(args))
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code == 0, result.output
        return result.output

    common = ["run", "--quiet", "--image-size", "32", "--threads", "1", "--model", "mobilenet_v3_small",
              "--epochs", "1", "--batch-size", "8", "--workers", "2", "--lr", "0.01"]
    imattrain(*common, "--data", str(local), "--out", str(tmp_path / "local-run"))
    out = f"{_root(s3_env)}/runs/x"
    imattrain(*common, "--data", str(clean), "--out", out, "--max-steps", "3")  # stopped mid-epoch ...
    stopped = load_checkpoint(f"{out}/checkpoints/last.pt")
    assert stopped["step"] == 3
    imattrain(*common, "--data", str(clean), "--out", out, "--resume")  # ... and resumed from S3
    a, b = load_checkpoint(tmp_path / "local-run" / "checkpoints" / "last.pt"), load_checkpoint(f"{out}/checkpoints/last.pt")
    assert a["step"] == b["step"] > 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key  # the same rows, in the same order, from S3
    run = storage.location(out)
    assert [m["epoch"] for m in map(__import__("json").loads,
                                    storage.read_bytes(run / "metrics.jsonl").decode().splitlines())] == [1]
    assert storage.is_file(run / "config.toml") and storage.is_file(run / "checkpoints" / "best.pt")
    # predict and eval from the S3 checkpoint, the submission written to S3 too.
    sub = f"{_root(s3_env)}/sub.csv"
    imattrain("predict", "--data", str(clean), "--checkpoint", out, "--split", "val", "--out", sub)
    lines = storage.read_bytes(storage.location(sub)).decode().splitlines()
    assert lines[0] == "id,predicted" and len(lines) == 1 + read_table(clean / "val", columns=["id"]).num_rows
    report = imattrain("eval", "--data", str(clean), "--checkpoint", f"{out}/checkpoints/best.pt")
    assert "top-3" in report
    # lr-find from S3 data, its plot and curve written to S3.
    imattrain("lr-find", "--quiet", "--image-size", "32", "--threads", "1", "--model", "mobilenet_v3_small",
              "--batch-size", "8", "--workers", "0", "--data", str(clean), "--out", f"{_root(s3_env)}/lr", "--steps", "4")
    assert storage.is_file(_root(s3_env) / "lr" / "lr_find.png") and storage.is_file(_root(s3_env) / "lr" / "lr_find.json")
    # An output inside the data folder is refused on S3 as on disk.
    result = runner.invoke(app, ["predict", "--data", str(clean), "--checkpoint", out, "--split", "val",
                                 "--out", f"{clean}/x.csv"])
    assert result.exit_code == 2 and "inside the data folder" in result.output
