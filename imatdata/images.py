"""Image work as pure functions over bytes: sniff, bomb check, decode, upright, RGB, resize.

This is the CPU-heavy half of fetch and runs in worker processes, so it imports only Pillow
and the standard library (a spawned worker stays small) and its entry point,
`process_image`, is a picklable top-level function returning a plain dataclass.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

# Pillow's own limit warns at this many pixels and raises at twice it; fetch checks the
# header against its own limit first, so a bomb is refused before any pixel is decoded.
DEFAULT_MAX_PIXELS = 89_478_485
JPEG_QUALITY = 90
# Downscaling filters (`--resize-filter`), all antialiased: Pillow widens the kernel with the
# scale factor. The resize is most of the image work (a 900 px photo going to 512 px: decode
# ~3 ms, resize ~3 ms area / 5 bilinear / 8 bicubic / 11 lanczos, encode ~1 ms), so the filter
# sets the download rate on a small machine. "area" averages the source pixels under each
# output pixel, as OpenCV's INTER_AREA (img2dataset's default for downscaling) does.
RESIZE_FILTERS = {
    "area": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
DEFAULT_RESIZE_FILTER = "area"
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


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with any transparency flattened on white; CMYK, palette, grey and 16-bit handled."""
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
        lo, hi = img.getextrema() if img.mode in ("I", "F") else (0, 65535)
        span = (hi - lo) or 1
        img = img.point(lambda v: (v - lo) * 255.0 / span) if img.mode in ("I", "F") else \
            img.convert("I").point(lambda v: v * 255.0 / 65535)
        return img.convert("L").convert("RGB")
    return img.convert("RGB")


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def process_image(body: bytes, max_side: int = 512, max_pixels: int = DEFAULT_MAX_PIXELS,
                  resize_filter: str = DEFAULT_RESIZE_FILTER) -> ImageResult:
    """Turn a served body into the stored image (or say why not).

    Keeps `body` byte for byte when it is already an RGB JPEG, upright and within
    `max_side`; otherwise decodes fully, turns it upright (EXIF), converts to RGB on white,
    shrinks the longer side to `max_side` (with `resize_filter`, a RESIZE_FILTERS name) and
    re-encodes as JPEG q90. `orig_width` and `orig_height` are the served image's size as
    displayed (after the EXIF rotation).
    """
    size = len(body)
    digest = hashlib.sha256(body).hexdigest()
    base = {"orig_bytes": size, "sha256": digest}
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
            orientation = _orientation(img)
            source_mode = img.mode
            is_jpeg = img.format == "JPEG"
            target = target_size(width, height, max_side)
            if is_jpeg and target != (width, height) and max(width, height) >= 2 * max(target):
                # DCT scaling decodes at 1/2, 1/4 or 1/8 for a fraction of the cost; it never
                # goes below the requested size, so the resize below still does the rest.
                img.draft("RGB", target)
            try:
                img.load()
            except Image.DecompressionBombError as exc:
                return ImageResult("too_large", f"decompression bomb ({_first_line(exc)})", **base)
            except Exception as exc:  # truncated data, corrupt streams, unsupported variants
                return ImageResult("decode_error", f"cannot decode {kind} ({_first_line(exc)})", **base)
            rotated = orientation != 1
            upright = ImageOps.exif_transpose(img) if rotated else img
            orig_w, orig_h = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
            base.update(orig_width=orig_w, orig_height=orig_h)
            if is_jpeg and source_mode == "RGB" and not rotated and (max_side <= 0 or max(width, height) <= max_side):
                return ImageResult("ok", None, body, "jpeg", width, height, **base)
            try:
                rgb = to_rgb(upright)
                new_size = target_size(orig_w, orig_h, max_side)
                if rgb.size != new_size:
                    rgb = rgb.resize(new_size, RESIZE_FILTERS[resize_filter], reducing_gap=3.0)
                data = encode_jpeg(rgb)
            except Exception as exc:
                return ImageResult("decode_error", f"cannot convert {kind} ({_first_line(exc)})", **base)
            return ImageResult("ok", None, data, "jpeg", rgb.width, rgb.height, **base)


def process_images(bodies: list[bytes], max_side: int = 512, max_pixels: int = DEFAULT_MAX_PIXELS,
                   resize_filter: str = DEFAULT_RESIZE_FILTER) -> list[ImageResult]:
    """`process_image` over a batch: one round trip to a worker process for several bodies."""
    return [process_image(body, max_side, max_pixels, resize_filter) for body in bodies]


def _describe(body: bytes) -> str:
    head = body[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "HTML"
    if head.startswith((b"<?xml", b"<svg")):
        return "XML/SVG"
    if head.startswith((b"{", b"[")):
        return "JSON"
    return f"{len(body)} bytes starting {body[:8].hex()}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else type(exc).__name__
    return text[:200]

