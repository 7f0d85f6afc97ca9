"""`imatdata clean` over generated raw shards with a planted case for every drop reason."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from imatsample.shards import jpeg, manifest_row, write_shards
from PIL import Image
from typer.testing import CliRunner

from imatdata import clean as clean_mod
from imatdata.cli import app
from imatdata.clean.dedup import hamming
from imatdata.errors import UserError
from imatdata.manifest import RAW_SCHEMA, list_shards, read_table


# --- generated images and raw shards -------------------------------------------------------


def picture(seed: int, size: tuple[int, int] = (320, 320)) -> Image.Image:
    """A smooth random colour field: distinct seeds give phashes >= 16 bits apart."""
    g = np.random.default_rng(seed)
    cells = (g.random((6, 6, 3)) * 255).astype(np.uint8)
    return Image.fromarray(cells, "RGB").resize(size, Image.Resampling.BICUBIC)


def write_raw(root: Path, rows: list[dict], shard_rows: int = 50_000) -> None:
    for split in sorted({r["split"] for r in rows}):
        write_shards(root / "raw" / split, [r for r in rows if r["split"] == split], schema=RAW_SCHEMA,
                     shard_rows=shard_rows, row_group_rows=7)


class Planted:
    """The planted raw manifest and the drops and flags it must produce."""

    def __init__(self) -> None:
        img = {k: picture(k) for k in range(1, 20)}
        big = {k: jpeg(im) for k, im in img.items()}
        small = {k: jpeg(im.resize((200, 200)), quality=70) for k, im in img.items()}
        self.bytes: dict[str, bytes] = {}
        rows: list[dict] = []

        def add(id_: str, split: str, label: int | None, body: bytes | None = None, *, sha256: bool = True,
                **kw: object) -> None:  # with its sha256, as fetch stores it, unless told
            rows.append(manifest_row(id_, split, label, body, sha256=sha256, **kw))  # type: ignore[arg-type]
            if body is not None:
                self.bytes[id_] = body

        truncated = big[3][: len(big[3]) // 2]
        placeholder = jpeg(picture(11, (120, 120)))
        # train
        add("tr_keep1", "train", 1, big[1])
        add("tr_keep2", "train", 2, big[2])
        add("tr_fail", "train", 1, status="http_error", error="HTTP 404")
        add("tr_broken", "train", 1, truncated, size=(320, 320))
        add("tr_badsize", "train", 1, big[4], size=(100, 320))
        add("tr_tiny", "train", 2, jpeg(picture(5, (50, 120))))
        add("tr_wide", "train", 2, jpeg(picture(6, (400, 80))))
        add("tr_a", "train", 3, big[7])
        add("tr_a2", "train", 3, big[7], sha256=False)  # sha256 missing: computed from the bytes
        add("tr_b_small", "train", 4, small[8])
        add("tr_b", "train", 4, big[8])
        add("tr_c1", "train", 5, big[9])
        add("tr_c2", "train", 5, big[9])
        add("tr_c3", "train", 6, big[9])
        add("tr_d1", "train", 7, big[10])
        add("tr_d2", "train", 8, jpeg(img[10], quality=60))
        for k, lab in enumerate([1, 2, 3, 4, 1, 2, 3, 4, 1, 2]):
            add(f"tr_p{k}", "train", lab, placeholder)
        for k, lab in enumerate([9] * 7 + [10] * 3):  # 10 URLs but 2 classes: not a placeholder
            add(f"tr_q{k}", "train", lab, big[12])
        add("tr_e", "train", 11, big[13])
        add("tr_f", "train", 12, small[14])
        # val
        add("va_keep", "val", 1, big[15])
        add("va_dup", "val", 1, big[15])
        add("va_fail", "val", 2, status="timeout", error="deadline")
        add("va_e", "val", 11, big[13])
        add("va_p", "val", 5, placeholder)
        # test
        add("te_keep", "test", None, big[16])
        add("te_fail", "test", None, status="connection_error", error="refused")
        add("te_tiny", "test", None, jpeg(picture(17, (40, 40))))
        add("te_dup", "test", None, big[16])
        add("te_f", "test", None, big[14])
        add("te_p", "test", None, placeholder)
        add("te_broken", "test", None, truncated, size=(320, 320))
        self.rows = rows
        d_b = int(hamming(clean_mod.image_phash(small[8]), clean_mod.image_phash(big[8])))
        d_d = int(hamming(clean_mod.image_phash(big[10]), clean_mod.image_phash(jpeg(img[10], quality=60))))
        d_f = int(hamming(clean_mod.image_phash(small[14]), clean_mod.image_phash(big[14])))
        self.distances = {"b": d_b, "d": d_d, "f": d_f}
        ph = "urls=12 classes=5 rows=12"
        self.dropped = {
            ("tr_fail", "train"): ("fetch_failed", "status=http_error: HTTP 404"),
            ("tr_tiny", "train"): ("undersized", "original 50x120, shorter side 50 < 64"),
            ("tr_wide", "train"): ("bad_aspect", "original 400x80, aspect 5.00 > 4"),
            ("tr_badsize", "train"): ("broken", "stored bytes decode to 320x320 but the manifest says 100x320"),
            ("tr_a2", "train"): ("duplicate", "kept=tr_a distance=0"),
            ("tr_b_small", "train"): ("near_duplicate", f"kept=tr_b distance={d_b}"),
            ("tr_c2", "train"): ("duplicate", "kept=tr_c1 distance=0"),
            ("tr_c3", "train"): ("label_conflict", "kept=tr_c1 distance=0 label=6 majority=5"),
            ("tr_d1", "train"): ("label_conflict", "tie labels=7,8 rows=2"),
            ("tr_d2", "train"): ("label_conflict", "tie labels=7,8 rows=2"),
            **{(f"tr_p{k}", "train"): ("placeholder", ph) for k in range(10)},
            **{(f"tr_q{k}", "train"): ("duplicate", "kept=tr_q0 distance=0") for k in range(1, 7)},
            **{(f"tr_q{k}", "train"): ("label_conflict", "kept=tr_q0 distance=0 label=10 majority=9")
               for k in range(7, 10)},
            ("tr_e", "train"): ("leak", "twin=va_e split=val distance=0"),
            ("tr_f", "train"): ("leak", f"twin=te_f split=test distance={d_f}"),
            ("va_dup", "val"): ("duplicate", "kept=va_keep distance=0"),
            ("va_fail", "val"): ("fetch_failed", "status=timeout: deadline"),
            ("va_p", "val"): ("placeholder", ph),
        }
        self.flags = {
            ("te_fail", "test"): ("fetch_failed", "status=connection_error: refused"),
            ("te_tiny", "test"): ("undersized", "original 40x40, shorter side 40 < 64"),
            ("te_dup", "test"): ("duplicate", "kept=te_keep distance=0"),
            ("te_p", "test"): ("placeholder", ph),
        }
        # The truncated JPEG's message comes from Pillow; only its prefix is ours.
        self.broken_prefix = {("tr_broken", "train"), ("te_broken", "test")}

    def raw_ids(self, split: str) -> list[str]:
        return [r["id"] for r in self.rows if r["split"] == split]


@pytest.fixture(scope="module")
def planted() -> Planted:
    return Planted()


def notes(path: Path) -> dict[tuple[str, str], tuple[str, str]]:
    t = pq.read_table(path).to_pylist()
    return {(r["id"], r["split"]): (r["reason"], r["detail"]) for r in t}


def split_out_broken(found: dict, keys: set) -> dict:
    rest = dict(found)
    for key in keys:
        reason, detail = rest.pop(key)
        assert reason == "broken" and detail.startswith("does not decode: "), (key, reason, detail)
    return rest


def config(**kw: object) -> clean_mod.CleanConfig:
    base = {"min_size": 64, "max_aspect": 4.0, "workers": 1}
    base.update(kw)
    return clean_mod.CleanConfig(**base)  # type: ignore[arg-type]


def raw_fingerprint(root: Path) -> dict[str, tuple[str, float]]:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
            for p in sorted((root / "raw").rglob("*")) if p.is_file()}


# --- the planted cases ---------------------------------------------------------------------


def test_every_reason_planted(tmp_path: Path, planted: Planted) -> None:
    assert planted.distances["b"] <= 4 and planted.distances["f"] <= 4 and planted.distances["d"] <= 4
    write_raw(tmp_path, planted.rows)
    before = raw_fingerprint(tmp_path)
    result = clean_mod.clean(tmp_path, config())

    dropped = notes(tmp_path / "clean" / "dropped.parquet")
    broken = {k for k in planted.broken_prefix if k[1] != "test"}
    assert split_out_broken(dropped, broken) == planted.dropped
    flags = notes(tmp_path / "clean" / "flags.parquet")
    assert split_out_broken(flags, {k for k in planted.broken_prefix if k[1] == "test"}) == planted.flags

    for split in ("train", "val", "test"):
        kept = read_table(tmp_path / "clean" / split)
        gone = [k for k in dropped if k[1] == split]
        # The invariant, and the order of kept rows is the raw order.
        assert kept.num_rows + len(gone) == len(planted.raw_ids(split))
        assert kept.column("id").to_pylist() == [i for i in planted.raw_ids(split) if (i, split) not in dropped]
        rep = result.splits[split]
        assert (rep.raw, rep.kept, sum(rep.dropped.values())) == (len(planted.raw_ids(split)), kept.num_rows, len(gone))
    # Every test id stays, failed and flagged ones included, with its status.
    test = read_table(tmp_path / "clean" / "test").to_pylist()
    assert [r["id"] for r in test] == planted.raw_ids("test")
    assert {r["id"]: r["status"] for r in test}["te_fail"] == "connection_error"

    # Kept rows carry their bytes unchanged and the phash of those bytes (null without an image).
    for split in ("train", "val", "test"):
        for r in read_table(tmp_path / "clean" / split).to_pylist():
            if r["id"] in planted.bytes and r["id"] not in ("te_broken",):
                assert r["image"] == planted.bytes[r["id"]]
                assert r["phash"] == clean_mod.image_phash(r["image"])
            else:
                assert r["phash"] is None
    assert result.total_dropped == len(planted.dropped) + 1
    assert (tmp_path / "stats" / "stats.json").is_file()
    assert raw_fingerprint(tmp_path) == before
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_exact_and_off_modes(tmp_path: Path, planted: Planted) -> None:
    write_raw(tmp_path, planted.rows)
    clean_mod.clean(tmp_path, config(dedup="exact"), write_stats=False)
    dropped = notes(tmp_path / "clean" / "dropped.parquet")
    # Re-encodes are no longer linked: the rescaled twin stays, the tie dissolves, the
    # near-duplicate leak is not seen; byte-identical groups behave as before.
    near_only = {("tr_b_small", "train"), ("tr_d1", "train"), ("tr_d2", "train"), ("tr_f", "train")}
    expected = {k: v for k, v in planted.dropped.items() if k not in near_only}
    assert split_out_broken(dropped, {("tr_broken", "train")}) == expected

    clean_mod.clean(tmp_path, config(dedup="off"), write_stats=False)
    dropped = notes(tmp_path / "clean" / "dropped.parquet")
    per_row = {k: v for k, v in planted.dropped.items()
               if v[0] in ("fetch_failed", "broken", "undersized", "bad_aspect")}
    assert split_out_broken(dropped, {("tr_broken", "train")}) == per_row
    flags = notes(tmp_path / "clean" / "flags.parquet")
    assert set(flags) == {("te_fail", "test"), ("te_tiny", "test"), ("te_broken", "test")}


def test_rerun_is_idempotent_and_replaces_output(tmp_path: Path, planted: Planted) -> None:
    write_raw(tmp_path, planted.rows)
    clean_mod.clean(tmp_path, config(), write_stats=False)
    first = {p.relative_to(tmp_path): pq.read_table(p) for p in (tmp_path / "clean").rglob("*.parquet")}
    clean_mod.clean(tmp_path, config(), write_stats=False)
    second = {p.relative_to(tmp_path): pq.read_table(p) for p in (tmp_path / "clean").rglob("*.parquet")}
    assert first.keys() == second.keys()
    assert all(first[k].equals(second[k]) for k in first)
    # A rerun with other settings replaces the output; a split gone from raw/ is gone from clean/;
    # a hidden folder (fetch's journal) is never a split.
    os.replace(tmp_path / "raw" / "val", tmp_path / "raw" / ".journal")
    clean_mod.clean(tmp_path, config(min_size=0, max_aspect=0.0), write_stats=False)
    assert sorted(p.name for p in (tmp_path / "clean").iterdir()) == ["dropped.parquet", "flags.parquet",
                                                                      "test", "train"]
    reasons = {r for r, _ in notes(tmp_path / "clean" / "dropped.parquet").values()}
    assert "undersized" not in reasons and "bad_aspect" not in reasons


def test_failed_write_keeps_previous_output(tmp_path: Path, planted: Planted,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    write_raw(tmp_path, planted.rows)
    clean_mod.clean(tmp_path, config(), write_stats=False)
    before = {p: p.read_bytes() for p in (tmp_path / "clean").rglob("*") if p.is_file()}

    def boom(*a: object, **k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(clean_mod, "write_table_atomic", boom)
    with pytest.raises(OSError, match="disk full"):
        clean_mod.clean(tmp_path, config(dedup="off"), write_stats=False)
    after = {p: p.read_bytes() for p in (tmp_path / "clean").rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "raw"]


def test_crash_between_renames_is_recovered(tmp_path: Path, planted: Planted) -> None:
    write_raw(tmp_path, planted.rows)
    clean_mod.clean(tmp_path, config(), write_stats=False)
    # The state a crash between "clean -> .clean.old" and ".clean.staging -> clean" leaves.
    os.replace(tmp_path / "clean", tmp_path / ".clean.old")
    (tmp_path / ".clean.staging" / "train").mkdir(parents=True)
    clean_mod._recover(tmp_path)
    assert (tmp_path / "clean" / "dropped.parquet").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "raw"]


def test_spawn_pool_matches_inline(tmp_path: Path, planted: Planted) -> None:
    write_raw(tmp_path / "a", planted.rows, shard_rows=9)
    write_raw(tmp_path / "b", planted.rows, shard_rows=9)
    assert len(list_shards(tmp_path / "a" / "raw" / "train")) > 1
    clean_mod.clean(tmp_path / "a", config(), write_stats=False)
    clean_mod.clean(tmp_path / "b", config(workers=2, start_method="spawn", batch_rows=5), write_stats=False)
    for name in ("dropped.parquet", "flags.parquet"):
        assert pq.read_table(tmp_path / "a" / "clean" / name).equals(pq.read_table(tmp_path / "b" / "clean" / name))
    for split in ("train", "val", "test"):
        assert read_table(tmp_path / "a" / "clean" / split).equals(read_table(tmp_path / "b" / "clean" / split))


def test_all_rows_dropped_leaves_an_empty_split(tmp_path: Path) -> None:
    write_raw(tmp_path, [manifest_row("x", "train", 1, status="timeout", error="slow"),
                         manifest_row("y", "train", 2, jpeg(picture(1, (30, 30))))])
    result = clean_mod.clean(tmp_path, config(), write_stats=False)
    assert read_table(tmp_path / "clean" / "train").num_rows == 0
    assert result.splits["train"].dropped == {"fetch_failed": 1, "undersized": 1}


def test_missing_raw_and_bad_flags_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="run `imatdata fetch` first"):
        clean_mod.clean(tmp_path, config())
    for bad in ({"dedup": "fuzzy"}, {"hash_distance": 65}, {"min_size": -1}, {"max_aspect": 0.5},
                {"workers": 0}):
        with pytest.raises(UserError):
            config(**bad)


# --- CLI -----------------------------------------------------------------------------------


def test_cli_clean_prints_table(tmp_path: Path, planted: Planted) -> None:
    write_raw(tmp_path, planted.rows)
    res = CliRunner().invoke(app, ["clean", "--root", str(tmp_path), "--workers", "1", "--max-aspect", "4"])
    assert res.exit_code == 0, res.output
    for word in ("placeholder", "leak", "label_conflict", "near_duplicate", "kept", "flagged"):
        assert word in res.output
    header = next(line for line in res.output.splitlines() if "reason" in line)
    assert header.index("train") < header.index("val") < header.index("test")  # pipeline order
    assert notes(tmp_path / "clean" / "dropped.parquet").keys() >= planted.dropped.keys()


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "IMAT_ROOT": str(tmp_path / "nowhere")}
    proc = subprocess.run([sys.executable, "-m", "imatdata", "clean", "--quiet"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no raw manifest under" in proc.stderr
    assert "Traceback" not in proc.stderr
    res = CliRunner().invoke(app, ["clean", "--root", str(tmp_path), "--dedup", "fuzzy"])
    assert res.exit_code == 2


# --- runs that overlap, stop or start from odd places (issue #14) ---------------------------------

SLOW_CLEAN = """
import pathlib, signal, sys, time
from imatdata import clean as clean_mod
from imatdata.cli import main

signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal, even if the tests run in the background

started, hold = pathlib.Path(sys.argv[1]), float(sys.argv[2])
real = clean_mod._pass1

def slow(*args, **kwargs):
    started.write_text("hashing")
    time.sleep(hold)
    return real(*args, **kwargs)

clean_mod._pass1 = slow
sys.argv = ["imatdata", *sys.argv[3:]]
main()
"""


def start_slow_clean(tmp_path: Path, root: Path, hold: float) -> tuple[subprocess.Popen[str], Path]:
    """`imatdata clean --root ROOT` in a real process that pauses `hold` s once it holds the lock."""
    script, started = tmp_path / "slow_clean.py", tmp_path / "started"
    script.write_text(SLOW_CLEAN)
    proc = subprocess.Popen([sys.executable, str(script), str(started), str(hold), "clean", "--root", str(root),
                             "--quiet", "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not started.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc, started


def imatdata_script() -> str:
    return str(Path(sys.executable).with_name("imatdata"))


def test_a_second_clean_on_the_same_root_stops_with_one_line(tmp_path: Path, planted: Planted) -> None:
    root = tmp_path / "root"
    write_raw(root, planted.rows)
    first, _ = start_slow_clean(tmp_path, root, hold=3)
    second = subprocess.run([imatdata_script(), "clean", "--root", str(root), "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert first.poll() is None  # still running: the second did not wait for it
    assert second.returncode == 2
    assert second.stderr.count("\n") == 1 and "another imatdata clean is running on" in second.stderr
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert (root / "clean" / "dropped.parquet").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["clean", "raw", "stats"]  # no staging, no lock file


def test_ctrl_c_in_clean_says_what_a_rerun_does(tmp_path: Path, planted: Planted) -> None:
    root = tmp_path / "root"
    write_raw(root, planted.rows)
    clean_mod.clean(root, config(), write_stats=False)
    before = {p: p.read_bytes() for p in (root / "clean").rglob("*") if p.is_file()}
    proc, _ = start_slow_clean(tmp_path, root, hold=60)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "clean/ is only ever replaced by a complete result; run clean again to start over" in err
    assert "resume" not in err
    assert {p: p.read_bytes() for p in (root / "clean").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in root.iterdir()) == ["clean", "raw"]


def test_hashing_workers_do_not_import_modules_from_the_current_directory(tmp_path: Path,
                                                                          planted: Planted) -> None:
    root, cwd, marker = tmp_path / "root", tmp_path / "cwd", tmp_path / "marker"
    write_raw(root, planted.rows)
    cwd.mkdir()
    (cwd / "struct.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n")
    # The trap works: a spawned worker of a plain script (`python -c` under the hood) takes it.
    script = tmp_path / "run_clean.py"
    script.write_text(textwrap.dedent(f"""
        from pathlib import Path
        from imatdata import clean as clean_mod
        if __name__ == "__main__":
            cfg = clean_mod.CleanConfig(min_size=64, max_aspect=4.0, workers=2, batch_rows=3)
            clean_mod.clean(Path({str(root)!r}), cfg, write_stats=False)
            print("cleaned")
    """))
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "cleaned" in proc.stdout
    assert not marker.exists()
    # What the spawned workers would do without the fix (their bootstrap imports struct):
    subprocess.run([sys.executable, "-c", "import multiprocessing.connection"], cwd=cwd, capture_output=True,
                   timeout=60)
    assert marker.exists()
