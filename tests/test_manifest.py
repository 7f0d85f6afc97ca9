"""The manifest schema and its atomic sharded IO."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from imatsample.shards import manifest_row

from imatdata import manifest as m
from imatdata import storage

# The SPEC's column table, restated here so the test fails if either side drifts.
SPEC_COLUMNS = {
    "id": pa.string(),
    "split": pa.string(),
    "label": pa.int32(),
    "url": pa.string(),
    "status": pa.string(),
    "error": pa.string(),
    "http_status": pa.int16(),
    "attempts": pa.int8(),
    "image": pa.binary(),
    "image_format": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "orig_width": pa.int32(),
    "orig_height": pa.int32(),
    "orig_bytes": pa.int64(),
    "sha256": pa.string(),
    "fetched_at": pa.timestamp("ms", tz="UTC"),
}

SPEC_PATH = Path(__file__).resolve().parents[2] / "shared" / "SPEC.md"


def _row(i: int, split: str = "train", image: bytes | None = b"\xff\xd8jpeg") -> dict:
    return manifest_row(f"{i:032x}.jpg", split, i % 7, image, url=f"http://127.0.0.1/{i}.jpg?w=750",
                        size=(10, 12), orig=(20, 24), orig_bytes=1234, sha256=True,
                        fetched_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))


def test_raw_schema_matches_spec_column_for_column() -> None:
    assert [f.name for f in m.RAW_SCHEMA] == list(SPEC_COLUMNS)
    for f in m.RAW_SCHEMA:
        assert f.type == SPEC_COLUMNS[f.name], f.name
    assert m.CLEAN_SCHEMA.names == m.RAW_SCHEMA.names + ["phash"]
    assert m.CLEAN_SCHEMA.field("phash").type == pa.int64()
    assert m.DROPPED_SCHEMA.names == ["id", "split", "label", "url", "reason", "detail"]


@pytest.mark.skipif(not SPEC_PATH.exists(), reason="shared/SPEC.md not beside the checkout")
def test_schema_matches_the_spec_document() -> None:
    text = SPEC_PATH.read_text()
    table = text.split("## Manifest columns")[1].split("`clean` adds")[0]
    names: list[str] = []
    for line in table.splitlines():
        cell = re.match(r"\|\s*([a-z0-9_, ]+?)\s*\|", line)
        if cell and cell.group(1) not in ("column",):
            names += [n.strip() for n in cell.group(1).split(",")]
    assert names == m.RAW_SCHEMA.names
    statuses = re.search(r"\| status \| string \| ([^|]+)\|", text).group(1)
    assert [s.strip() for s in statuses.split(",")] == list(m.STATUSES)
    listed = re.search(r"`reason` one of ([^\n(]+)", text.replace("\n", " ")).group(1)
    reasons = [r.strip() for r in listed.split(",")]
    # Reasons the SPEC names elsewhere, e.g. audit's "(reason `label_noise`)", come after.
    reasons += [r for r in re.findall(r"reason `([a-z_]+)`", text) if r not in reasons]
    assert reasons == list(m.DROP_REASONS)


def test_round_trip_through_writer_and_reader(tmp_path: Path) -> None:
    rows = [_row(i) for i in range(25)] + [_row(100, image=None)]
    folder = tmp_path / "raw" / "train"
    with m.ShardWriter(folder, shard_rows=10, row_group_rows=4) as w:
        w.write_rows(rows[:13])
        w.write_rows(rows[13:])
    shards = m.list_shards(folder)
    assert [p.name for p in shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = m.read_table(folder)
    assert table.schema == m.RAW_SCHEMA
    assert table.to_pylist() == rows
    # row groups are the reader's unit of work and respect the row cap
    refs = m.row_groups(folder)
    assert sum(r.num_rows for r in refs) == 26
    assert max(r.num_rows for r in refs) <= 4
    assert m.read_row_group(refs[0], ["id"]).column("id").to_pylist() == [r["id"] for r in rows[:4]]
    # filters and column selection are pushed into the scan
    ok = m.read_table(folder, columns=["id", "status"], filter=m.col("status") == "ok")
    assert ok.num_rows == 25 and ok.column_names == ["id", "status"]
    # a stage folder reads all of its splits
    assert m.list_splits(tmp_path / "raw") == ["train"]
    assert m.read_table(tmp_path / "raw", columns=["id"]).num_rows == 26


def test_row_groups_split_by_bytes(tmp_path: Path) -> None:
    big = b"x" * 300_000
    with m.ShardWriter(tmp_path, row_group_rows=1000, row_group_bytes=1_000_000) as w:
        w.write_rows([_row(i, image=big) for i in range(10)])
    meta = pq.ParquetFile(m.list_shards(tmp_path)[0]).metadata
    assert meta.num_row_groups >= 3
    assert all(meta.row_group(i).num_rows <= 4 for i in range(meta.num_row_groups))


def test_missing_nullable_columns_become_null_and_required_ones_fail(tmp_path: Path) -> None:
    with m.ShardWriter(tmp_path) as w:
        w.write_batch(pa.record_batch({"id": ["a"], "split": ["test"], "status": ["invalid"]}))
    t = m.read_table(tmp_path)
    assert t.column("label").to_pylist() == [None] and t.column("image").to_pylist() == [None]
    with pytest.raises(ValueError, match="status"):
        with m.ShardWriter(tmp_path / "x") as w:
            w.write_batch(pa.record_batch({"id": ["a"], "split": ["test"]}))
    assert m.list_shards(tmp_path / "x") == []


def test_missing_manifest_is_a_user_error(tmp_path: Path) -> None:
    from imatdata.errors import UserError

    with pytest.raises(UserError, match="no manifest shards"):
        m.read_table(tmp_path / "raw")


def test_resolve_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("IMAT_ROOT", raising=False)
    assert m.resolve_root(None) == Path("manifests")
    monkeypatch.setenv("IMAT_ROOT", str(tmp_path))
    assert m.resolve_root(None) == tmp_path
    assert m.resolve_root("other") == Path("other")


def test_killed_writer_leaves_no_partial_shard(tmp_path: Path) -> None:
    """kill -9 a writer in the middle of its second shard: shard 0 intact, no part-00001."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from tests.test_manifest import _row
        from imatdata import manifest as m
        w = m.ShardWriter({str(tmp_path)!r}, shard_rows=8, row_group_rows=4)
        w.write_rows([_row(i) for i in range(8)])     # completes shard 0
        w.write_rows([_row(i) for i in range(8, 12)])  # one row group into shard 1
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, getattr(signal, "SIGKILL", signal.SIGTERM))
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert [p.name for p in m.list_shards(tmp_path)] == ["part-00000.parquet"]
    assert m.read_table(tmp_path).column("id").to_pylist() == [f"{i:032x}.jpg" for i in range(8)]
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the unfinished shard should have been under a temporary name"
    storage.remove_stale_temps(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["part-00000.parquet"]


def test_imatdata_runs_without_torch(tmp_path: Path) -> None:
    """Every imatdata module imports, and the CLI's --help works, with torch unimportable."""
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "timm"):
                    raise ImportError(f"{name} is not installed")
        sys.meta_path.insert(0, NoTorch())
        import imatdata
        for mod in pkgutil.walk_packages(imatdata.__path__, "imatdata."):
            if mod.name not in ("imatdata.__main__",):
                importlib.import_module(mod.name)
        from imatdata.cli import app
        from typer.testing import CliRunner
        for args in (["--help"], ["fetch", "--help"], ["clean", "--help"], ["stats", "--help"]):
            res = CliRunner().invoke(app, args)
            assert res.exit_code == 0, (args, res.output)
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


