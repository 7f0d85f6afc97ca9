"""Input parsing and validation: every format, every SPEC error case, streaming memory."""

from __future__ import annotations

import csv
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imatdata.errors import UserError
from imatdata.fetch.sources import (check_url, invalid_key, read_records, record_key, resolve_sources,
                              scan_sources)


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def imat(tmp_path: Path, records: list[dict], name: str = "train.json") -> Path:
    return write_json(tmp_path / name, {"images": records})


def good(n: int, with_class: bool = True) -> list[dict]:
    out = []
    for i in range(n):
        rec = {"id": f"{i:032x}.jpg", "url": f"http://example.com/{i}.jpg?w=750"}
        if with_class:
            rec["class"] = i % 7
        out.append(rec)
    return out


def scan(paths: list[Path], **kw):
    return scan_sources(resolve_sources(paths, kw.pop("split", None)), **kw)


def test_imat_json_records_and_split_from_stem(tmp_path: Path) -> None:
    recs = good(3) + [{"id": 12345, "url": "https://example.com/x.png"}]
    src = resolve_sources([imat(tmp_path, recs, "val.json")])[0]
    assert src.split == "val" and src.fmt == "imat"
    out = list(read_records(src))
    assert [r.index for r in out] == [0, 1, 2, 3]
    assert out[0].id == "00000000000000000000000000000000.jpg" and out[0].label == 0
    assert out[3].id == "12345" and out[3].label is None  # integer ids kept as strings
    assert all(r.valid for r in out)


def test_split_flag_overrides_stems(tmp_path: Path) -> None:
    srcs = resolve_sources([imat(tmp_path, good(1), "a.json"), imat(tmp_path, good(1), "b.json")], "train")
    assert {s.split for s in srcs} == {"train"}


@pytest.mark.parametrize("content, expected", [
    ("this is not json", ["not valid JSON"]),
    ('{"annotations": []}', ["field 'images'", "missing"]),
    ('{"images": []}', ["field 'images'", "empty"]),
    ('[1, 2]', ["field 'images'", "missing"]),
    ('{"images": {"a": 1}}', ["field 'images'", "expected a list"]),
])
def test_file_level_errors(tmp_path: Path, content: str, expected: list[str]) -> None:
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        scan([path])
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    for part in expected:
        assert part in msg


