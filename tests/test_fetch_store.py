"""The fetch store: journal rows sealed into raw shards during a run, and the final settle.

Real Parquet files throughout; the end-to-end tests run a real fetch against the sample
server, one of them killed with SIGKILL while shards are being sealed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from imatdata.fetch import store
from imatdata.fetch import _write_journal_file, base_row, finalize_split, journal_dir, journal_files, seal_journal
from imatdata.manifest import RAW_SCHEMA, ShardWriter, list_shards, read_table, split_dir
from imatsample import big_catalogue, serve_in_thread, write_lists
from imatdata.fetch.sources import Record, invalid_key, record_key

from test_fetch import fetch_lib, kill_fetch, spawn_fetch, wait_while_running

SPLIT = "train"


def _row(i: int, status: str = "ok", invalid: bool = False) -> dict:
    rid = f"id{i:04d}"
    key = invalid_key(SPLIT, "train.json", i) if invalid else record_key(SPLIT, rid)
    row = base_row(SPLIT, Record(i, rid, f"http://h/{i}.jpg", i % 7), key)
    row.update(status="invalid" if invalid else status, error="bad class" if invalid else None, attempts=1)
    if status == "ok" and not invalid:
        row.update(image=b"\xff\xd8\xff" + bytes([i % 256]) * 10, image_format="jpeg", width=8, height=8)
    return row


def _journal(root: Path, name: str, rows: list[dict]) -> Path:
    path = journal_dir(root, SPLIT) / f"j-{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_journal_file(rows, path)
    return path


def _shard_rows(root: Path) -> list[list[str]]:
    return [pq.read_table(p, columns=["id"]).column("id").to_pylist() for p in list_shards(split_dir(root, "raw", SPLIT))]


def _wanted(rows: list[dict]) -> np.ndarray:
    return np.sort(np.array([r["_key"] for r in rows], dtype=np.uint64))


def test_seal_takes_the_oldest_full_shard_and_keeps_invalid_rows_resumable(tmp_path: Path) -> None:
    first = [_row(i) for i in range(10)]
    second = [_row(i) for i in range(10, 18)] + [_row(i, invalid=True) for i in (18, 19)]
    third = [_row(i) for i in range(20, 25)]
    _journal(tmp_path, "1-00000001", first)
    _journal(tmp_path, "1-00000002", second)
    _journal(tmp_path, "1-00000003", third)

    shard = seal_journal(tmp_path, SPLIT, shard_rows=20)
    assert shard is not None and shard.name == "part-00000.parquet"
    assert _shard_rows(tmp_path) == [[f"id{i:04d}" for i in range(18)]]  # the invalid rows stay out
    left = journal_files(tmp_path, SPLIT)
    assert [p.name for p in left] == ["j-1-00000002-i.parquet", "j-1-00000003.parquet"]
    carried = pq.read_table(left[0])
    assert carried.column("status").to_pylist() == ["invalid", "invalid"]
    assert carried.column("_key").to_pylist() == [r["_key"] for r in second[-2:]]
    # Seven rows wait now: not a full shard, so nothing moves.
    assert seal_journal(tmp_path, SPLIT, shard_rows=20) is None

    sealed = split_dir(tmp_path, "raw", SPLIT) / "part-00000.parquet"
    inode = sealed.stat().st_ino
    counts, paths, stale = finalize_split(tmp_path, SPLIT, _wanted(first + second + third), shard_rows=20)
    assert counts == {"ok": 23, "invalid": 2, "records": 25} and stale == 0
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet"]
    assert sealed.stat().st_ino == inode, "a shard whose rows all stay is not rewritten"
    assert sorted(read_table(split_dir(tmp_path, "raw", SPLIT)).column("id").to_pylist()) == \
        sorted(r["id"] for r in first + second + third)
    assert journal_files(tmp_path, SPLIT) == []


def test_settle_rewrites_only_shards_with_superseded_or_unlisted_rows(tmp_path: Path) -> None:
    folder = split_dir(tmp_path, "raw", SPLIT)
    old = [_row(i, status="timeout" if i == 15 or i >= 20 else "ok") for i in range(30)]
    with ShardWriter(folder, RAW_SCHEMA, shard_rows=10) as writer:
        writer.write_rows([{k: v for k, v in r.items() if k != "_key"} for r in old])
    inodes = [p.stat().st_ino for p in list_shards(folder)]
    assert len(inodes) == 3
    # A later run retried 15 and 20..29; 29 is no longer in the input.
    newer = [_row(15)] + [_row(i) for i in range(20, 30)]
    _journal(tmp_path, "2-00000001", newer)
    wanted = _wanted([r for r in old if r["id"] != "id0029"])

    counts, paths, stale = finalize_split(tmp_path, SPLIT, wanted, shard_rows=10)
    assert counts == {"ok": 29, "records": 29} and stale == 1
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert paths[0].stat().st_ino == inodes[0], "untouched shard kept as it was"
    ids = _shard_rows(tmp_path)
    assert ids[0] == [f"id{i:04d}" for i in range(10)]
    assert ids[1] == [f"id{i:04d}" for i in range(10, 20) if i != 15]  # rewritten without its old 15
    assert ids[2] == ["id0015"] + [f"id{i:04d}" for i in range(20, 29)]  # shard 2 was all superseded
    assert set(read_table(folder).column("status").to_pylist()) == {"ok"}
    assert journal_files(tmp_path, SPLIT) == [] and not any(p.name.startswith(".") for p in folder.iterdir())
    # Settled already: a second settle writes nothing.
    stamps = [p.stat().st_mtime_ns for p in paths]
    finalize_split(tmp_path, SPLIT, wanted, shard_rows=10)
    assert [p.stat().st_mtime_ns for p in list_shards(folder)] == stamps


def test_a_run_seals_shards_as_it_goes(tmp_path: Path, monkeypatch) -> None:
    sealed: list[Path] = []
    real = store.seal_journal

    def spy(*args, **kwargs):
        shard = real(*args, **kwargs)
        if shard is not None:
            sealed.append(shard)
        return shard

    monkeypatch.setattr(store, "seal_journal", spy)
    n = 300
    cat = big_catalogue(n, n_bodies=8, size=24)
    with serve_in_thread(cat) as srv:
        src = write_lists(cat, srv, tmp_path)["train"]
        summary = fetch_lib([src], tmp_path / "m", shard_rows=64, journal_rows=8, journal_seconds=0.05,
                            seal_seconds=0.02, pending=4)
    assert sealed, "no shard was sealed during the run"
    ids = _shard_rows(tmp_path / "m")
    assert sum(map(len, ids)) == n and len({i for part in ids for i in part}) == n
    assert all(len(part) <= 64 for part in ids)
    assert summary.splits["train"] == {"ok": n, "records": n}
    assert [Path(p).name for p in summary.shards["train"]] == [f"part-{i:05d}.parquet" for i in range(len(ids))]
    assert journal_files(tmp_path / "m", SPLIT) == []


def test_kill_9_while_sealing_then_rerun_keeps_one_row_per_record(tmp_path: Path) -> None:
    n = 800
    cat = big_catalogue(n, n_bodies=8, size=24)
    root = tmp_path / "m"
    with serve_in_thread(cat) as srv:
        src = write_lists(cat, srv, tmp_path)["train"]
        proc = spawn_fetch(src, root, workers=1, pending=8, journal_rows=8, journal_seconds=0.05, shard_rows=40,
                           seal_seconds=0.01)
        folder = split_dir(root, "raw", SPLIT)
        wait_while_running(proc, lambda: len(list_shards(folder)) >= 3)
        kill_fetch(proc)
        stored = set()
        for path in list_shards(folder) + journal_files(root, SPLIT):
            stored.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
        assert 0 < len(stored) < n
        before = srv.total_requests
        fetch_lib([src], root, shard_rows=40)
        second_run = srv.total_requests - before
    got = read_table(folder).column("id").to_pylist()
    assert len(got) == n and len(set(got)) == n
    assert second_run == n - len(stored), "every stored row was kept, every lost one fetched again"
    assert journal_files(root, SPLIT) == []


def test_a_journal_file_larger_than_a_shard_is_sealed_behind_carried_invalid_rows(tmp_path: Path) -> None:
    _journal(tmp_path, "1-00000001-i", [_row(i, invalid=True) for i in range(3)])
    _journal(tmp_path, "1-00000002", [_row(i) for i in range(3, 33)])
    _journal(tmp_path, "1-00000003", [_row(i) for i in range(33, 36)])
    shard = seal_journal(tmp_path, SPLIT, shard_rows=20)
    assert shard is not None and pq.read_metadata(shard).num_rows == 30
    assert [p.name for p in journal_files(tmp_path, SPLIT)] == ["j-1-00000002-i.parquet", "j-1-00000003.parquet"]
    assert pq.read_metadata(journal_files(tmp_path, SPLIT)[0]).num_rows == 3


def test_a_seal_after_a_crash_between_carry_and_cleanup_keeps_the_invalid_rows(tmp_path: Path) -> None:
    # A crash left both a journal file and the carry made from it (its invalid rows twice).
    _journal(tmp_path, "1-00000001-i", [_row(0, invalid=True)])
    _journal(tmp_path, "1-00000001", [_row(0, invalid=True)] + [_row(i) for i in range(1, 12)])
    _journal(tmp_path, "1-00000002", [_row(i) for i in range(12, 24)])
    assert seal_journal(tmp_path, SPLIT, shard_rows=15) is not None
    left = journal_files(tmp_path, SPLIT)
    assert [p.name for p in left] == ["j-1-00000001-i.parquet", "j-1-00000002.parquet"]
    assert pq.read_table(left[0]).column("id").to_pylist() == ["id0000", "id0000"]


async def test_journal_window_units_come_back_once_rows_are_on_disk(tmp_path: Path) -> None:
    journal = store.Journal(tmp_path, flush_rows=100, flush_seconds=60.0, window_size=3, window_rows=2)
    for _ in range(3):
        await journal.window.acquire()
    journal.add(SPLIT, _row(0), saving=True)
    assert journal.window.locked() and not journal.due()  # one row waits: not worth a file yet
    journal.add(SPLIT, _row(1), saving=True)
    journal.add(SPLIT, _row(2))  # an input-invalid row, say: it holds no unit
    assert journal.pressed() and journal.due()
    await journal.flush(only_if_due=True)
    assert journal.window._value == 2 and journal.rows_written == 3 and journal.files_written == 1
    assert len(journal_files(tmp_path, SPLIT)) == 1
    journal.add(SPLIT, _row(3), saving=True)
    journal.flush_now()
    assert journal.window._value == 3 and not journal.due()
