"""Pass 1 of clean: the per-row checks 1-4 (fetch_failed, broken, undersized, bad_aspect)
and the perceptual hash and signature of every row that passes them.

The perceptual hash is imagehash's `phash` (DCT of a 32x32 grayscale), packed MSB first as
`int(str(imagehash.phash(img)), 16)` and stored as a signed int64. For JPEG the image is
decoded with Pillow's `draft()` at the smallest DCT scale that keeps both sides >= 64 px:
every entropy-coded byte is still decoded (so truncation is still caught), only the inverse
DCT is done at reduced size (2-3x faster than a full decode). The hash can thus differ from
`phash` of a full-resolution decode by a few bits (none for most photos; 2, sometimes 4 or
8, where a DCT coefficient sits at the median phash thresholds on); every hash within imat
is computed the same way (`image_phash`), so distances between them are consistent.

The same decode gives the *signature* that confirms a phash candidate (`dedup.confirm_pairs`
compares them): an 8x8 luma thumbnail and 4x4 chroma thumbnails, 66 bytes (layout in
`dedup`), the luma from the 32x32 resize phash makes anyway. A colour JPEG is drafted as
YCbCr rather than L: its Y plane is the very plane an L draft gives (so the phash is
unchanged), and the chroma costs ~10% more decoding time, which computing phash's steps
here (one resize for phash and signature) rather than through imagehash wins back. The
32x32 grey image also gives the *window hashes* (`dedup.window_hashes`: crop windows and
halves, more candidates for the search), made for a whole batch at once in `hash_batch`.

Hashing runs in a process pool (spawn-safe: the worker is a top-level function over plain
bytes) fed with batches streamed one row group at a time, with at most two batches per
worker in flight, so only ids, labels, sizes and hashes of a split are held in memory
(`rows.Rows`), never its image bytes.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import signal
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pyarrow as pa
import scipy.fftpack
from PIL import Image

from imatdata import storage
from imatdata.clean.config import CleanConfig
from imatdata.clean.dedup import SIG_C_SIDE, SIG_Y_LEVELS, SIG_Y_SIDE, window_hashes
from imatdata.clean.report import ProgressFn
from imatdata.clean.rows import Rows, raw_batches
from imatdata.manifest import list_shards
from imatdata.procs import safe_path_children

# JPEG draft target for hashing: phash looks at 32x32, so 64 px leaves margin for resampling.
HASH_DRAFT_SIDE = 64
PHASH_SIDE = 32
_PHASH_FILTER = Image.Resampling.LANCZOS  # what imagehash.phash resizes with
PASS1_COLUMNS = ["id", "label", "url", "status", "error", "image", "width", "height",
                 "orig_width", "orig_height", "orig_bytes", "sha256"]

# One hashing task: split code, global index of its first row, the rows' metadata, their
# stored bytes (None where not looked at) and whether each needs a sha256 of those bytes.
Task = tuple[int, int, list[dict[str, Any]], list[bytes | None], list[bool]]


# --- image work (runs in worker processes) ---------------------------------------------------


def phash_int64(img: Image.Image) -> int:
    """imagehash's 64-bit phash of `img` as a signed int64 (bits MSB first)."""
    bits = np.packbits(imagehash.phash(img).hash.flatten())
    return int.from_bytes(bits.tobytes(), "big", signed=True)


def _decode_for_hash(data: bytes) -> tuple[Image.Image, int, int]:
    """Decode all of `data` (JPEG at reduced DCT scale); returns the image and its full size."""
    with warnings.catch_warnings():
        # A "possibly corrupt EXIF" or palette warning is not breakage; errors still raise.
        warnings.simplefilter("ignore")
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if img.format == "JPEG":
            # A colour JPEG comes out as YCbCr, a grey one stays L, CMYK stays CMYK.
            img.draft("YCbCr", (HASH_DRAFT_SIDE, HASH_DRAFT_SIDE))
        img.load()
    return img, width, height


