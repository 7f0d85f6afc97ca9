"""Image work as pure functions over bytes: sniff, bomb check, decode, upright, RGB, resize.

This is the CPU-heavy half of fetch and runs in worker processes, so it imports only Pillow,
the standard library and fetch's `config` (itself stdlib-only), and OpenCV when an image takes
its fast path (`_area_jpeg`): a spawned worker stays small. Its entry point, `process_image`,
is a picklable top-level function returning a plain dataclass.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps

# The defaults are the flags' (config), re-exported here for callers of the image work alone.
from imatdata.fetch.config import DEFAULT_MAX_PIXELS, DEFAULT_RESIZE_FILTER, MIB, RESIZE_FILTER_NAMES

# What decoding one image may allocate, judged from its header before any pixel is decoded
# (`decode_cost`). Near the pixel limit a PNG costs up to 9x this (a 9000x9000 RGBA PNG is
# 309 MiB of pixels, 1 GiB once converted) while a 512 px target needs none of it; 128 MiB
# still takes a 24-megapixel camera image in any format, and every baseline JPEG under the
# pixel limit (decoded at 1/8 scale).
DEFAULT_MAX_DECODE_BYTES = 128 * MIB
# Images costing more than this are decoded one at a time per pool (the worker holds the
# pool's heavy slot, see `imagepool`), so N workers never hold N large images at once.
HEAVY_DECODE_BYTES = 16 * MIB
# Decoded images above this are converted and shrunk a strip at a time, so the conversion to
# RGB (up to 3 full-size copies) never exists at full size.
STRIP_BYTES = 8 * MIB
# Bytes per pixel of Pillow's in-memory modes (RGB is stored as 4 bytes, like RGBA).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# Formats whose decoder holds copies of the whole frame beside Pillow's: libwebp's frame, its
# canvas and the bytes it hands over (measured: 4x); libtiff's RGBA reader.
_FORMAT_COPIES = {"webp": 4, "avif": 4, "tiff": 2}
JPEG_QUALITY = 90
# Pillow's filter for each `--resize-filter` name (config.RESIZE_FILTER_NAMES says why each).
# Built from the names so a name added there without a filter here fails at import.
_PILLOW_FILTERS = {
    "area": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
RESIZE_FILTERS = {name: _PILLOW_FILTERS[name] for name in RESIZE_FILTER_NAMES}
ORIENTATION_TAG = 0x0112

# Magic numbers of the formats Pillow decodes and the web serves. The id's extension and the
# Content-Type are never trusted: only these bytes are.
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"GIF87a", 0, "gif"),
    (b"GIF89a", 0, "gif"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
    (b"\x00\x00\x01\x00", 0, "ico"),
)


@dataclass(frozen=True)
class ImageResult:
    """The outcome of the image work for one body; `status` is a manifest status."""

    status: str  # ok | not_image | decode_error | too_large
    error: str | None = None
    image: bytes | None = None
    image_format: str | None = None
    width: int | None = None
    height: int | None = None
    orig_width: int | None = None
    orig_height: int | None = None
    orig_bytes: int = 0
    sha256: str | None = None


def sniff(body: bytes) -> str | None:
    """The image format the bytes say they are, or None (HTML, text, empty, unknown)."""
    for magic, offset, name in _MAGIC:
        if body[offset:offset + len(magic)] == magic:
            return name
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "webp"
    if body[4:8] == b"ftyp" and body[8:12] in (b"avif", b"avis"):
        return "avif"
    return None


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the longer side at most `max_side` (0 = no limit), aspect ratio kept."""
    longest = max(width, height)
    if max_side <= 0 or longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block is not a broken image; treat it as upright
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_rgb(img: Image.Image, grey_range: tuple[float, float] | None = None) -> Image.Image:
    """RGB with any transparency flattened on white; CMYK, palette, grey and 16-bit handled.

    `grey_range` is the (min, max) that 32-bit grey ("I", "F") is stretched over; by default
    the image's own. A strip of a larger image passes the whole image's range.
    """
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "RGBa", "La", "PA") or (
        img.mode == "P" and "transparency" in img.info) or (
        img.mode in ("L", "RGB", "I", "I;16") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and float greys: scale to 8 bits instead of letting convert() clip them.
        lo, hi = (grey_range or img.getextrema()) if img.mode in ("I", "F") else (0, 65535)
        span = (hi - lo) or 1
        img = img.point(lambda v: (v - lo) * 255.0 / span) if img.mode in ("I", "F") else \
            img.convert("I").point(lambda v: v * 255.0 / 65535)
        return img.convert("L").convert("RGB")
    return img.convert("RGB")


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def pixel_bytes(img: Image.Image) -> int:
    """Bytes Pillow holds for `img`'s pixels at its current size and mode."""
    return img.width * img.height * _MODE_BYTES.get(img.mode, 4)


def decode_cost(img: Image.Image, kind: str, full_size: tuple[int, int]) -> int:
    """Bytes that decoding `img` allocates, from its header alone (after any `draft`): the
    pixels, the decoder's own copies of the frame, and a progressive JPEG's coefficient
    buffer (libjpeg keeps every DCT coefficient of the full-size image until the last
    scan, whatever the scale it outputs at: 243 MiB for a 9000x9000 photo)."""
    cost = pixel_bytes(img) * _FORMAT_COPIES.get(kind, 1)
    layers = getattr(img, "layer", None)
    if kind == "jpeg" and img.info.get("progressive") and layers:
        hmax = max(h for _, h, _, _ in layers) or 1
        vmax = max(v for _, _, v, _ in layers) or 1
        width, height = full_size
        for _, h, v, _ in layers:
            blocks_w = _ceil_div(_ceil_div(width * h, hmax), 8)
            blocks_h = _ceil_div(_ceil_div(height * v, vmax), 8)
            cost += blocks_w * blocks_h * 64 * 2  # 64 coefficients of 2 bytes per 8x8 block
    return cost


# EXIF orientation -> the transpose that turns the stored image upright (as ImageOps does).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_STRIP_PIXELS = 1 << 18


def shrink_in_strips(img: Image.Image, max_side: int) -> Image.Image:
    """`to_rgb(img)` box-reduced by a whole factor that leaves at least twice `max_side`
    (none with `max_side` 0), built a strip at a time: the conversions (up to three copies of
    the image at 4 bytes a pixel) only ever exist for one strip. Strips are a multiple of the
    factor high, so the result equals reducing the whole converted image at once."""
    width, height = img.size
    tw, th = target_size(width, height, max_side)
    factor = max(1, min(width // tw, height // th) // 2)
    rows = max(factor, _STRIP_PIXELS // width // factor * factor)
    grey_range = img.getextrema() if img.mode in ("I", "F") else None
    out = Image.new("RGB", (_ceil_div(width, factor), _ceil_div(height, factor)))
    for top in range(0, height, rows):
        strip = to_rgb(img.crop((0, top, width, min(height, top + rows))), grey_range)
        out.paste(strip.reduce(factor) if factor > 1 else strip, (0, top // factor))
    return out


def process_image(body: bytes, max_side: int = 512, max_pixels: int = DEFAULT_MAX_PIXELS,
                  resize_filter: str = DEFAULT_RESIZE_FILTER, max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
                  heavy_slot: Callable[[], AbstractContextManager[object]] = nullcontext) -> ImageResult:
    """Turn a served body into the stored image (or say why not).

    Keeps `body` byte for byte when it is already an RGB JPEG, upright and within
    `max_side`; otherwise decodes fully, turns it upright (EXIF), converts to RGB on white,
    shrinks the longer side to `max_side` (with `resize_filter`, a RESIZE_FILTERS name) and
    re-encodes as JPEG q90. `orig_width` and `orig_height` are the served image's size as
    displayed (after the EXIF rotation).

    Memory: an image whose decoding would allocate more than `max_decode_bytes`
    (`decode_cost`, from the header) is refused as too_large before any pixel is decoded;
    one costing over HEAVY_DECODE_BYTES is decoded inside `heavy_slot()` (the pool's
    one-at-a-time lock) and converted in strips, so a worker's peak stays near the cost.
    """
    size = len(body)
    digest = hashlib.sha256(body).hexdigest()
    base: dict[str, Any] = {"orig_bytes": size, "sha256": digest}
    if size == 0:
        return ImageResult("not_image", "empty body", **base)
    kind = sniff(body)
    if kind is None:
        return ImageResult("not_image", f"not an image ({_describe(body)})", **base)
    with warnings.catch_warnings():
        # Our own pixel limit decides; Pillow's warning would only add noise in workers.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(body))
        except Image.DecompressionBombError as exc:
            return ImageResult("too_large", f"decompression bomb ({_first_line(exc)})", **base)
        except Exception as exc:  # Pillow raises many types for unreadable headers
            return ImageResult("decode_error", f"unreadable {kind} header ({_first_line(exc)})", **base)
        with img:
            width, height = img.size
            if width <= 0 or height <= 0:
                return ImageResult("decode_error", f"{kind} with an empty size {width}x{height}", **base)
            if width * height > max_pixels:
                return ImageResult("too_large", f"{width}x{height} pixels exceeds the limit of {max_pixels}", **base)
            source_mode = img.mode
            is_jpeg = img.format == "JPEG"
            target = target_size(width, height, max_side)
            if is_jpeg and target != (width, height) and max(width, height) >= 2 * max(target):
                # DCT scaling decodes at 1/2, 1/4 or 1/8 for a fraction of the cost; it never
                # goes below the requested size, so the resize below still does the rest.
                img.draft("RGB", target)
            cost = decode_cost(img, kind, (width, height))
            if (is_jpeg and source_mode == "RGB" and resize_filter == "area" and target != (width, height)
                    and cost <= HEAVY_DECODE_BYTES and _orientation(img) == 1):
                fast = _area_jpeg(body, img.decoderconfig[0] if img.decoderconfig else 1, target)  # draft's scale
                if fast is not None:
                    return ImageResult("ok", None, fast, "jpeg", target[0], target[1], orig_width=width,
                                       orig_height=height, **base)
            if cost > max_decode_bytes:
                return ImageResult("too_large", f"decoding this {width}x{height} {source_mode} {kind} needs "
                                   f"{_mib(cost)} MiB, over the limit of {_mib(max_decode_bytes)} MiB per image",
                                   **base)
            with heavy_slot() if cost > HEAVY_DECODE_BYTES else nullcontext():
                try:
                    return _decode(img, kind, body, base, (width, height), max_side, resize_filter)
                finally:
                    img.close()  # free the pixels before the slot passes to another worker


def _decode(img: Image.Image, kind: str, body: bytes, base: dict[str, Any], full_size: tuple[int, int],
            max_side: int, resize_filter: str) -> ImageResult:
    """The decoding half of `process_image`, for an opened image that passed the checks."""
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        return ImageResult("too_large", f"decompression bomb ({_first_line(exc)})", **base)
    except Exception as exc:  # truncated data, corrupt streams, unsupported variants
        return ImageResult("decode_error", f"cannot decode {kind} ({_first_line(exc)})", **base)
    # Only now: a PNG's EXIF may follow its pixels, so reading it loads the whole image.
    orientation = _orientation(img)
    width, height = full_size
    rotated = orientation != 1
    orig_w, orig_h = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    base.update(orig_width=orig_w, orig_height=orig_h)
    if img.format == "JPEG" and img.mode == "RGB" and not rotated and (max_side <= 0 or max(width, height) <= max_side):
        return ImageResult("ok", None, bytes(body), "jpeg", width, height, **base)
    try:
        if pixel_bytes(img) > STRIP_BYTES:
            rgb = shrink_in_strips(img, max_side)
            img.close()  # the full-size pixels are no longer needed
            rgb = rgb.transpose(_UPRIGHT[orientation]) if rotated else rgb
        else:
            rgb = to_rgb(ImageOps.exif_transpose(img) if rotated else img)
        new_size = target_size(orig_w, orig_h, max_side)
        if rgb.size != new_size:
            rgb = rgb.resize(new_size, RESIZE_FILTERS[resize_filter], reducing_gap=3.0)
        data = encode_jpeg(rgb)
    except Exception as exc:
        return ImageResult("decode_error", f"cannot convert {kind} ({_first_line(exc)})", **base)
    return ImageResult("ok", None, data, "jpeg", rgb.width, rgb.height, **base)


def _area_jpeg(body: bytes, reduce: int, size: tuple[int, int]) -> bytes | None:
    """The common case of fetch, an upright RGB JPEG to shrink with the area filter, through
    OpenCV, for about two thirds of Pillow's CPU (on 600-900 px photos going to 512 px: 2.9 ms
    instead of 4.1). None when OpenCV is missing or declines: the caller takes the Pillow path,
    which also gives any error its status.

    libjpeg-turbo decodes it (at 1/`reduce` by DCT scaling, as Pillow's draft does); the area
    filter is a bilinear enlargement to an integer multiple m >= 2 of `size`, then m x m box
    averaging (OpenCV's fast integer INTER_AREA): each output pixel averages the source under
    it, as Pillow's BOX does (the two agree within ~43 dB PSNR), where OpenCV's own INTER_AREA
    at a fractional scale costs more than Pillow. Encoded at JPEG_QUALITY, 4:2:0, as Pillow.
    A body not ending in the EOI marker (truncated, or trailing bytes) is left to Pillow,
    which tells truncation (decode_error) from what it can read; OpenCV would fill in grey."""
    cv2 = _opencv()
    if cv2 is None or not body.endswith(b"\xff\xd9") or reduce not in _REDUCED:
        return None
    import numpy as np

    arr = cv2.imdecode(np.frombuffer(body, np.uint8), _REDUCED[reduce] | cv2.IMREAD_IGNORE_ORIENTATION)
    if arr is None or arr.ndim != 3:
        return None
    w, h = size
    m = max(2, _ceil_div(arr.shape[1], w), _ceil_div(arr.shape[0], h))
    arr = cv2.resize(arr, (m * w, m * h), interpolation=cv2.INTER_LINEAR)
    arr = cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    return data.tobytes() if ok else None


_REDUCED: dict[int, int] = {}
_cv2: Any = None


def _opencv() -> Any:
    """cv2, set up for a worker (one thread: the pool has a process per core), or None."""
    global _cv2
    if _cv2 is None:
        try:
            import cv2
        except ImportError:
            _cv2 = False
        else:
            cv2.setNumThreads(1)
            _REDUCED.update({1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                             8: cv2.IMREAD_REDUCED_COLOR_8})
            _cv2 = cv2
    return _cv2 or None


def process_images(bodies: list[bytes], max_side: int = 512, max_pixels: int = DEFAULT_MAX_PIXELS,
                   resize_filter: str = DEFAULT_RESIZE_FILTER, max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
                   heavy_slot: Callable[[], AbstractContextManager[object]] = nullcontext) -> list[ImageResult]:
    """`process_image` over a batch: one round trip to a worker process for several bodies."""
    return [process_image(body, max_side, max_pixels, resize_filter, max_decode_bytes, heavy_slot)
            for body in bodies]


def _describe(body: bytes) -> str:
    head = body[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "HTML"
    if head.startswith((b"<?xml", b"<svg")):
        return "XML/SVG"
    if head.startswith((b"{", b"[")):
        return "JSON"
    return f"{len(body)} bytes starting {body[:8].hex()}"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _mib(n: int) -> int:
    return _ceil_div(n, MIB)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else type(exc).__name__
    return text[:200]

