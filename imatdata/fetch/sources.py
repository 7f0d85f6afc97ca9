"""URL lists in, validated records out: the iMaterialist JSON, JSON Lines, CSV and Parquet.

Everything here streams. A 222 MB, 1M-record train.json is read with ijson one record at a
time and never sits in memory as Python objects; the only per-record state kept across a
whole file is one 8-byte hash per id (for the duplicate check), in numpy arrays.

Fetch reads every source twice: `scan_sources` validates all of them before any network or
disk write (so a bad file costs nothing but an error message), and `read_records` streams
them again to dispatch the work.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from imatdata.errors import UserError

FORMATS = {
    ".json": "imat",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}

# An http(s) URL with a plain host name or IPv4 address, an optional port and no odd characters.
_PLAIN_URL = re.compile(r"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?(?::\d{1,4})?"
                        r"(?:[/?#][!-~]*)?$")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_INT32 = (-(2**31), 2**31 - 1)
# JSON nested deeper than this (counted from the document's top) is refused while streaming:
# an iMaterialist list is 3 deep, and a deeper file costs the parser time quadratic in the
# depth (200,000 levels: over a minute) and Python a RecursionError at about 1,000.
MAX_JSON_DEPTH = 64
_UTF8_BOM = b"\xef\xbb\xbf"
# Keys are built in numpy chunks of this many so a million ids never become a Python list.
_KEY_CHUNK = 65_536


@dataclass(frozen=True)
class Source:
    """One input file and the split its records go to."""

    path: Path
    split: str
    fmt: str  # imat | jsonl | csv | parquet


@dataclass(frozen=True)
class Record:
    """One input record. `problem` is set (and `field_name` names the field) when it is invalid."""

    index: int
    id: str
    url: str | None
    label: int | None
    field_name: str | None = None
    problem: str | None = None

    @property
    def valid(self) -> bool:
        return self.problem is None


@dataclass
class SourceScan:
    """What the validation pass learnt about one source."""

    source: Source
    records: int = 0
    # record index -> "field 'x': what is wrong" for rows that become status=invalid.
    invalid: dict[int, str] = field(default_factory=dict)


@dataclass
class ScanResult:
    """All sources validated: per source what is invalid, per split the keys of every record."""

    sources: list[SourceScan]
    split_keys: dict[str, np.ndarray]  # split -> sorted uint64 keys of all its records

    def records(self, split: str | None = None) -> int:
        return sum(s.records for s in self.sources if split is None or s.source.split == split)

    def invalid(self, split: str | None = None) -> int:
        return sum(len(s.invalid) for s in self.sources if split is None or s.source.split == split)

    @property
    def splits(self) -> list[str]:
        return sorted(self.split_keys)


# --- keys -----------------------------------------------------------------------------------


def record_key(split: str, record_id: str) -> int:
    """The 64-bit identity of a record across runs: (split, id). Used for resume."""
    digest = hashlib.blake2b(f"{split}\x00{record_id}".encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little")


def invalid_key(split: str, source_name: str, index: int) -> int:
    """Identity of an invalid record: its position, since its id may be missing or repeated."""
    digest = hashlib.blake2b(f"{split}\x00\x01invalid\x00{source_name}\x00{index}".encode(
        "utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class _Buffer:
    """An append-only numpy array built in chunks (no Python list of a million ints)."""

    def __init__(self, dtype: Any = np.uint64) -> None:
        self._dtype = dtype
        self._chunks: list[np.ndarray] = []
        self._current: list[int] = []

    def append(self, value: int) -> None:
        self._current.append(value)
        if len(self._current) >= _KEY_CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._current:
            self._chunks.append(np.array(self._current, dtype=self._dtype))
            self._current = []

    def array(self) -> np.ndarray:
        self._flush()
        if not self._chunks:
            return np.empty(0, dtype=self._dtype)
        return np.concatenate(self._chunks)


# --- resolving sources ----------------------------------------------------------------------


def resolve_sources(paths: Sequence[str | Path], split: str | None = None) -> list[Source]:
    """Each path with its format (from the extension) and its split (file stem or `--split`)."""
    if not paths:
        raise UserError("give at least one URL list (train.json, a .jsonl, .csv or .parquet file)")
    if split is not None and not _SPLIT_NAME.match(split):
        raise UserError(f"--split {split!r}: use letters, digits, '_', '-' or '.', starting with a letter or digit")
    sources = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"{path}: no such file")
        if not path.is_file():
            raise UserError(f"{path}: not a file" + (" (a folder: give the URL list files in it)"
                                                     if path.is_dir() else ""))
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise UserError(f"{path}: cannot read it ({_os_reason(exc)})") from None
        if path.resolve() in seen:
            raise UserError(f"{path}: given twice")
        seen.add(path.resolve())
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise UserError(f"{path}: unknown format; use .json (iMaterialist), .jsonl, .csv or .parquet")
        name = split if split is not None else path.stem
        if not _SPLIT_NAME.match(name):
            raise UserError(f"{path}: cannot use {name!r} as a split name; rename the file or pass --split")
        sources.append(Source(path=path, split=name, fmt=fmt))
    return sources


# --- per-record validation ------------------------------------------------------------------


def check_url(url: Any) -> tuple[str | None, str | None]:
    """(normalised url, problem). Only absolute http(s) URLs with a host are accepted."""
    if url is None:
        return None, "missing"
    if not isinstance(url, str):
        return None, f"expected a string, got {_show(url)}"
    url = url.strip()
    if not url:
        return None, "empty"
    if _PLAIN_URL.match(url):
        return url, None  # the common case, without urlsplit's cost (a million times per pass)
    if _lone_surrogate(url):
        return None, f"{_show(url)} holds a lone UTF-16 surrogate, which is not valid Unicode"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        return None, f"{_show(url)} is not a valid URL ({exc})"
    if parts.scheme.lower() not in ("http", "https"):
        return None, f"{_show(url)} is not an http(s) URL"
    if not host:
        return None, f"{_show(url)} has no host"
    return url, None


def _check_id(value: Any) -> tuple[str | None, str | None]:
    if value is None:
        return None, "missing"
    if isinstance(value, bool):
        return None, f"expected a string or an integer, got {_show(value)}"
    if isinstance(value, int):
        return str(value), None
    if isinstance(value, (float, Decimal)) and not isinstance(value, bool):
        if math.isfinite(value) and value == int(value):
            return str(int(value)), None
        return None, f"expected a string or an integer, got {_show(value)}"
    if isinstance(value, str):
        if not value.strip():
            return None, "empty"
        if _lone_surrogate(value):
            return None, f"{_show(value)} holds a lone UTF-16 surrogate, which is not valid Unicode"
        return value, None
    return None, f"expected a string or an integer, got {_show(value)}"


def _lone_surrogate(text: str) -> bool:
    """Whether `text` holds a surrogate code point, which no UTF-8 file or Parquet column can
    store (JSON's "\\ud800" escape without its pair decodes to one)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_label(value: Any, *, from_text: bool) -> tuple[int | None, str | None]:
    if value is None or (from_text and value == ""):
        return None, None
    if isinstance(value, bool):
        return None, f"expected an integer, got {_show(value)}"
    label: int | None = None
    if isinstance(value, int):
        label = value
    elif isinstance(value, str) and from_text and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        label = int(value)
    elif isinstance(value, float) and not from_text and math.isfinite(value) and value == int(value):
        # Parquet written by pandas stores an int column with nulls as float.
        label = int(value)
    if label is None:
        return None, f"expected an integer, got {_show(value)}"
    if label < 0:
        return None, f"{label} is negative; classes are numbered from 0"
    if label > _INT32[1]:
        return None, f"{label} does not fit in 32 bits"
    return label, None


def make_record(index: int, obj: Any, *, from_text: bool = False) -> Record:
    """Validate one parsed record (a dict with id, url and optionally class)."""
    if not isinstance(obj, dict):
        return Record(index, "", None, None, "record", f"expected an object, got {_show(obj)}")
    rid, problem = _check_id(obj.get("id"))
    raw_url = obj.get("url")
    shown_id = rid if rid is not None else ("" if obj.get("id") is None else str(obj.get("id")))
    url_text = raw_url if isinstance(raw_url, str) else None
    if problem:
        return Record(index, shown_id, url_text, None, "id", problem)
    url, problem = check_url(raw_url)
    if problem:
        return Record(index, shown_id, url_text, None, "url", problem)
    label, problem = _check_label(obj.get("class"), from_text=from_text)
    if problem:
        return Record(index, shown_id, url, None, "class", problem)
    return Record(index, shown_id, url, label)


def _show(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value) if not isinstance(value, Decimal) else str(value)
    except RecursionError:  # a value nested too deep to print
        return f"a deeply nested {type(value).__name__}"
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- readers --------------------------------------------------------------------------------


def read_records(source: Source, limit: int | None = None) -> Iterator[Record]:
    """Stream the records of one source, each validated on its own (duplicates are not
    checked here: that needs the whole split, see `scan_sources`). File-level problems
    (not JSON, no `images`, no records, unreadable) raise UserError."""
    readers = {"imat": _read_imat, "jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}
    count = 0
    try:
        for record in readers[source.fmt](source.path):
            if limit is not None and count >= limit:
                return
            yield record
            count += 1
    except OSError as exc:  # permission denied, a vanished file, an I/O error mid-read
        raise UserError(f"{source.path}: cannot read it ({_os_reason(exc)})") from None
    if count == 0:
        what = "field 'images': the list is empty" if source.fmt == "imat" else "has no records"
        raise UserError(f"{source.path}: {what}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].strip() if text else type(exc).__name__


def _os_reason(exc: OSError) -> str:
    return (exc.strerror or _first_line(exc)).lower()


def _read_imat(path: Path) -> Iterator[Record]:
    import ijson

    index = 0
    try:
        for obj in _imat_objects(path):
            yield make_record(index, obj)
            index += 1
    except ijson.JSONError as exc:
        where = f"record {index}: " if index else ""
        raise UserError(f"{path}: {where}not valid JSON ({_first_line(exc)})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: record {index}: not UTF-8 text ({_first_line(exc)})") from None
    if index == 0:
        _explain_no_images(path)


def _open_json(path: Path) -> Any:
    """The file, positioned after a UTF-8 byte order mark if it starts with one (as CSV
    reading allows; JSON parsers reject it, and editors on Windows write it)."""
    fh = open(path, "rb")
    if fh.read(len(_UTF8_BOM)) != _UTF8_BOM:
        fh.seek(0)
    return fh


class _SurrogateWatch:
    """A file wrapper that notes whether what was read so far holds a UTF-16 surrogate escape
    (\\ud800-\\udfff). The C parser turns a lone one into '?', silently; a pair (an emoji,
    say) is fine. A false alarm only costs the slower, exact parser."""

    _ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self._tail = b""
        self.seen = False

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        if not self.seen and (self._ESCAPE.search(self._tail + data[:3]) or self._ESCAPE.search(data)):
            self.seen = True
        self._tail = data[-3:]
        return data


def _imat_objects(path: Path) -> Iterator[Any]:
    """The items of the file's top-level `images` list, streamed with ijson's C parser; once
    the file turns out to escape UTF-16 surrogates, the remaining items are read again with
    ijson's pure-Python parser, which keeps a lone surrogate as such (so that `make_record`
    can reject it) instead of making it '?'."""
    import ijson

    done = 0
    with _open_json(path) as fh:
        watch = _SurrogateWatch(fh)
        try:
            for obj in _image_items(ijson.basic_parse(watch), path):
                if watch.seen:  # this item may come from the bytes just read
                    break
                yield obj
                done += 1
            else:
                return
        except (ijson.JSONError, UnicodeDecodeError):
            if not watch.seen:  # (a lone low surrogate makes the C parser fail on its own output)
                raise
    with _open_json(path) as fh:
        for k, obj in enumerate(_image_items(ijson.get_backend("python").basic_parse(fh), path)):
            if k >= done:
                yield obj


_OPENS = frozenset(("start_map", "start_array"))
_CLOSES = frozenset(("end_map", "end_array"))


def _image_items(events: Iterator[tuple[str, Any]], path: Path) -> Iterator[Any]:
    """What `ijson.items(file, "images.item")` yields, built from basic_parse events, but
    with the nesting depth capped at MAX_JSON_DEPTH. ijson's own prefixed events cost time
    quadratic in the depth before anything could stop them. Records are flat objects, built
    here directly; anything nested inside one goes through ijson's ObjectBuilder."""
    from ijson.common import ObjectBuilder

    depth = 0  # containers open around the current event
    key = None  # the last key seen in the top-level object or in the current record
    record: dict[str, Any] | None = None  # the record (an object in `images`) being built
    nested: ObjectBuilder | None = None  # a container inside a record, or a non-object item
    in_images = False
    count = 0
    for event, value in events:
        if event in _OPENS:
            depth += 1
            if depth > MAX_JSON_DEPTH:
                where = f"record {count}: " if in_images else ""
                raise UserError(f"{path}: {where}nested deeper than {MAX_JSON_DEPTH} levels; an iMaterialist "
                                "list is {\"images\": [{\"id\", \"url\", \"class\"}, ...]}")
        elif event in _CLOSES:
            depth -= 1
        if nested is not None:
            nested.event(event, value)
            if event in _CLOSES and depth == (3 if record is not None else 2):
                if record is not None:
                    record[key] = nested.value
                else:
                    yield nested.value
                    count += 1
                nested = None
        elif record is not None:
            if event == "map_key":
                key = value
            elif depth == 2:  # the record's end_map
                yield record
                count += 1
                record = None
            elif event in _OPENS:
                nested = ObjectBuilder()
                nested.event(event, value)
            else:
                record[key] = value
        elif in_images:
            if depth == 1:  # the list's end_array
                in_images = False
            elif event == "start_map":
                record = {}
            elif event == "start_array":
                nested = ObjectBuilder()
                nested.event(event, value)
            else:  # a scalar item: make_record says what is wrong with it
                yield value
                count += 1
        elif depth == 1 and event == "map_key":
            key = value
        elif depth == 2 and event == "start_array" and key == "images":
            in_images = True


def _explain_no_images(path: Path) -> None:
    """No record came out of `images.item`: say whether `images` is missing, not a list or empty."""
    import ijson

    with _open_json(path) as fh:  # shallow: _image_items has read it all under the depth cap
        events = ijson.parse(fh)
        try:
            first = next(events, None)
            if first is None:
                raise UserError(f"{path}: empty file; expected {{\"images\": [...]}}")
            if first[1] != "start_map":
                raise UserError(f"{path}: field 'images': missing; the file holds a JSON {first[1].replace('start_', '')}"
                                f", expected an object {{\"images\": [...]}}")
            for prefix, event, value in events:
                if prefix == "" and event == "map_key" and value == "images":
                    _, kind, _ = next(events)
                    if kind != "start_array":
                        raise UserError(f"{path}: field 'images': expected a list, got {kind.replace('start_', '')}")
                    raise UserError(f"{path}: field 'images': the list is empty")
        except ijson.JSONError as exc:
            raise UserError(f"{path}: not valid JSON ({_first_line(exc)})") from None
    raise UserError(f"{path}: field 'images': missing; expected {{\"images\": [{{\"id\", \"url\", \"class\"}}, ...]}}")


def _read_jsonl(path: Path) -> Iterator[Record]:
    index = 0
    try:
        with open(path, encoding="utf-8-sig") as fh:  # -sig: a byte order mark is skipped, as for CSV
            for line in fh:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield Record(index, "", None, None, "record", f"not valid JSON ({exc.msg})")
                except RecursionError:
                    yield Record(index, "", None, None, "record", "nested too deeply to be a record")
                else:
                    yield make_record(index, obj)
                index += 1
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: record {index}: not UTF-8 text ({_first_line(exc)})") from None


def _read_csv(path: Path) -> Iterator[Record]:
    index = 0
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            for needed in ("id", "url"):
                if needed not in header:
                    raise UserError(f"{path}: field '{needed}': missing from the header (columns: id,url[,class])")
            for row in reader:
                obj = {k: v for k, v in row.items() if k in ("id", "url", "class")}
                if obj.get("class") == "":
                    obj["class"] = None
                yield make_record(index, obj, from_text=True)
                index += 1
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: record {index}: not UTF-8 text ({_first_line(exc)})") from None
    except csv.Error as exc:
        raise UserError(f"{path}: record {index}: not valid CSV ({_first_line(exc)})") from None


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
    names = pf.schema_arrow.names
    for needed in ("id", "url"):
        if needed not in names:
            raise UserError(f"{path}: field '{needed}': missing (columns: id,url[,class])")
    columns = [c for c in ("id", "url", "class") if c in names]
    index = 0
    with pf:
        for batch in pf.iter_batches(columns=columns, batch_size=8192):
            for obj in batch.to_pylist():
                yield make_record(index, obj)
                index += 1


# --- the validation pass ----------------------------------------------------------------------

_INDEX_BITS = 40  # a record position is (source number << 40) | record index


def scan_sources(sources: Sequence[Source], *, limit: int | None = None,
                 skip_invalid: bool = False) -> ScanResult:
    """Validate every source completely before anything is fetched or written.

    Without `skip_invalid`, the first problem raises UserError naming file, record index and
    field. With it, invalid records (including the second and later copies of a duplicate
    id) are listed so that fetch records them as status=invalid.
    """
    if limit is not None and limit < 1:
        raise UserError("--limit must be at least 1")
    scans = [SourceScan(s) for s in sources]
    # Per split, for each record with a usable id: its id hash, its position, and whether
    # it is valid on its own. Duplicates are found from these once every source is read.
    id_keys: dict[str, _Buffer] = {}
    id_where: dict[str, _Buffer] = {}
    id_valid: dict[str, _Buffer] = {}
    for source_no, scan in enumerate(scans):
        src = scan.source
        keys = id_keys.setdefault(src.split, _Buffer())
        where = id_where.setdefault(src.split, _Buffer())
        valid = id_valid.setdefault(src.split, _Buffer(np.bool_))
        for rec in read_records(src, limit):
            scan.records += 1
            if not rec.valid:
                if not skip_invalid:
                    raise UserError(f"{src.path}: record {rec.index}: field '{rec.field_name}': {rec.problem}"
                                    " (--skip-invalid records such rows as status=invalid)")
                scan.invalid[rec.index] = f"field '{rec.field_name}': {rec.problem}"
            if rec.id and rec.field_name != "id":
                keys.append(record_key(src.split, rec.id))
                where.append((source_no << _INDEX_BITS) | rec.index)
                valid.append(rec.valid)

    split_keys: dict[str, np.ndarray] = {}
    for split, buf in id_keys.items():
        keys = buf.array()
        where = id_where[split].array()
        valid = id_valid[split].array()
        repeat = _repeats(keys, where)
        if repeat.any() and not skip_invalid:
            _raise_duplicate(scans, split, keys, where, repeat)
        for pos in where[repeat].tolist():
            scan = scans[pos >> _INDEX_BITS]
            scan.invalid.setdefault(pos & ((1 << _INDEX_BITS) - 1), "field 'id': duplicate id")
        invalid = [invalid_key(split, scan.source.path.name, i)
                   for scan in scans if scan.source.split == split for i in scan.invalid]
        # The key of each row fetch will write: the id hash for a valid record, the
        # position hash for an invalid one (its id may be missing or repeated).
        all_keys = np.concatenate([keys[valid & ~repeat], np.array(invalid, dtype=np.uint64)])
        all_keys.sort()
        split_keys[split] = all_keys
    return ScanResult(scans, split_keys)


def _repeats(keys: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Mask of the records whose id already appeared earlier (in source order)."""
    repeat = np.zeros(keys.size, dtype=bool)
    if keys.size < 2:
        return repeat
    order = np.lexsort((where, keys))  # by key, then position: the first copy comes first
    sorted_keys = keys[order]
    same = sorted_keys[1:] == sorted_keys[:-1]
    repeat[order[1:][same]] = True
    return repeat


def _raise_duplicate(scans: list[SourceScan], split: str, keys: np.ndarray, where: np.ndarray,
                     repeat: np.ndarray) -> None:
    mask = (1 << _INDEX_BITS) - 1
    first = int(where[repeat].min())
    scan = scans[first >> _INDEX_BITS]
    index = first & mask
    rec = _record_at(scan.source, index)
    earlier = int(where[keys == np.uint64(record_key(split, rec.id))].min())
    earlier_scan = scans[earlier >> _INDEX_BITS]
    also = f"record {earlier & mask}"
    if earlier_scan is not scan:
        also = f"{earlier_scan.source.path} {also}"
    raise UserError(f"{scan.source.path}: record {index}: field 'id': duplicate id {_show(rec.id)}"
                    f" (first at {also}; --skip-invalid records repeats as status=invalid)")


def _record_at(source: Source, index: int) -> Record:
    for rec in read_records(source, limit=index + 1):
        if rec.index == index:
            return rec
    raise UserError(f"{source.path}: changed while being read; run the command again")