def _look(img: Image.Image) -> tuple[int, bytes, np.ndarray]:
    """The phash, the signature and the 32x32 grey image (uint8) the window hashes are made of
    (`dedup.window_hashes`, a batch at a time)."""
    if img.mode != "YCbCr":
        # A grey, CMYK or non-JPEG image: imagehash converts it to L for the phash as it does
        # for any input; the signature wants YCbCr.
        ycc = img.convert("YCbCr")
        grey = np.asarray(ycc.getchannel(0).resize((PHASH_SIDE, PHASH_SIDE), _PHASH_FILTER))
        return phash_int64(img), _signature(grey, ycc), grey
    # imagehash.phash's own steps on the Y plane (bit for bit its result), done here so that
    # the signature and the window hashes reuse its 32x32 resize.
    grey = np.asarray(img.getchannel(0).resize((PHASH_SIDE, PHASH_SIDE), _PHASH_FILTER))
    dct = scipy.fftpack.dct(scipy.fftpack.dct(grey, axis=0), axis=1)[:8, :8].ravel()
    ranked = np.sort(dct)
    # np.median's value for 64 numbers, computed as it does (the mean of the middle two).
    bits = np.packbits(dct > (ranked[31] + ranked[32]) / 2)
    return int.from_bytes(bits.tobytes(), "big", signed=True), _signature(grey, img), grey


_CELL = PHASH_SIDE // SIG_Y_SIDE


