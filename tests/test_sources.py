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
from imatdata.sources import (check_url, invalid_key, read_records, record_key, resolve_sources,
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
