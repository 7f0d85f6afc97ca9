"""URL lists (train/val/test in the iMaterialist JSON, JSON Lines or CSV) for a running server."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from imatdata.storage import AtomicFile
from imatsample.catalogue import Catalogue

# --------------------------------------------------------------------------------------------
# URL lists


class _HasUrl(Protocol):
    def url(self, path: str, host: str = ...) -> str: ...


def _joined(parts: Iterator[str], sep: str) -> Iterator[str]:
    """Like sep.join(parts), but streamed."""
    for i, part in enumerate(parts):
        yield sep + part if i else part


def write_lists(catalogue: Catalogue, srv: _HasUrl, out_dir: Path | str, fmt: str = "json",
                splits: Sequence[str] | None = None) -> dict[str, Path]:
    """Write one list per split (train.json, val.json, test.json, ...) pointing at `srv`.

    fmt: "json" (iMaterialist: {"images": [...]}), "jsonl" or "csv" (id,url[,class]).
    Records stream to disk, so a million-record catalogue is never built in memory.
    """
    if fmt not in ("json", "jsonl", "csv"):
        raise ValueError(f"unknown list format {fmt!r}; use json, jsonl or csv")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for split in splits or catalogue.splits:
        final = out / f"{split}.{fmt}"
        with AtomicFile(final) as a, io.TextIOWrapper(a.open(), encoding="utf-8", newline="") as f:
            if fmt == "json":
                f.write('{"images": [\n')
                f.writelines(_joined(catalogue.iter_json(split, srv.url), ",\n"))
                f.write("\n]}\n")
            elif fmt == "jsonl":
                f.writelines(_joined(catalogue.iter_json(split, srv.url), "\n"))
                f.write("\n")
            else:
                w = csv.writer(f)
                w.writerow(["id", "url"] + ([] if split == "test" else ["class"]))
                for rec in catalogue.iter_records(split, srv.url):
                    w.writerow([rec["id"], rec["url"]] + ([rec["class"]] if "class" in rec else []))
        written[split] = final
    return written