def _signature(grey: np.ndarray, ycc: Image.Image) -> bytes:
    """The signature (layout in `dedup`): luma 8x8 (cell means of phash's 32x32, rounded half
    up as Pillow's `reduce` does) at 4 bits between its min and max, which lead, one byte
    each; then Cb and Cr 4x4 at 8 bits."""
    sums = grey.reshape(SIG_Y_SIDE, _CELL, SIG_Y_SIDE, _CELL).sum(axis=(1, 3), dtype=np.int32).ravel()
    y = (sums + _CELL * _CELL // 2) // (_CELL * _CELL)
    lo, hi = int(y.min()), int(y.max())
    span = max(hi - lo, 1)
    levels = (((y - lo) * (SIG_Y_LEVELS - 1) + span // 2) // span).astype(np.uint8)
    chroma = np.asarray(ycc.resize((SIG_C_SIDE, SIG_C_SIDE), Image.Resampling.BOX))[..., 1:]
    return bytes([lo, hi]) + ((levels[0::2] << 4) | levels[1::2]).tobytes() + np.moveaxis(chroma, 2, 0).tobytes()


def image_phash(data: bytes) -> int:
    """The phash clean stores for these image bytes (raises if they do not decode)."""
    img, _, _ = _decode_for_hash(data)
    return _look(img)[0]


def image_windows(data: bytes) -> np.ndarray:
    """The window hashes clean searches for these image bytes (`dedup.window_hashes`)."""
    img, _, _ = _decode_for_hash(data)
    return window_hashes(_look(img)[2])


def image_signature(data: bytes) -> bytes:
    """The signature clean compares for these image bytes (raises if they do not decode)."""
    img, _, _ = _decode_for_hash(data)
    return _look(img)[1]


@dataclass(frozen=True)
class HashedRow:
    phash: int | None
    width: int | None  # decoded size
    height: int | None
    error: str | None  # why the bytes are broken
    sha256: bytes | None  # digest of the stored bytes, when asked for
    signature: bytes | None = None  # what confirms a phash match (`image_signature`)
    windows: bytes | None = None  # more candidates: crop windows and halves (`image_windows`)


def hash_batch(images: Sequence[bytes | None], want_sha: Sequence[bool]) -> list[HashedRow]:
    """Decode and hash a batch of stored images. A top-level function: spawn-safe."""
    looked = [_hash_one(data, sha) for data, sha in zip(images, want_sha)]
    greys = [grey for _, grey in looked if grey is not None]
    windows = iter(window_hashes(np.stack(greys)) if greys else ())
    return [replace(row, windows=next(windows).tobytes()) if grey is not None else row for row, grey in looked]


def _hash_one(data: bytes | None, want_sha: bool) -> tuple[HashedRow, np.ndarray | None]:
    """The row's findings (windows still to come) and the grey 32x32 they come from."""
    if data is None:
        return HashedRow(None, None, None, "status is ok but the row has no image bytes", None), None
    digest = hashlib.sha256(data).digest() if want_sha else None
    try:
        img, width, height = _decode_for_hash(data)
        ph, signature, grey = _look(img)
    except Exception as exc:  # any decoder failure is the finding, not a crash
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return HashedRow(None, None, None, f"does not decode: {msg}", digest), None
    return HashedRow(ph, width, height, None, digest, signature), grey


def _ignore_sigint() -> None:
    """Hashing workers leave Ctrl-C to the parent, which stops the run with one line (each
    worker would otherwise print a KeyboardInterrupt traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- checks 1-4 for one row ------------------------------------------------------------------


def check_row(rows: Rows, g: int, meta: dict[str, Any], hashed: HashedRow | None, cfg: CleanConfig) -> None:
    """Checks 1-4 for one row; records the hash of rows that decode."""
    status = meta["status"]
    if status != "ok":
        err = meta["error"]
        rows.set_reason(g, "fetch_failed", f"status={status}" + (f": {err}" if err else ""))
        return
    assert hashed is not None
    if hashed.sha256 is not None:
        rows.sha[g] = hashed.sha256
    if _check_decoded(rows, g, meta, hashed):
        _check_size(rows, g, meta, hashed, cfg)


def _check_decoded(rows: Rows, g: int, meta: dict[str, Any], hashed: HashedRow) -> bool:
    """Check 2 (`broken`); whether the row passed it."""
    if hashed.error is not None:
        rows.set_reason(g, "broken", hashed.error)
        return False
    assert hashed.phash is not None and hashed.width is not None and hashed.height is not None
    assert hashed.signature is not None and hashed.windows is not None
    rows.phash[g] = hashed.phash
    rows.signature[g] = np.frombuffer(hashed.signature, np.uint8)
    rows.windows[g] = np.frombuffer(hashed.windows, np.uint64)
    rows.has_hash[g] = True
    sw, sh = meta["width"], meta["height"]
    if (sw is not None and sw != hashed.width) or (sh is not None and sh != hashed.height):
        rows.has_hash[g] = False
        rows.set_reason(g, "broken", f"stored bytes decode to {hashed.width}x{hashed.height} "
                                     f"but the manifest says {sw}x{sh}")
        return False
    return True


def _check_size(rows: Rows, g: int, meta: dict[str, Any], hashed: HashedRow, cfg: CleanConfig) -> None:
    """Checks 3-4 on the image as served; records the size that picks a group's keeper."""
    ow = meta["orig_width"] if meta["orig_width"] is not None else hashed.width
    oh = meta["orig_height"] if meta["orig_height"] is not None else hashed.height
    assert ow is not None and oh is not None
    rows.area[g] = int(ow) * int(oh)
    rows.served_bytes[g] = meta["orig_bytes"] if meta["orig_bytes"] is not None else 0
    short, long_ = min(ow, oh), max(ow, oh)
    if short < cfg.min_size:
        rows.set_reason(g, "undersized", f"original {ow}x{oh}, shorter side {short} < {cfg.min_size}")
    elif cfg.max_aspect and long_ > cfg.max_aspect * short:
        rows.set_reason(g, "bad_aspect", f"original {ow}x{oh}, aspect {long_ / short:.2f} > {cfg.max_aspect:g}")


# --- pass 1 over every split -----------------------------------------------------------------


def check_rows(raw: Path, splits: list[str], cfg: CleanConfig, progress: ProgressFn | None) -> Rows:
    """Checks 1-4 and the hash of every row of `raw/<split>` for `splits`, in that order."""
    counts = [_count_rows(raw / s) for s in splits]
    rows = Rows(splits=splits, offsets=[int(x) for x in np.cumsum([0] + counts[:-1])])
    total = sum(counts)
    rows.allocate(total)

    def absorb(code: int, g0: int, meta: list[dict[str, Any]], hashed: list[HashedRow]) -> None:
        for k, m in enumerate(meta):
            _record(rows, g0 + k, code, m)
            check_row(rows, g0 + k, m, hashed[k] if m["status"] == "ok" else None, cfg)
        if progress:
            progress("hash", g0 + len(meta), total)

    # A pool is not worth starting for fewer batches than workers.
    workers = min(cfg.n_workers, max(1, -(-total // cfg.batch_rows)))
    tasks = _tasks(raw, rows, cfg.batch_rows)
    if workers == 1:
        for code, g0, meta, images, want in tasks:
            absorb(code, g0, meta, hash_batch(images, want))
    else:
        _hash_in_pool(tasks, workers, cfg.start_method, absorb)
    return rows


def _count_rows(split_path: Path) -> int:
    total = 0
    for shard in list_shards(split_path):
        with storage.parquet_file(shard) as f:
            total += f.metadata.num_rows
    return total


def _tasks(raw: Path, rows: Rows, batch_rows: int) -> Iterator[Task]:
    """Every split's rows as hashing tasks, in order; fills `rows.ids` as it goes."""
    for code, split in enumerate(rows.splits):
        g = rows.offsets[code]
        id_chunks = []
        for batch in raw_batches(raw / split, PASS1_COLUMNS, batch_rows):
            id_chunks.append(batch.column("id"))
            meta = batch.drop_columns(["image"]).to_pylist()
            images = batch.column("image").to_pylist()
            for k, m in enumerate(meta):
                if m["status"] != "ok":
                    images[k] = None  # a failed row's bytes (if any) are not looked at
            want = [m["status"] == "ok" and not m["sha256"] for m in meta]
            yield code, g, meta, images, want
            g += len(meta)
        rows.ids.append(pa.concat_arrays(id_chunks) if id_chunks else pa.array([], pa.string()))


def _record(rows: Rows, g: int, code: int, meta: dict[str, Any]) -> None:
    """What every row contributes to grouping, whatever its checks find."""
    rows.split_code[g] = code
    if meta["label"] is not None:
        rows.label[g] = meta["label"]
        rows.has_label[g] = True
    rows.url_key[g] = _url_key(meta["url"])
    if meta["sha256"]:
        try:
            rows.sha[g] = bytes.fromhex(meta["sha256"])
        except ValueError:
            rows.sha[g] = hashlib.sha256(meta["sha256"].encode()).digest()


def _url_key(url: str | None) -> int:
    if url is None:
        return 0
    return int.from_bytes(hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _hash_in_pool(tasks: Iterator[Task], workers: int, start_method: str,
                  absorb: Callable[[int, int, list[dict[str, Any]], list[HashedRow]], None]) -> None:
    """Hash `tasks` in a process pool, absorbing results in task order."""
    ctx = multiprocessing.get_context(start_method)
    with safe_path_children(), ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                                   initializer=_ignore_sigint) as pool:
        # Bounded: at most two batches per worker are in flight, so a million-row split
        # never has more than a few hundred images' bytes in memory.
        pending: deque[tuple[int, int, list[dict[str, Any]], Future[list[HashedRow]]]] = deque()
        for code, g0, meta, images, want in tasks:
            pending.append((code, g0, meta, pool.submit(hash_batch, images, want)))
            while len(pending) >= 2 * workers:
                c, g, m, fut = pending.popleft()
                absorb(c, g, m, fut.result())
        while pending:
            c, g, m, fut = pending.popleft()
            absorb(c, g, m, fut.result())
