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
unchanged). The 32x32 grey image also gives the *window hashes* (`dedup.window_hashes`: crop
windows and halves, more candidates for the search), the *fine hashes* that a confirmed
candidate must also pass (`dedup.fine_hashes`) and, with an 8x8 grid of chroma means, the crop
windows' own signatures (`dedup.crop_window_signatures`).

The resizes are Pillow's (Lanczos to 32x32 as imagehash does, BOX to 4x4 for the chroma),
computed here as matrix products with weights made once per image size, bit for bit what
Pillow 13 gives (`_resize`); a batch's colour JPEG drafts go through them together
(`_batch_planes`), and the DCTs, signatures and windows are made for the whole batch. All of
it costs about what imagehash's phash alone did with an L draft (0.96-1.03x as many images a
second in CPU time), and the phash is unchanged bit for bit.

Hashing runs in a process pool (spawn-safe: the worker is a top-level function over plain
bytes) fed with batches streamed one row group at a time, with at most two batches per
worker in flight, so only ids, labels, sizes and hashes of a split are held in memory
(`rows.Rows`), never its image bytes.
"""

from __future__ import annotations

import hashlib
import io
import math
import multiprocessing
import signal
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pyarrow as pa
import scipy.fftpack
from PIL import Image

from imatdata import storage
from imatdata.clean.config import CleanConfig
from imatdata.clean.dedup import (CHROMA_GRID, SIG_C_SIDE, SIG_Y_SIDE, area_weights, crop_window_signatures,
                                  fine_hashes, pack_signatures, window_hashes)
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
    """Decode all of `data` (JPEG at reduced DCT scale); returns the image and its full size.
    A "possibly corrupt EXIF" or palette warning is not breakage (callers silence warnings);
    errors still raise."""
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    if img.format == "JPEG":
        # A colour JPEG comes out as YCbCr, a grey one stays L, CMYK stays CMYK.
        img.draft("YCbCr", (HASH_DRAFT_SIDE, HASH_DRAFT_SIDE))
    img.load()
    return img, width, height


# Pillow's resampling (libImaging/Resample.c) as matrix products. Each output pixel of a pass is
# a weighted sum of input pixels along one axis; the weights are the filter's values, normalised
# to sum to 1 and rounded to fixed point with 22 fractional bits, and each pass rounds and clips
# its result to 0..255. The weights depend only on the sizes, so they are made once per size, in
# the same double arithmetic as Pillow's C; the sums of integers are exact in float64. The
# result is Pillow's `resize` bit for bit (tested against it) for about 60% of the time a
# Pillow call takes here, which works out every weight, sines included, each time.
_PRECISION_BITS = 22
_ROUND = float(1 << (_PRECISION_BITS - 1))
_UNIT = 1.0 / (1 << _PRECISION_BITS)
# Weight matrices kept per worker (bytes): ~130 sizes of ~32 KB cover stored JPEGs' drafts.
_WEIGHTS_BUDGET = 16 << 20
_weights_cache: dict[tuple[int, int, int], np.ndarray] = {}
# The image goes through the matrix products in slices: at most _GEMM_MAX multiply-adds a
# product (OpenBLAS runs bigger ones on several threads, which here, one hashing process per
# core, only burns CPU time: 5x at 128 x 128 pixels), and at most _CHUNK_MAX pixels a slice
# (its float64 copy, 64 KiB, stays below glibc's mmap threshold: a fresh mapping per image,
# page faults included, cost more than the whole resize). Any image size takes bounded memory.
_GEMM_MAX = 1 << 18
_CHUNK_MAX = 1 << 13
# Images resized with the batch (`_batch_planes`) are at most this wide (and 256 tall): the
# scratch buffer stays under 7 MB.
_BATCH_MAX_WIDTH = 1024


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


_FILTERS: dict[int, tuple[Callable[[float], float], float]] = {
    Image.Resampling.LANCZOS: (_lanczos, 3.0), Image.Resampling.BOX: (_box, 0.5)}


def _weights(in_size: int, out_size: int, resample: int) -> np.ndarray:
    """(out_size, in_size) float64: the fixed-point weights of Pillow's pass from `in_size`
    pixels to `out_size` (`precompute_coeffs` and `normalize_coeffs_8bpc`), as integers."""
    return _cached((in_size, out_size, resample), lambda: _pillow_weights(in_size, out_size, resample))


def _cached(key: tuple[int, int, int], make: Callable[[], np.ndarray]) -> np.ndarray:
    """A weight matrix from the process's cache (emptied when it would pass its budget)."""
    found = _weights_cache.get(key)
    if found is None:
        found = make()
        if sum(w.nbytes for w in _weights_cache.values()) + found.nbytes > _WEIGHTS_BUDGET:
            _weights_cache.clear()
        _weights_cache[key] = found
    return found


