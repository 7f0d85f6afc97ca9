"""Real image bytes for the samples: rendered products, odd formats, bombs, a photo-like corpus."""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------------------------
# images


class _Rand(Protocol):
    def random(self) -> float: ...


def _uniform(rng: _Rand, lo: float, hi: float) -> float:
    return lo + (hi - lo) * rng.random()


def _np_rng(rng: _Rand) -> np.random.Generator:
    """A numpy generator seeded from either a random.Random or a numpy Generator."""
    return np.random.default_rng(int(rng.random() * 2**63))


N_STYLES = 9
_SHAPES = ("circle", "square", "triangle", "star", "hexagon", "ring", "cross", "ellipse", "chevron")
_TEXTURES = ("plain", "stripes", "dots", "checker")


def product_style(label: int) -> tuple[str, float, str]:
    """(shape, base hue, texture) that tell class `label` apart: the learnable signal.

    Shape and hue both follow label % 9, texture follows label // 9 % 4, so any nine labels
    with distinct residues mod 9 look distinct in shape and colour.
    """
    s = label % N_STYLES
    return _SHAPES[s], (s * 0.618034) % 1.0, _TEXTURES[(label // N_STYLES) % len(_TEXTURES)]


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255.0


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def poly(radii: Sequence[float], n: int, start: float = -math.pi / 2) -> list[tuple[float, float]]:
        pts = []
        for k in range(n):
            a = start + angle + 2 * math.pi * k / n
            rr = r * radii[k % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts

    if shape in ("circle", "ring"):
        return poly([1.0], 48)
    if shape == "square":
        return poly([1.0], 4, start=-math.pi / 4)
    if shape == "triangle":
        return poly([1.0], 3)
    if shape == "star":
        return poly([1.0, 0.45], 10)
    if shape == "hexagon":
        return poly([1.0], 6)
    if shape == "ellipse":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x, y = r * math.cos(t), 0.5 * r * math.sin(t)
            pts.append((cx + x * math.cos(angle) - y * math.sin(angle),
                        cy + x * math.sin(angle) + y * math.cos(angle)))
        return pts
    if shape == "cross":
        w = 0.33
        base = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
                (-1, w), (-1, -w), (-w, -w)]
    elif shape == "chevron":
        base = [(-1, -0.8), (0, -0.1), (1, -0.8), (1, -0.1), (0, 0.7), (-1, -0.1)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in base]


def render_product(label: int, rng: _Rand, size: int = 128) -> Image.Image:
    """A synthetic "product photo" of class `label` (RGB, size x size).

    The class shows in shape, colour and texture (see `product_style`); position, scale,
    rotation, hue, lighting, background and noise vary with `rng` so a small CNN has to
    learn the class rather than memorise pixels. `rng` is a random.Random or numpy Generator.
    """
    shape, hue, texture = product_style(label)
    g = _np_rng(rng)
    # 1-D coordinates broadcast to 2-D: most work stays single-channel; PIL does the compositing.
    xs = (np.arange(size, dtype=np.float32) / size)[None, :]
    ys = (np.arange(size, dtype=np.float32) / size)[:, None]
    light = _uniform(rng, 0.75, 1.15)  # global exposure, folded into every colour

    # Background: a pale tone under a lighting gradient.
    bg_col = _hsv_to_rgb(_uniform(rng, 0, 1), _uniform(rng, 0.0, 0.25), _uniform(rng, 0.55, 0.95)) * light
    gdir = _uniform(rng, 0, 2 * math.pi)
    grad = 1.0 + 0.35 * ((xs - 0.5) * math.cos(gdir) + (ys - 0.5) * math.sin(gdir))
    bg = Image.fromarray(np.clip(grad[..., None] * bg_col, 0, 255).astype(np.uint8), "RGB")
    # A distractor blob behind the product, so colour alone is not a pixel count.
    bx, by, br = (_uniform(rng, 0, 1) * size, _uniform(rng, 0, 1) * size, _uniform(rng, 0.04, 0.09) * size)
    blob_col = tuple(int(c) for c in np.clip(_hsv_to_rgb(_uniform(rng, 0, 1), 0.5, 0.6) * light, 0, 255))
    ImageDraw.Draw(bg).ellipse((bx - br, by - br, bx + br, by + br), fill=blob_col)

    # Foreground fill: the class hue (jittered) under the class texture.
    h = (hue + _uniform(rng, -0.03, 0.03)) % 1.0
    col = _hsv_to_rgb(h, _uniform(rng, 0.6, 0.95), _uniform(rng, 0.55, 0.95)) * light
    period = _uniform(rng, 0.08, 0.14)
    ta = _uniform(rng, 0, math.pi)
    u = xs * math.cos(ta) + ys * math.sin(ta)
    v = -xs * math.sin(ta) + ys * math.cos(ta)
    if texture == "stripes":
        pattern = np.sin(2 * math.pi * u / period) > 0
    elif texture == "dots":
        pattern = (((u / period) % 1 - 0.5) ** 2 + ((v / period) % 1 - 0.5) ** 2) < 0.09
    elif texture == "checker":
        pattern = ((np.floor(u / period) + np.floor(v / period)) % 2) > 0
    else:
        pattern = np.zeros((size, size), bool)
    shade = np.where(pattern, np.float32(0.55), np.float32(1.0))
    fill = Image.fromarray(np.clip(shade[..., None] * col, 0, 255).astype(np.uint8), "RGB")

    scale = _uniform(rng, 0.26, 0.40) * size
    cx = size / 2 + _uniform(rng, -0.14, 0.14) * size
    cy = size / 2 + _uniform(rng, -0.14, 0.14) * size
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon(_shape_polygon(shape, cx, cy, scale, _uniform(rng, 0, 2 * math.pi)), fill=255)
    if shape == "ring":
        draw.polygon(_shape_polygon("circle", cx, cy, scale * 0.55, 0.0), fill=0)
    img = Image.composite(fill, bg, mask)

    # Sensor-like noise: uniform from raw random bytes (scaled to std 3-9), several times
    # cheaper than Gaussian samples and indistinguishable for this purpose.
    raw = np.frombuffer(g.bytes(size * size * 3), np.uint8).reshape(size, size, 3)
    noise = (raw.astype(np.float32) - np.float32(127.5)) * np.float32(_uniform(rng, 3.0, 9.0) / 73.9)
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    """Encode `img` as jpeg/png/bmp/webp/gif bytes; `kw` goes to PIL's save (quality, exif,
    progressive, transparency, ...). JPEG keeps RGB, L and CMYK; other modes become RGB."""
    fmt = fmt.lower()
    pil_fmt = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG", "bmp": "BMP", "webp": "WEBP", "gif": "GIF"}.get(fmt)
    if pil_fmt is None:
        raise ValueError(f"unsupported image format {fmt!r}")
    if pil_fmt == "JPEG":
        kw.setdefault("quality", 90)
        if img.mode not in ("RGB", "L", "CMYK"):
            img = img.convert("RGB")
    elif pil_fmt == "WEBP":
        kw.setdefault("quality", 85)
    buf = io.BytesIO()
    img.save(buf, pil_fmt, **kw)
    return buf.getvalue()


def exif_rotated(upright: Image.Image, orientation: int) -> bytes:
    """A JPEG whose pixels are stored sideways and whose EXIF orientation turns them upright."""
    # exif_transpose applies ROTATE_270 for 6 and ROTATE_90 for 8; store the inverse.
    stored = upright.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "jpeg", exif=exif.tobytes())


def marked(img: Image.Image) -> Image.Image:
    """Paint a red block in the top-left corner so orientation is checkable after decoding."""
    img = img.copy()
    w, h = img.size
    ImageDraw.Draw(img).rectangle((0, 0, max(4, w // 4), max(4, h // 6)), fill=(230, 20, 20))
    return img


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A few hundred bytes of PNG whose header claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * ((1 + 3 * width) * 2), 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_bomb(small_jpeg: bytes, width: int = 40000, height: int = 40000) -> bytes:
    """`small_jpeg` with its frame header (SOFn) patched to claim width x height."""
    sof = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
    at = 2  # walk the marker segments after SOI; table data may contain FF Cx bytes
    while at + 4 <= len(small_jpeg) and small_jpeg[at] == 0xFF:
        marker = small_jpeg[at + 1]
        length = struct.unpack(">H", small_jpeg[at + 2:at + 4])[0]
        if marker in sof:
            # SOF: marker(2) length(2) precision(1) height(2) width(2)
            return small_jpeg[:at + 5] + struct.pack(">HH", height, width) + small_jpeg[at + 9:]
        if marker == 0xDA:  # start of scan: no frame header before it
            break
        at += 2 + length
    raise ValueError("no frame header (SOFn) in JPEG")


def placeholder_image(size: int = 120) -> Image.Image:
    """The grey "image not available" card that shops serve for missing pictures."""
    img = Image.new("RGB", (size, size), (222, 222, 222))
    d = ImageDraw.Draw(img)
    d.rectangle((size * 0.2, size * 0.25, size * 0.8, size * 0.7), outline=(160, 160, 160), width=3)
    d.polygon([(size * 0.25, size * 0.65), (size * 0.45, size * 0.4), (size * 0.6, size * 0.6),
               (size * 0.75, size * 0.45), (size * 0.75, size * 0.65)], fill=(180, 180, 180))
    d.ellipse((size * 0.6, size * 0.3, size * 0.7, size * 0.4), fill=(180, 180, 180))
    return img


def html_page() -> bytes:
    return (b"<html><head><title>Access denied</title></head><body><h1>Please enable cookies"
            b"</h1><p>This page is shown instead of the image you asked for.</p></body></html>\n")



# --------------------------------------------------------------------------------------------
# photo-like corpus for benchmarks


def _photo_base(g: np.random.Generator, side: int) -> Image.Image:
    """A natural-looking picture: multi-octave colour noise (soft shapes and fine texture)."""
    acc = np.zeros((side, side, 3), np.float32)
    amp = 1.0
    for cells in (3, 7, 17, 41, 97):
        small = g.random((cells, cells, 3), dtype=np.float32)
        layer = Image.fromarray((small * 255).astype(np.uint8), "RGB").resize((side, side), Image.Resampling.BICUBIC)
        acc += amp * np.asarray(layer, np.float32)
        amp *= 0.55
    acc = acc / acc.max() * 255.0
    tint = g.uniform(0.6, 1.2, 3).astype(np.float32)
    acc = acc * tint + g.normal(0.0, 7.0, acc.shape).astype(np.float32)
    return Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8), "RGB")


class PhotoCorpus(Sequence[bytes]):
    """A lazy sequence of `n` photo-like JPEGs; item i is built on access from a small pool.

    Holding 10,000 realistic JPEGs costs about 1 GB; this holds only the pool.
    """

    def __init__(self, n: int, pool: list[bytes], seed: int) -> None:
        self._n, self._pool, self._seed = n, pool, seed

    def __len__(self) -> int:
        return self._n

    def _get(self, i: int) -> bytes:
        src = self._pool[i % len(self._pool)]
        if i < len(self._pool):
            return src
        # A COM segment right after SOI: new bytes (and sha256), same pixels.
        comment = f"imat sample {self._seed}:{i}".encode()
        return src[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + src[2:]

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._get(k) for k in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._get(i)


def photo_corpus(n: int, seed: int = 0, min_side: int = 600, max_side: int = 900,
                 pool: int = 48, lazy: bool = False) -> list[bytes] | PhotoCorpus:
    """`n` photo-like JPEGs (60-200 KB each at the default sides, sides in [min_side, max_side]).

    `pool` distinct crops/flips/qualities are encoded; the rest reuse them with a unique JPEG
    comment segment, so every item has distinct bytes (and sha256) while 10,000 items take
    seconds rather than minutes. `lazy=True` returns a PhotoCorpus sequence instead of a list.
    """
    g = np.random.default_rng(seed)
    n_bases = max(1, min(pool, n, 8))
    bases = [_photo_base(g, max_side) for _ in range(n_bases)]
    encoded: list[bytes] = []
    for k in range(min(pool, n)):
        img = bases[k % n_bases]
        w, h = (int(x) for x in g.integers(min_side, max_side + 1, 2))
        x0, y0 = int(g.integers(0, max_side - w + 1)), int(g.integers(0, max_side - h + 1))
        img = img.crop((x0, y0, x0 + w, y0 + h))
        if g.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # Quality 84-88 keeps 600x600..900x900 of this content within 60-200 KB.
        encoded.append(encode(img, "jpeg", quality=int(g.integers(84, 89))))
    corpus = PhotoCorpus(n, encoded, seed)
    return corpus if lazy else list(corpus)