def test_truncated_json_names_the_record(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    text = json.dumps({"images": good(5)})
    path.write_text(text[: text.index('"id": "00000000000000000000000000000003')])
    with pytest.raises(UserError, match=r"train\.json: record 3: not valid JSON"):
        scan([path])


@pytest.mark.parametrize("bad, index, field", [
    ({"id": "x.jpg", "class": 3}, 2, "url"),
    ({"id": "x.jpg", "url": "ftp://example.com/x.jpg", "class": 3}, 2, "url"),
    ({"id": "x.jpg", "url": "file:///etc/passwd", "class": 3}, 2, "url"),
    ({"id": "x.jpg", "url": "http:///nohost.jpg", "class": 3}, 2, "url"),
    ({"id": "x.jpg", "url": "http://example.com/x.jpg", "class": "12a"}, 2, "class"),
    ({"id": "x.jpg", "url": "http://example.com/x.jpg", "class": 3.5}, 2, "class"),
    ({"id": "x.jpg", "url": "http://example.com/x.jpg", "class": True}, 2, "class"),
    ({"url": "http://example.com/x.jpg", "class": 3}, 2, "id"),
    ({"id": ["a"], "url": "http://example.com/x.jpg"}, 2, "id"),
])
def test_record_errors_name_file_index_field(tmp_path: Path, bad: dict, index: int, field: str) -> None:
    path = imat(tmp_path, good(2) + [bad] + good(1)[:0])
    with pytest.raises(UserError) as err:
        scan([path])
    msg = str(err.value)
    assert msg.startswith(f"{path}: record {index}: field '{field}':"), msg
    assert "\n" not in msg


def test_duplicate_ids_error_and_skip(tmp_path: Path) -> None:
    recs = good(4)
    recs.append(dict(recs[1]))  # record 4 repeats record 1's id
    path = imat(tmp_path, recs)
    with pytest.raises(UserError, match=r"record 4: field 'id': duplicate id .*first at record 1"):
        scan([path])
    result = scan([path], skip_invalid=True)
    assert result.sources[0].invalid == {4: "field 'id': duplicate id"}
    keys = result.split_keys["train"]
    assert keys.size == 5  # every record has a key: four ids and one position
    assert np.all(keys[:-1] <= keys[1:])
    assert record_key("train", recs[1]["id"]) in set(keys.tolist())
    assert invalid_key("train", path.name, 4) in set(keys.tolist())


def test_duplicates_across_sources_of_one_split(tmp_path: Path) -> None:
    a = imat(tmp_path, good(3), "a.json")
    b = imat(tmp_path, good(2), "b.json")
    with pytest.raises(UserError, match=r"b\.json: record 0: field 'id': duplicate id"):
        scan([a, b], split="train")
    # In different splits the same id is fine (keys include the split).
    result = scan([a, b])
    assert set(result.split_keys) == {"a", "b"}


def test_skip_invalid_keys_every_record(tmp_path: Path) -> None:
    recs = good(3) + [{"id": "z.jpg", "url": "gopher://x"}, {"url": "http://e.com/a.jpg"}, "not an object"]
    result = scan([imat(tmp_path, recs)], skip_invalid=True)
    s = result.sources[0]
    assert s.records == 6 and sorted(s.invalid) == [3, 4, 5]
    assert "field 'url'" in s.invalid[3] and "field 'id'" in s.invalid[4] and "field 'record'" in s.invalid[5]
    assert result.split_keys["train"].size == 6
    assert result.invalid() == 3 and result.records("train") == 6


def test_limit_takes_first_records(tmp_path: Path) -> None:
    path = imat(tmp_path, good(10) + [{"id": "bad"}])  # the bad record is past the limit
    result = scan([path], limit=4)
    assert result.sources[0].records == 4 and result.split_keys["train"].size == 4
    with pytest.raises(UserError, match="--limit"):
        scan([path], limit=0)


def test_jsonl_csv_parquet_inputs(tmp_path: Path) -> None:
    recs = good(4)
    jl = tmp_path / "train.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    cv = tmp_path / "val.csv"
    with open(cv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "url", "class"])
        for r in recs:
            w.writerow([r["id"], r["url"], r["class"]])
        w.writerow(["extra.jpg", "http://example.com/e.jpg", ""])  # empty class: unlabelled
    pqf = tmp_path / "test.parquet"
    pq.write_table(pa.table({"id": [r["id"] for r in recs], "url": [r["url"] for r in recs]}), pqf)
    srcs = resolve_sources([jl, cv, pqf])
    assert [s.fmt for s in srcs] == ["jsonl", "csv", "parquet"]
    jl_recs, cv_recs, pq_recs = (list(read_records(s)) for s in srcs)
    assert [r.id for r in jl_recs] == [r["id"] for r in recs] and jl_recs[2].label == 2
    assert [r.label for r in cv_recs] == [0, 1, 2, 3, None]
    assert all(r.label is None for r in pq_recs) and pq_recs[3].url == recs[3]["url"]
    result = scan_sources(srcs)
    assert {k: v.size for k, v in result.split_keys.items()} == {"train": 4, "val": 5, "test": 4}


def test_csv_and_parquet_errors(tmp_path: Path) -> None:
    cv = tmp_path / "train.csv"
    cv.write_text("id,link\na.jpg,http://e.com/a.jpg\n")
    with pytest.raises(UserError, match=r"train\.csv: field 'url': missing"):
        scan([cv])
    cv.write_text("id,url,class\na.jpg,http://e.com/a.jpg,x\n")
    with pytest.raises(UserError, match=r"train\.csv: record 0: field 'class'"):
        scan([cv])
    bad = tmp_path / "val.parquet"
    bad.write_text("not parquet")
    with pytest.raises(UserError, match="not a readable Parquet"):
        scan([bad])
    jl = tmp_path / "test.jsonl"
    jl.write_text('{"id": "a", "url": "http://e.com/a"}\n{oops\n')
    with pytest.raises(UserError, match=r"test\.jsonl: record 1: field 'record': not valid JSON"):
        scan([jl])


def test_path_and_format_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        resolve_sources([tmp_path / "missing.json"])
    odd = tmp_path / "list.txt"
    odd.write_text("x")
    with pytest.raises(UserError, match="unknown format"):
        resolve_sources([odd])
    with pytest.raises(UserError, match="--split"):
        resolve_sources([imat(tmp_path, good(1))], "../evil")