# --- the root, checked before anything is written (issue #14) ------------------------------------


def test_resolve_root_refuses_files_and_unwritable_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(m.UserError, match=r"root .*afile is a file, not a folder"):
        m.resolve_root(afile)
    with pytest.raises(m.UserError, match=r"root .*afile/sub lies under .*afile, which is a file"):
        m.resolve_root(afile / "sub")
    monkeypatch.setenv("IMAT_ROOT", str(afile))
    with pytest.raises(m.UserError, match="is a file"):
        m.resolve_root(None)
    assert m.resolve_root(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"  # made later
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr("imatdata.storage.can_write", lambda folder: False)
    with pytest.raises(m.UserError, match=r"cannot write there \(it would be made in .*\)"):
        m.resolve_root(tmp_path / "new")
    assert m.resolve_root(tmp_path, writable=False) == tmp_path  # readers only need it to exist


def unprivileged() -> list[str]:
    """A command prefix without the right to write where permissions say no (root has it)."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    try:
        subprocess.run([*prefix, "true"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("running as root without setpriv: cannot test permission errors")
    return prefix


def test_bad_roots_are_one_line_and_write_nothing_for_every_command(tmp_path: Path) -> None:
    script = str(Path(sys.executable).with_name("imatdata"))
    source = tmp_path / "train.json"
    source.write_text('{"images": [{"id": "a", "url": "http://example.com/a.jpg", "class": 1}]}')
    afile = tmp_path / "afile"
    afile.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    cases = [([], afile, "is a file, not a folder"), ([], afile / "sub", "which is a file, not a folder"),
             (unprivileged(), locked / "root", "cannot write there"), (unprivileged(), locked, "cannot write there")]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    try:
        for command in (["fetch", str(source)], ["clean"], ["stats"]):
            for prefix, root, says in cases:
                proc = subprocess.run([*prefix, script, *command, "--root", str(root)], capture_output=True,
                                      text=True, timeout=120, cwd=tmp_path)
                assert proc.returncode == 2, (command, root, proc.stderr)
                assert proc.stderr.count("\n") == 1 and says in proc.stderr, (command, root, proc.stderr)
                assert proc.stdout == ""
    finally:
        locked.chmod(0o755)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert afile.read_text() == "x"


def test_run_lock_excludes_another_process_and_leaves_nothing(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        from pathlib import Path
        from imatdata.errors import UserError
        from imatdata.storage import RunLock
        try:
            with RunLock(Path({str(tmp_path)!r}), "busy here"):
                print("got it")
        except UserError as exc:
            print(exc)
    """)
    with storage.RunLock(tmp_path, "busy"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "busy here"
        with pytest.raises(m.UserError, match="busy"):  # even from this process: flock is per open file
            with storage.RunLock(tmp_path, "busy"):
                pass
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "got it"
    assert list(tmp_path.iterdir()) == []  # a folder is locked in place
    with storage.RunLock(tmp_path / "raw" / ".some.lock", "busy"):
        assert (tmp_path / "raw" / ".some.lock").is_file()