def _pillow_weights(in_size: int, out_size: int, resample: int) -> np.ndarray:
    fn, support = _FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    inv = 1.0 / filterscale
    out = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        values = [fn((x + lo - center + 0.5) * inv) for x in range(min(int(center + support + 0.5), in_size) - lo)]
        total = 0.0
        for v in values:  # summed in order, as Pillow does
            total += v
        for x, v in enumerate(values):
            k = v / total if total != 0.0 else v
            out[xx, lo + x] = int(-0.5 + k * (1 << _PRECISION_BITS)) if k < 0 else int(0.5 + k * (1 << _PRECISION_BITS))
    return out


def _fixed(acc: np.ndarray) -> np.ndarray:
    """A pass's fixed-point sums as Pillow stores them: rounded, clipped to 0..255 (in place)."""
    acc += _ROUND
    acc *= _UNIT
    np.floor(acc, out=acc)
    return np.clip(acc, 0.0, 255.0, out=acc)


def _steps(size: int, step: int) -> range:
    return range(0, size, max(1, step))


def _resize(planes: np.ndarray, out_w: int, out_h: int, resample: int) -> np.ndarray:
    """Pillow's `Image.resize` of uint8 planes `(k, h, w)` to `(k, out_h, out_w)`, as float64
    holding the uint8 values. Like Pillow 13, the vertical pass runs first when the height
    shrinks more than twice as much as the width, else the horizontal."""
    k, h, w = planes.shape

    def across(p: np.ndarray) -> np.ndarray:
        return _fixed(_across(p, _weights(w, out_w, resample).T))

    def down(p: np.ndarray) -> np.ndarray:
        weights = _weights(h, out_h, resample)
        step = min(_GEMM_MAX // (h * out_h), _CHUNK_MAX // (k * h))
        parts = [np.matmul(weights, p[:, :, c:c + step]) for c in _steps(p.shape[2], step)]
        return _fixed(np.concatenate(parts, axis=2))

    if h == out_h and w == out_w:
        return planes.astype(np.float64)
    if w == out_w:
        return down(planes)
    if h == out_h:
        return across(planes)
    if h - out_h > 0 and h - out_h > 2 * (w - out_w):
        return across(down(planes))
    return down(across(planes))


def _area_means(planes: np.ndarray, cells: int) -> np.ndarray:
    """Area means of uint8 planes (k, h, w) over cells x cells equal cells of the whole image."""
    h, w = planes.shape[1:]
    return np.matmul(_area_weights(h, cells), _across(planes, _area_weights(w, cells).T))


def _area_weights(side: int, cells: int) -> np.ndarray:
    return _cached((side, cells, -1), lambda: area_weights(side, cells))


def _planes(img: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What the hashes and the signatures are made of, float64: phash's 32x32 grey
    (imagehash's `convert("L").resize((32, 32), LANCZOS)`), the 32x32 luma of the signature
    and the windows, the (2, 4, 4) chroma (Cb, Cr) of the signature (a BOX resize of the
    YCbCr image) and the (2, CHROMA_GRID, CHROMA_GRID) chroma the crop windows' come from."""
    if img.mode == "YCbCr":
        # A colour JPEG's draft: its Y plane is the very plane an L draft gives, so phash and
        # signature share one resize.
        ycc = np.asarray(img)
        luma = _resize(ycc[None, :, :, 0], PHASH_SIDE, PHASH_SIDE, _PHASH_FILTER)[0]
        grey = luma
    else:
        # A grey, CMYK or non-JPEG image: phash converts it to L as imagehash does for any
        # input; the signature wants YCbCr.
        grey = _resize(np.asarray(img.convert("L"))[None], PHASH_SIDE, PHASH_SIDE, _PHASH_FILTER)[0]
        ycc = np.asarray(img.convert("YCbCr"))
        luma = _resize(ycc[None, :, :, 0], PHASH_SIDE, PHASH_SIDE, _PHASH_FILTER)[0]
    return (grey, luma, *_chroma(np.moveaxis(ycc[..., 1:], 2, 0)))


def _chroma(planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The signature's chroma (Pillow's BOX resize of uint8 planes (2, h, w) to 4x4) and the
    crop windows' chroma grid (`_area_means`), their horizontal passes in one product where
    Pillow's resize makes that pass first."""
    k, h, w = planes.shape
    side = SIG_C_SIDE
    if w == side or h == side or (h - side > 0 and h - side > 2 * (w - side)):
        return _resize(planes, side, side, Image.Resampling.BOX), _area_means(planes, CHROMA_GRID)
    acc = _across(planes, _chroma_weights(w))
    box = _fixed(np.matmul(_weights(h, side, Image.Resampling.BOX), _fixed(acc[..., :side])))
    return box, np.matmul(_area_weights(h, CHROMA_GRID), acc[..., side:])


def _first_look(img: Image.Image) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For `_batch_planes`: a colour JPEG draft whose resizes make the horizontal pass first
    (all but images more than twice as tall as wide) as its (h, w, 3) YCbCr array, to be
    resized with the batch; any other image's `_planes` (which raise if it cannot be read)."""
    w, h = img.size
    if (img.mode != "YCbCr" or min(w, h) <= PHASH_SIDE or h > 2 * w - PHASH_SIDE
            or h * PHASH_SIDE * PHASH_SIDE > _GEMM_MAX or w > _BATCH_MAX_WIDTH):
        return _planes(img)
    return np.asarray(img)


def _batch_planes(looks: Sequence[np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`_planes` of every image (`_first_look`s), stacked (n, ...). The YCbCr arrays go through
    the same arithmetic in fewer, larger steps: each image's horizontal passes are one product
    (luma; chroma for the signature and the grid together), and the rounding of all the
    images' passes is done at once."""
    n = len(looks)
    greys, lumas = np.empty((n, PHASH_SIDE, PHASH_SIDE)), np.empty((n, PHASH_SIDE, PHASH_SIDE))
    chromas, grids = np.empty((n, 2, SIG_C_SIDE, SIG_C_SIDE)), np.empty((n, 2, CHROMA_GRID, CHROMA_GRID))
    batched: list[tuple[int, int]] = []  # (position, height)
    across_y: list[np.ndarray] = []
    across_c: list[np.ndarray] = []
    for k, look in enumerate(looks):
        if isinstance(look, tuple):
            greys[k], lumas[k], chromas[k], grids[k] = look
            continue
        h, w = look.shape[:2]
        planes = _as_float(look)
        across_y.append(_across(planes[:1], _weights(w, PHASH_SIDE, _PHASH_FILTER).T)[0])
        across_c.append(_across(planes[1:], _chroma_weights(w)))
        batched.append((k, h))
    if batched:
        y = _fixed(np.concatenate(across_y))
        c = np.concatenate(across_c, axis=1)
        _fixed(c[..., :SIG_C_SIDE])
        top = 0
        for k, h in batched:
            rows = slice(top, top + h)
            np.matmul(_weights(h, PHASH_SIDE, _PHASH_FILTER), y[rows], out=lumas[k])
            np.matmul(_weights(h, SIG_C_SIDE, Image.Resampling.BOX), c[:, rows, :SIG_C_SIDE], out=chromas[k])
            np.matmul(_area_weights(h, CHROMA_GRID), c[:, rows, SIG_C_SIDE:], out=grids[k])
            top += h
        at = [k for k, _ in batched]
        lumas[at] = _fixed(lumas[at])
        greys[at] = lumas[at]
        chromas[at] = _fixed(chromas[at])
    return greys, lumas, chromas, grids


# One buffer per process holds the image being resized as float64 planes (3, h, w): a fresh
# array of that size (over glibc's mmap threshold) costs page faults that outweigh the resize.
# Hashing runs one batch at a time in each process, so one buffer serves every image in turn.
_scratch = np.empty(0)


def _as_float(ycc: np.ndarray) -> np.ndarray:
    """The (h, w, 3) uint8 image as (3, h, w) float64, in the process's scratch buffer (valid
    until the next call)."""
    global _scratch
    h, w, k = ycc.shape
    if _scratch.size < k * h * w:
        _scratch = np.empty(max(k * h * w, 2 * _scratch.size))
    planes = _scratch[:k * h * w].reshape(k, h, w)
    np.copyto(planes, np.moveaxis(ycc, 2, 0))
    return planes


def _across(planes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Planes (k, h, w) times weights (w, m), in slices of rows (`_GEMM_MAX`; uint8 planes,
    cast to float64 a slice at a time, also `_CHUNK_MAX`)."""
    k, h, w = planes.shape
    step = _GEMM_MAX // (w * weights.shape[1])
    if planes.dtype != np.float64:
        step = min(step, _CHUNK_MAX // (k * w))
    if step >= h:
        return np.matmul(planes, weights)
    return np.concatenate([np.matmul(planes[:, r:r + step], weights) for r in _steps(h, step)], axis=1)


def _chroma_weights(w: int) -> np.ndarray:
    """(w, 4 + CHROMA_GRID): the horizontal weights of the signature's chroma (Pillow's BOX to
    4) and of the grid (area means), side by side."""
    return _cached((w, SIG_C_SIDE, -CHROMA_GRID), lambda: np.concatenate(
        [_weights(w, SIG_C_SIDE, Image.Resampling.BOX).T, _area_weights(w, CHROMA_GRID).T], axis=1))


def _looks(greys: np.ndarray, lumas: np.ndarray, chromas: np.ndarray, grids: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For a batch of `_planes` stacked: the phashes (n,) int64, signatures (n, SIG_BYTES)
    uint8, window hashes (n, N_WINDOWS) uint64, crop windows' signatures (n,
    len(CROP_WINDOWS), SIG_BYTES) uint8 and fine hashes (n, N_FINE_VIEWS, FINE_BYTES) uint8."""
    n = greys.shape[0]
    # imagehash.phash's steps, a batch at once (the same values: each 1-D DCT is computed alone
    # either way): the DCT of the columns, then of the first 8 rows, its 8x8 low corner against
    # its median (np.median of 64 numbers: the mean of the middle two).
    dct = scipy.fftpack.dct(scipy.fftpack.dct(greys, axis=1)[:, :8], axis=2)[:, :, :8].reshape(n, 64)
    ranked = np.sort(dct, axis=1)
    bits = dct > ((ranked[:, 31] + ranked[:, 32]) / 2)[:, None]
    phashes = np.packbits(bits, axis=1).view(">i8")[:, 0].astype(np.int64)
    # Luma cells: means of 4x4 blocks of the 32x32, rounded half up as Pillow's `reduce` does.
    sums = lumas.reshape(n, SIG_Y_SIDE, _CELL, SIG_Y_SIDE, _CELL).sum(axis=(2, 4)).reshape(n, -1).astype(np.int32)
    signatures = pack_signatures((sums + _CELL * _CELL // 2) // (_CELL * _CELL), chromas.reshape(n, -1))
    return phashes, signatures, window_hashes(lumas), crop_window_signatures(lumas, grids), fine_hashes(lumas)


_CELL = PHASH_SIDE // SIG_Y_SIDE


def _look_one(data: bytes) -> tuple[int, bytes, np.ndarray, np.ndarray, np.ndarray]:
    """The phash, signature, window hashes, crop windows' signatures and fine hashes of one
    image (raises if it does not decode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img, _, _ = _decode_for_hash(data)
        look = _first_look(img)
    ph, sig, win, crop_sig, fine = _looks(*_batch_planes([look]))
    return int(ph[0]), sig[0].tobytes(), win[0], crop_sig[0], fine[0]


def image_phash(data: bytes) -> int:
    """The phash clean stores for these image bytes (raises if they do not decode)."""
    return _look_one(data)[0]


def image_windows(data: bytes) -> np.ndarray:
    """The window hashes clean searches for these image bytes (`dedup.window_hashes`)."""
    return _look_one(data)[2]


def image_signature(data: bytes) -> bytes:
    """The signature clean compares for these image bytes (raises if they do not decode)."""
    return _look_one(data)[1]


def image_crop_signatures(data: bytes) -> np.ndarray:
    """The crop windows' signatures (len(CROP_WINDOWS), SIG_BYTES) for these image bytes."""
    return _look_one(data)[3]


def image_fine_hashes(data: bytes) -> np.ndarray:
    """The fine hashes (N_FINE_VIEWS, FINE_BYTES) clean compares for these image bytes."""
    return _look_one(data)[4]


@dataclass(frozen=True)
class HashedRow:
    phash: int | None
    width: int | None  # decoded size
    height: int | None
    error: str | None  # why the bytes are broken
    sha256: bytes | None  # digest of the stored bytes, when asked for
    signature: bytes | None = None  # what confirms a phash match (`image_signature`)
    windows: bytes | None = None  # more candidates: crop windows and halves (`image_windows`)
    crop_signatures: bytes | None = None  # the crop windows' own signatures, one after another
    fine: bytes | None = None  # the fine hashes, whole picture then crop windows (`image_fine_hashes`)


def hash_batch(images: Sequence[bytes | None], want_sha: Sequence[bool]) -> list[HashedRow]:
    """Decode and hash a batch of stored images. A top-level function: spawn-safe. Each image
    is decoded and resized alone; the DCTs, signatures and windows are made for the batch."""
    out: list[HashedRow | None] = []
    sizes: list[tuple[int, int, int, bytes | None]] = []  # (position, width, height, sha256)
    looks: list[np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for data, sha in zip(images, want_sha):
            if data is None:
                out.append(HashedRow(None, None, None, "status is ok but the row has no image bytes", None))
                continue
            digest = hashlib.sha256(data).digest() if sha else None
            try:
                img, width, height = _decode_for_hash(data)
                looks.append(_first_look(img))
            except Exception as exc:  # any decoder failure is the finding, not a crash
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                out.append(HashedRow(None, None, None, f"does not decode: {msg}", digest))
                continue
            sizes.append((len(out), width, height, digest))
            out.append(None)
    if looks:
        phashes, signatures, windows, crop_signatures, fine = _looks(*_batch_planes(looks))
        for k, (pos, width, height, digest) in enumerate(sizes):
            out[pos] = HashedRow(int(phashes[k]), width, height, None, digest, signatures[k].tobytes(),
                                 windows[k].tobytes(), crop_signatures[k].tobytes(), fine[k].tobytes())
    return out  # type: ignore[return-value]


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
    assert hashed.signature is not None and hashed.windows is not None and hashed.crop_signatures is not None
    assert hashed.fine is not None
    rows.phash[g] = hashed.phash
    rows.signature[g] = np.frombuffer(hashed.signature, np.uint8)
    rows.windows[g] = np.frombuffer(hashed.windows, np.uint64)
    rows.crop_signatures[g] = np.frombuffer(hashed.crop_signatures, np.uint8).reshape(rows.crop_signatures.shape[1:])
    rows.fine[g] = np.frombuffer(hashed.fine, np.uint8).reshape(rows.fine.shape[1:])
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