def test_check_url() -> None:
    assert check_url(" http://e.com/a.jpg ") == ("http://e.com/a.jpg", None)
    assert check_url("HTTPS://E.com/a")[1] is None
    for bad in ("javascript:alert(1)", "//e.com/a.jpg", "http://e.com:notaport/x", 17, None, ""):
        assert check_url(bad)[1] is not None


def test_scan_streams_without_holding_records(tmp_path: Path) -> None:
    # 20k records parsed into dicts at once would take about 10 MB; streaming keeps 8-byte keys.
    path = tmp_path / "train.json"
    with open(path, "w") as fh:
        fh.write('{"images": [')
        for i in range(20_000):
            fh.write(("," if i else "") + json.dumps({"id": f"{i:032x}.jpg", "url": f"http://e.com/{i}.jpg",
                                                       "class": i % 2019}))
        fh.write("]}")
    tracemalloc.start()
    try:
        result = scan([path])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.split_keys["train"].size == 20_000
    assert peak < 3 * 1024 * 1024, f"validation pass peaked at {peak / 1e6:.1f} MB"


# --- hardening (issue #14) -----------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1_000, 200_000])
def test_deeply_nested_json_is_refused_quickly_naming_the_file(tmp_path: Path, depth: int) -> None:
    import time

    path = tmp_path / "train.json"
    path.write_text('{"images": [' + json.dumps(good(2))[1:-1] + ", " + "[" * depth + "]" * depth + "]}")
    t = time.perf_counter()
    with pytest.raises(UserError) as err:
        scan([path])
    assert time.perf_counter() - t < 5
    msg = str(err.value)
    assert msg.startswith(f"{path}: record 2: nested deeper than 64 levels") and "\n" not in msg
    top = tmp_path / "val.json"
    top.write_text('{"meta": ' + "[" * depth + "]" * depth + ', "images": []}')
    with pytest.raises(UserError, match=r"val\.json: nested deeper than 64 levels"):
        scan([top])


def test_deeply_nested_json_lines_record_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good(1)[0]) + "\n" + "[" * 200_000 + "]" * 200_000 + "\n")
    with pytest.raises(UserError, match=r"train\.jsonl: record 1: field 'record': nested too deeply"):
        scan([path])
    result = scan([path], skip_invalid=True)
    assert result.invalid() == 1 and result.records() == 2


def test_records_nested_within_the_cap_still_read_like_ijson(tmp_path: Path) -> None:
    import ijson

    doc = {"info": {"a": [1, {"b": [2]}]}, "images": [
        {"id": "a", "url": "http://example.com/a.jpg", "extra": [1, [2, {"q": 3}]], "class": 1},
        5, [1, 2], {"id": {"x": [1]}, "url": "http://example.com/b.jpg"}, {}]}
    path = write_json(tmp_path / "train.json", doc)
    from imatdata.fetch.sources import _imat_objects

    with open(path, "rb") as fh:
        assert list(_imat_objects(path)) == list(ijson.items(fh, "images.item"))


def test_json_and_json_lines_with_a_byte_order_mark_are_read(tmp_path: Path) -> None:
    recs = good(3)
    bom_json = tmp_path / "train.json"
    bom_json.write_bytes(b"\xef\xbb\xbf" + json.dumps({"images": recs}).encode())
    bom_jsonl = tmp_path / "val.jsonl"
    bom_jsonl.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in recs).encode() + b"\n")
    for path in (bom_json, bom_jsonl):
        records = list(read_records(resolve_sources([path])[0]))
        assert [(r.id, r.url, r.label, r.valid) for r in records] == \
            [(r["id"], r["url"], r["class"], True) for r in recs]
    empty = tmp_path / "test.json"
    empty.write_bytes(b"\xef\xbb\xbf" + b'{"images": []}')
    with pytest.raises(UserError, match="the list is empty"):  # the BOM is not what gets blamed
        scan([empty])


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_negative_classes_are_invalid(tmp_path: Path, fmt: str) -> None:
    recs = good(2) + [{"id": "neg.jpg", "url": "http://example.com/n.jpg", "class": -3}]
    path = tmp_path / f"train.{fmt}"
    if fmt == "json":
        write_json(path, {"images": recs})
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    else:
        path.write_text("id,url,class\n" + "".join(f"{r['id']},{r['url']},{r['class']}\n" for r in recs))
    with pytest.raises(UserError) as err:
        scan([path])
    assert str(err.value).startswith(f"{path}: record 2: field 'class': -3 is negative")
    result = scan([path], skip_invalid=True)
    assert result.sources[0].invalid == {2: "field 'class': -3 is negative; classes are numbered from 0"}


def test_lone_surrogates_are_invalid_and_pairs_are_fine(tmp_path: Path) -> None:
    emoji = '{"id": "\\ud83d\\ude00.jpg", "url": "http://example.com/e.jpg", "class": 1}'
    lone = '{"id": "x\\ud800", "url": "http://example.com/l.jpg", "class": 1}'
    plain = json.dumps(good(2))[1:-1]
    path = tmp_path / "train.json"
    path.write_text('{"images": [' + plain + ", " + emoji + ", " + lone + "]}")
    with pytest.raises(UserError) as err:
        scan([path])
    assert str(err.value).startswith(f"{path}: record 3: field 'id': 'x\\ud800' holds a lone UTF-16 surrogate")
    records = list(read_records(resolve_sources([path])[0]))
    assert [r.valid for r in records] == [True, True, True, False]
    assert records[2].id == "\U0001F600.jpg"
    # Far into a big file: the records read before the escape was met are not read twice.
    many = good(3000)
    path.write_text('{"images": [' + json.dumps(many)[1:-1] + ", " + emoji + ", " + lone + "]}")
    records = list(read_records(resolve_sources([path])[0]))
    assert [r.index for r in records] == list(range(3002))
    assert [r.id for r in records[:3000]] == [r["id"] for r in many]
    assert (records[3000].id, records[3001].valid) == ("\U0001F600.jpg", False)
    lines = tmp_path / "val.jsonl"
    lines.write_text(emoji + "\n" + lone.replace('"id": "x\\ud800"', '"id": "y"').replace("l.jpg", "\\udfff") + "\n")
    with pytest.raises(UserError, match=r"val\.jsonl: record 1: field 'url': .* lone UTF-16 surrogate"):
        scan([lines])


def test_unreadable_sources_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imatdata.fetch import sources

    folder = tmp_path / "lists.json"
    folder.mkdir()
    with pytest.raises(UserError, match=r"lists\.json: not a file \(a folder"):
        resolve_sources([folder])
    path = imat(tmp_path, good(2))

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sources, "open", denied, raising=False)
    with pytest.raises(UserError, match=r"train\.json: cannot read it \(permission denied\)"):
        resolve_sources([path])
    source = sources.Source(path, "train", "imat")
    with pytest.raises(UserError, match=r"train\.json: cannot read it \(permission denied\)"):
        list(read_records(source))


def test_bad_sources_through_the_cli_are_one_line_exit_2_and_write_nothing(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    script = str(Path(sys.executable).with_name("imatdata"))
    bad = {
        "deep.json": ('{"images": [' + "[" * 200_000 + "]" * 200_000 + "]}", "nested deeper than 64 levels"),
        "deep1k.json": ('{"images": [' + "[" * 1_000 + "]" * 1_000 + "]}", "nested deeper than 64 levels"),
        "negative.json": (json.dumps({"images": [{"id": "a", "url": "http://example.com/a", "class": -1}]}),
                          "record 0: field 'class': -1 is negative"),
        "surrogate.json": ('{"images": [{"id": "\\udc00", "url": "http://example.com/a", "class": 1}]}',
                           "record 0: field 'id': '\\udc00' holds a lone UTF-16 surrogate"),
    }
    cases = []
    for name, (text, says) in bad.items():
        (tmp_path / name).write_text(text)
        cases.append(([], name, says))
    (tmp_path / "folder.json").mkdir()
    cases.append(([], "folder.json", "not a file"))
    if os.geteuid() != 0:
        prefix: list[str] = []
    else:  # root reads anything: drop that right (see tests/test_manifest.py)
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
        if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
            prefix = []
    if prefix or os.geteuid() != 0:
        secret = write_json(tmp_path / "secret.json", {"images": good(1)})
        secret.chmod(0)
        cases.append((prefix, "secret.json", "cannot read it (permission denied)"))
    for prefix, name, says in cases:
        proc = subprocess.run([*prefix, script, "fetch", name, "--root", str(tmp_path / "root"), "--quiet"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (name, proc.stderr)
        assert proc.stderr.startswith(f"imatdata: error: {name}") and proc.stderr.count("\n") == 1, proc.stderr
        assert says in proc.stderr, proc.stderr
        assert not (tmp_path / "root").exists()
