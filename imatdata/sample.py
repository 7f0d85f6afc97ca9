"""A seeded image catalogue and a local fault-injecting image server.

Shared by the tests, the benchmarks and `make demo`: every network behaviour the fetcher must
survive (404/500/503/429, resets, trickles, truncated bodies, HTML pages, oversize bodies,
decompression bombs, redirects to private addresses, gzip, opt-out headers) and every image
oddity clean must handle (CMYK, palette transparency, EXIF rotation, tiny, huge, duplicates,
placeholders, leaks) is produced here from real bytes, served over real HTTP on loopback.

    catalogue = build_catalogue("faults", seed=0)
    async with SampleServer(catalogue) as srv:
        write_lists(catalogue, srv, tmp_path)          # train.json, val.json, test.json
        ...                                             # fetch http://127.0.0.1:PORT/...
        srv.counter["/404/....jpg"], srv.max_concurrency("localhost")

`python -m imatdata.sample serve --out DIR [--kind demo] [--seed 0]` runs it for the demo.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import gzip
import io
import json
import math
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
from aiohttp import web
from PIL import Image, ImageDraw

from imatdata.manifest import commit_file, temp_path_for, write_bytes_atomic

HOSTS: tuple[str, str] = ("127.0.0.1", "localhost")
# A private address no test may ever contact: the fetcher must refuse the redirect before
# connecting. Nothing in this module connects to it either.
PRIVATE_REDIRECT = "http://10.255.255.1/x.jpg"
MIB = 1 << 20

# Statuses an item can expect from `imatdata fetch` with the default flags (--retries 3,
# --max-bytes 20MiB) and a short --timeout; mirrors imatdata.manifest.STATUSES.
EXPECTED_STATUSES = (
    "ok", "http_error", "timeout", "connection_error", "too_large", "not_image",
    "decode_error", "blocked", "opted_out",
)

CONTENT_TYPES = {
    "jpeg": "image/jpeg", "png": "image/png", "bmp": "image/bmp", "webp": "image/webp",
    "gif": "image/gif",
}


# --------------------------------------------------------------------------------------------
# catalogue


@dataclass
class Item:
    """One URL the server answers, with what it serves and what fetch should make of it.

    `path` is the route (no query string); `query` is appended when the URL is listed, so
    the server's counters are keyed by `path` alone. `params` hold fault settings:
    fail_first / retry_after (503, 429), target (redirect), total_bytes / chunked (oversize),
    interval / max_seconds (trickle), cut_at (reset), upright_size (EXIF rotation), ...
    """

    id: str
    path: str
    split: str | None
    label: int | None
    body: bytes | None
    fault: str | None = None
    content_type: str = "image/jpeg"
    expected_status: str = "ok"
    host: str = HOSTS[0]
    kind: str = "jpeg"
    query: str = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    dup_of: str | None = None  # id of the item this one duplicates (exactly or nearly)
    # What `imatdata clean` (default flags) should drop this row as, where that is certain:
    # fetch_failed, undersized, leak, placeholder. None where it depends on which twin is kept.
    expected_drop: str | None = None
    listed: bool = True  # False: served (e.g. as a redirect target) but not in any list

    @property
    def url_path(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path

    def record(self, base_url: Callable[[str, str], str]) -> dict[str, Any]:
        """The iMaterialist record for this item: id, url and (unless test) class."""
        rec: dict[str, Any] = {"id": self.id, "url": base_url(self.url_path, self.host)}
        if self.label is not None:
            rec["class"] = self.label
        return rec


@dataclass(frozen=True)
class TinyRange:
    """`n` cheap records served at `/tiny/{i}.jpg` without materialising `n` Item objects.

    For the million-record memory benchmark: bodies are shared from a small pool, ids and
    labels are computed from the index, and the server resolves paths arithmetically.
    """

    n: int
    bodies: tuple[bytes, ...]
    labels: tuple[int, ...]
    split: str = "train"
    prefix: str = "/tiny/"
    salt: int = 0

    def id_of(self, i: int) -> str:
        # An odd multiplier is a bijection modulo 2**128, so ids are unique yet look random.
        return f"{((i + 1 + self.salt) * 0x9E3779B97F4A7C15F39CC0605CEDC835) % (1 << 128):032x}.jpg"

    def path_of(self, i: int) -> str:
        return f"{self.prefix}{i}.jpg"

    def item(self, i: int) -> Item:
        return Item(id=self.id_of(i), path=self.path_of(i), split=self.split,
                    label=self.labels[i % len(self.labels)], body=self.bodies[i % len(self.bodies)],
                    host=HOSTS[i % 2], kind="tiny_range")

    def index_of(self, path: str) -> int | None:
        if not (path.startswith(self.prefix) and path.endswith(".jpg")):
            return None
        digits = path[len(self.prefix):-4]
        if not digits.isdigit():
            return None
        i = int(digits)
        return i if i < self.n else None


@dataclass
class Catalogue:
    """The items a SampleServer serves. `add` plants extra items (tests do)."""

    kind: str
    seed: int
    items: list[Item] = field(default_factory=list)
    ranges: list[TinyRange] = field(default_factory=list)
    by_id: dict[str, Item] = field(default_factory=dict, init=False, repr=False)
    by_path: dict[str, Item] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        items, self.items = self.items, []
        for it in items:
            self.add(it)

    def add(self, item: Item) -> Item:
        if not item.path.startswith("/"):
            raise ValueError(f"item path must start with '/': {item.path!r}")
        if item.path in self.by_path:
            raise ValueError(f"duplicate item path {item.path!r}")
        if item.listed and item.id in self.by_id:
            raise ValueError(f"duplicate item id {item.id!r}")
        if item.expected_status not in EXPECTED_STATUSES:
            raise ValueError(f"unknown expected_status {item.expected_status!r}")
        self.items.append(item)
        self.by_path[item.path] = item
        if item.listed:
            self.by_id[item.id] = item
        return item

    def resolve(self, path: str) -> Item | None:
        item = self.by_path.get(path)
        if item is not None:
            return item
        for rng in self.ranges:
            i = rng.index_of(path)
            if i is not None:
                return rng.item(i)
        return None

    @property
    def splits(self) -> list[str]:
        order = {"train": 0, "val": 1, "test": 2}
        names = {it.split for it in self.items if it.listed and it.split}
        names |= {r.split for r in self.ranges}
        return sorted(names, key=lambda s: (order.get(s, 3), s))

    def listed(self, split: str | None = None) -> list[Item]:
        return [it for it in self.items if it.listed and (split is None or it.split == split)]

    def where(self, **attrs: Any) -> list[Item]:
        """Listed items whose attributes equal the given values, e.g. where(kind="cmyk")."""
        return [it for it in self.listed() if all(getattr(it, k) == v for k, v in attrs.items())]

    def one(self, **attrs: Any) -> Item:
        found = self.where(**attrs)
        if not found:
            raise KeyError(f"no catalogue item with {attrs}")
        return found[0]

    def copy(self) -> Catalogue:
        """A catalogue with copies of the items (bodies shared), safe to `add` to."""
        return Catalogue(kind=self.kind, seed=self.seed,
                         items=[replace(it, headers=dict(it.headers), params=dict(it.params)) for it in self.items],
                         ranges=list(self.ranges))

    def __len__(self) -> int:
        return len(self.listed()) + sum(r.n for r in self.ranges)

    def iter_records(self, split: str, base_url: Callable[[str, str], str]) -> Iterator[dict[str, Any]]:
        for it in self.items:
            if it.listed and it.split == split:
                yield it.record(base_url)
        for rng in self.ranges:
            if rng.split == split:
                for i in range(rng.n):
                    rec: dict[str, Any] = {"id": rng.id_of(i),
                                           "url": base_url(rng.path_of(i), HOSTS[i % 2])}
                    if split != "test":
                        rec["class"] = rng.labels[i % len(rng.labels)]
                    yield rec

    def iter_json(self, split: str, base_url: Callable[[str, str], str]) -> Iterator[str]:
        """`iter_records` as JSON text; range records are formatted directly (their ids and
        URLs are plain ASCII by construction), five times faster than json.dumps."""
        for it in self.items:
            if it.listed and it.split == split:
                yield json.dumps(it.record(base_url))
        for rng in self.ranges:
            if rng.split != split:
                continue
            prefixes = [base_url(rng.prefix, h) for h in HOSTS]
            n_labels = len(rng.labels)
            for i in range(rng.n):
                head = f'{{"id": "{rng.id_of(i)}", "url": "{prefixes[i % 2]}{i}.jpg"'
                yield head + ("}" if split == "test" else f', "class": {rng.labels[i % n_labels]}}}')

    def expected(self) -> dict[str, str]:
        """id -> expected fetch status, for table-driven fetch tests."""
        return {it.id: it.expected_status for it in self.listed()}


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


def _exif_rotated(upright: Image.Image, orientation: int) -> bytes:
    """A JPEG whose pixels are stored sideways and whose EXIF orientation turns them upright."""
    # exif_transpose applies ROTATE_270 for 6 and ROTATE_90 for 8; store the inverse.
    stored = upright.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "jpeg", exif=exif.tobytes())


def _marked(img: Image.Image) -> Image.Image:
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


def _html_page() -> bytes:
    return (b"<html><head><title>Access denied</title></head><body><h1>Please enable cookies"
            b"</h1><p>This page is shown instead of the image you asked for.</p></body></html>\n")


# --------------------------------------------------------------------------------------------
# catalogue builders


def product_classes(n: int = N_STYLES) -> list[int]:
    """`n` real leaf class ids from the packaged product tree, spread over level-1/level-2
    nodes, with distinct looks (label % 9 distinct for the first nine)."""
    tree = json.loads((resources.files("imatdata") / "data/product_tree.json").read_text())
    groups: dict[str, list[list[int]]] = {}
    for l1 in sorted(tree):
        groups[l1] = [sorted(int(x) for l3 in sorted(tree[l1][l2]) for x in tree[l1][l2][l3])
                      for l2 in sorted(tree[l1])]
    picked: list[int] = []
    used_res: set[int] = set()
    round_ = 0
    while len(picked) < n:
        progressed = False
        for l1 in sorted(groups):  # round-robin over level-1, a new level-2 node each round
            l2s = groups[l1]
            if round_ >= len(l2s) or len(picked) >= n:
                continue
            for leaf in l2s[round_]:
                if leaf % N_STYLES not in used_res or len(used_res) >= N_STYLES:
                    picked.append(leaf)
                    used_res.add(leaf % N_STYLES)
                    progressed = True
                    break
        round_ += 1
        if not progressed and round_ > 64:
            raise ValueError(f"product tree has too few leaves for {n} classes")
    return picked


class _Ids:
    """Seeded, unique 32-hex ids with .jpg/.png/.bmp extensions (not always matching)."""

    EXTS = (".jpg", ".jpg", ".jpg", ".png", ".bmp")

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.seen: set[str] = set()

    def __call__(self, ext: str | None = None) -> str:
        while True:
            h = f"{self.rng.getrandbits(128):032x}"
            if h not in self.seen:
                self.seen.add(h)
                return h + (ext or self.rng.choice(self.EXTS))

    def query(self) -> str:
        return self.rng.choice(["w=750", "w=750&h=750&q=80", f"sig={self.rng.getrandbits(32):08x}",
                                "imwidth=640&fmt=jpg", "v=2"])


class _Builder:
    def __init__(self, kind: str, seed: int) -> None:
        self.rng = random.Random(seed)
        self.ids = _Ids(self.rng)
        self.cat = Catalogue(kind=kind, seed=seed)
        self.n = 0

    def add(self, *, split: str | None, label: int | None, body: bytes | None, kind: str,
            fault: str | None = None, expected: str = "ok", content_type: str | None = None,
            host: str | None = None, dup_of: str | None = None, listed: bool = True,
            prefix: str | None = None, ext: str | None = None, **extra: Any) -> Item:
        iid = self.ids(ext)
        content_type = content_type or CONTENT_TYPES.get(_sniff(body or b""), "image/jpeg")
        if expected != "ok" and split != "test":  # test rows are never dropped
            extra.setdefault("expected_drop", "fetch_failed")
        item = Item(id=iid, path=f"/{prefix or kind}/{iid}", split=split, label=label, body=body,
                    fault=fault, content_type=content_type, expected_status=expected,
                    host=host or HOSTS[self.n % 2], kind=kind, query=self.ids.query(),
                    dup_of=dup_of, listed=listed, **extra)
        self.n += 1
        return self.cat.add(item)

    def product(self, label: int, size: int) -> Image.Image:
        return render_product(label, self.rng, size)


def _sniff(body: bytes) -> str:
    if body.startswith(b"\xff\xd8"):
        return "jpeg"
    if body.startswith(b"\x89PNG"):
        return "png"
    if body.startswith(b"BM"):
        return "bmp"
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "webp"
    return "other"


def _faults_catalogue(seed: int, trickle_seconds: float = 60.0) -> Catalogue:
    """Every image oddity and network fault, each item once (plus planted duplicates)."""
    b = _Builder("faults", seed)
    cls = product_classes(N_STYLES)

    def lab(i: int) -> int:
        return cls[i % len(cls)]

    def jpeg(i: int, size: int = 96, **kw: Any) -> bytes:
        return encode(b.product(lab(i), size), "jpeg", **kw)

    # --- images that fetch keeps (status ok), one per kind --------------------------------
    base = b.add(split="train", label=lab(0), body=jpeg(0, 112), kind="jpeg")
    b.add(split="train", label=lab(1), body=jpeg(1, 100, progressive=True), kind="jpeg_progressive")
    b.add(split="train", label=lab(2), body=encode(b.product(lab(2), 96), "png"), kind="png", ext=".jpg")
    rgba = b.product(lab(3), 96).convert("RGBA")
    alpha = Image.new("L", rgba.size, 0)
    ImageDraw.Draw(alpha).ellipse((8, 8, 88, 88), fill=255)
    rgba.putalpha(alpha)
    b.add(split="train", label=lab(3), body=encode(rgba, "png"), kind="png_alpha")
    pal = b.product(lab(4), 96).quantize(colors=32)
    b.add(split="train", label=lab(4), body=encode(pal, "png", transparency=pal.getpixel((0, 0))),
          kind="png_palette")
    b.add(split="train", label=lab(5), body=encode(b.product(lab(5), 90), "bmp"), kind="bmp")
    b.add(split="train", label=lab(6), body=encode(b.product(lab(6), 96).convert("CMYK"), "jpeg"),
          kind="cmyk", ext=".png")
    b.add(split="train", label=lab(7), body=encode(b.product(lab(7), 96).convert("L"), "jpeg"), kind="gray")
    b.add(split="train", label=lab(8), body=encode(b.product(lab(8), 96), "webp"), kind="webp")
    for orient, idx in ((6, 0), (8, 1)):
        upright = _marked(b.product(lab(idx), 150).resize((90, 150)))
        b.add(split="train", label=lab(idx), body=_exif_rotated(upright, orient), kind=f"exif_rot{orient}",
              params={"orientation": orient, "upright_size": upright.size})
    b.add(split="train", label=lab(2), body=encode(b.product(lab(2), 30).resize((20, 30)), "jpeg"),
          kind="tiny", params={"size": (20, 30)}, expected_drop="undersized")
    large = b.product(lab(3), 250).resize((2000, 1500), Image.Resampling.BILINEAR)
    b.add(split="train", label=lab(3), body=encode(large, "jpeg", quality=80), kind="large",
          params={"size": (2000, 1500)})

    # --- duplicates, leaks and placeholders (ok for fetch; clean's business) ----------------
    b.add(split="train", label=base.label, body=base.body, kind="exact_dup", dup_of=base.id)
    img = Image.open(io.BytesIO(base.body or b""))
    near = img.resize((round(img.width * 0.96), round(img.height * 0.96)), Image.Resampling.LANCZOS)
    b.add(split="train", label=base.label, body=encode(near, "jpeg", quality=65), kind="near_dup",
          dup_of=base.id)
    other = b.add(split="train", label=lab(4), body=jpeg(4, 104), kind="jpeg")
    b.add(split="train", label=lab(5), body=other.body, kind="cross_class_dup", dup_of=other.id)
    held_out = b.add(split="val", label=lab(6), body=jpeg(6, 108), kind="jpeg")
    b.add(split="train", label=lab(6), body=held_out.body, kind="leak", dup_of=held_out.id,
          expected_drop="leak")
    ph = encode(placeholder_image(), "jpeg", quality=85)
    first_ph: str | None = None
    for k in range(12):  # 12 URLs over 4 classes: over the default 10 URLs / 3 classes
        it = b.add(split="train", label=lab(k % 4), body=ph, kind="placeholder", dup_of=first_ph,
                   expected_drop="placeholder")
        first_ph = first_ph or it.id

    # --- network faults ------------------------------------------------------------------
    def fault(kind: str, expected: str, **kw: Any) -> Item:
        kw.setdefault("body", jpeg(b.n, 80))
        kw.setdefault("split", "train")
        kw.setdefault("label", lab(b.n))
        return b.add(kind=kind, fault=kind, expected=expected, **kw)

    fault("http_404", "http_error", status=404, body=b"not found\n", content_type="text/plain")
    fault("http_403", "http_error", status=403, body=b"forbidden\n", content_type="text/plain")
    fault("http_500", "http_error", status=500, body=b"internal error\n", content_type="text/plain")
    fault("flaky_503", "ok", params={"fail_first": 2, "fail_status": 503})
    fault("rate_429", "ok", params={"fail_first": 1, "fail_status": 429, "retry_after": 1})
    fault("reset", "connection_error", params={"cut_at": 0.5})
    # Trickles a byte per interval for up to max_seconds: any shorter --timeout expires first.
    fault("trickle", "timeout", params={"interval": 0.2, "max_seconds": trickle_seconds})
    # Says nothing at all (not even headers) for max_seconds, then answers normally.
    fault("stall", "timeout", params={"max_seconds": trickle_seconds})
    full = jpeg(b.n, 120)
    fault("truncated", "decode_error", body=full[: len(full) * 3 // 5], params={"full_length": len(full)})
    fault("html", "not_image", body=_html_page(), content_type="image/jpeg")
    fault("oversize", "too_large", body=None, params={"total_bytes": 25 * MIB, "chunked": False})
    fault("oversize_chunked", "too_large", body=None, params={"total_bytes": 25 * MIB, "chunked": True})
    fault("bomb_png", "too_large", body=png_bomb(), content_type="image/png")
    fault("bomb_jpeg", "too_large", body=jpeg_bomb(jpeg(b.n, 64)))
    target = b.add(split=None, label=None, body=jpeg(b.n, 96), kind="redirect_target", listed=False)
    fault("redirect", "ok", body=None, status=302, params={"target": target.path})
    fault("redirect_private", "blocked", body=None, status=302, params={"location": PRIVATE_REDIRECT})
    gz_src = jpeg(b.n, 96)
    fault("gzip", "ok", body=gzip.compress(gz_src, mtime=0), headers={"Content-Encoding": "gzip"},
          params={"decoded_length": len(gz_src)})
    fault("gzip_bomb", "too_large", body=_gzip_zeros(30 * MIB), headers={"Content-Encoding": "gzip"},
          params={"decoded_length": 30 * MIB})
    fault("empty", "not_image", body=b"")
    fault("noai", "opted_out", headers={"X-Robots-Tag": "noai"})
    # A directive for another crawler's token does not apply to imat.
    fault("noai_otherbot", "ok", headers={"X-Robots-Tag": "otherbot: noai, noimageai"})

    # --- val and test: a few plain images, one failure in test -------------------------------
    for i in range(4):
        b.add(split="val", label=lab(i), body=jpeg(i, 96), kind="jpeg")
    for i in range(5):
        b.add(split="test", label=None, body=jpeg(i + 3, 96), kind="jpeg")
    fault("http_404", "http_error", split="test", label=None, status=404, body=b"not found\n",
          content_type="text/plain")
    return b.cat


@functools.lru_cache(maxsize=2)
def _gzip_zeros(n: int) -> bytes:
    """gzip of n zero bytes, compressed in pieces so n bytes are never held at once."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(MIB)
    parts = [comp.compress(chunk) for _ in range(n // MIB)]
    parts.append(comp.compress(bytes(n % MIB)))
    parts.append(comp.flush())
    return b"".join(parts)


def _demo_catalogue(seed: int, n_classes: int = N_STYLES, train_max: int = 56, train_min: int = 36,
                    val_per_class: int = 10, n_test: int = 30, min_px: int = 96,
                    max_px: int = 160) -> Catalogue:
    """A small learnable dataset (a CNN gets well above chance in about a minute on CPU),
    with a sprinkling of faults so the demo's summary shows failures being handled."""
    b = _Builder("demo", seed)
    cls = product_classes(n_classes)

    def photo(label: int) -> bytes:
        size = b.rng.randint(min_px, max_px)
        return encode(b.product(label, size), "jpeg", quality=b.rng.randint(80, 93))

    firsts: dict[int, Item] = {}
    for c, label in enumerate(cls):
        # A mild imbalance: counts fall linearly from train_max to train_min.
        n_train = round(train_max - (train_max - train_min) * c / max(1, n_classes - 1))
        for _ in range(n_train):
            it = b.add(split="train", label=label, body=photo(label), kind="jpeg", prefix="img")
            firsts.setdefault(label, it)
        for _ in range(val_per_class):
            b.add(split="val", label=label, body=photo(label), kind="jpeg", prefix="img")
    for _ in range(n_test):
        b.add(split="test", label=None, body=photo(b.rng.choice(cls)), kind="jpeg", prefix="img")

    # Faults and oddities, a few of each.
    c0, c1, c2 = cls[0], cls[1 % len(cls)], cls[2 % len(cls)]
    for k in range(3):
        b.add(split="train", label=cls[k], body=b"not found\n", kind="http_404", fault="http_404",
              expected="http_error", status=404, content_type="text/plain")
    b.add(split="test", label=None, body=b"not found\n", kind="http_404", fault="http_404",
          expected="http_error", status=404, content_type="text/plain")
    b.add(split="train", label=c0, body=photo(c0), kind="flaky_503", fault="flaky_503",
          params={"fail_first": 1, "fail_status": 503})
    b.add(split="train", label=c1, body=photo(c1), kind="rate_429", fault="rate_429",
          params={"fail_first": 1, "fail_status": 429, "retry_after": 1})
    full = photo(c2)
    b.add(split="train", label=c2, body=full[: len(full) // 2], kind="truncated", fault="truncated",
          expected="decode_error")
    b.add(split="train", label=c0, body=_html_page(), kind="html", fault="html", expected="not_image")
    b.add(split="train", label=c1, body=encode(b.product(c1, 30).resize((24, 32)), "jpeg"), kind="tiny",
          params={"size": (24, 32)}, expected_drop="undersized")
    b.add(split="train", label=c2, body=None, kind="redirect_private", fault="redirect_private",
          expected="blocked", status=302, params={"location": PRIVATE_REDIRECT})
    for label in (c0, c1):
        orig = firsts[label]
        b.add(split="train", label=label, body=orig.body, kind="exact_dup", dup_of=orig.id)
    img = Image.open(io.BytesIO(firsts[c2].body or b""))
    near = img.resize((round(img.width * 0.95), round(img.height * 0.95)), Image.Resampling.LANCZOS)
    b.add(split="train", label=c2, body=encode(near, "jpeg", quality=70), kind="near_dup",
          dup_of=firsts[c2].id)
    val_img = b.cat.where(split="val", label=c0)[0]
    b.add(split="train", label=c0, body=val_img.body, kind="leak", dup_of=val_img.id, expected_drop="leak")
    ph = encode(placeholder_image(), "jpeg", quality=85)
    first_ph: str | None = None
    for k in range(10):  # 10 URLs over 4 classes
        it = b.add(split="train", label=cls[k % 4], body=ph, kind="placeholder", dup_of=first_ph,
                   expected_drop="placeholder")
        first_ph = first_ph or it.id
    # Real lists are not sorted by class: a --limit N run should still see every class.
    b.rng.shuffle(b.cat.items)
    return b.cat


def build_catalogue(kind: str = "faults", seed: int = 0, **sizes: Any) -> Catalogue:
    """A deterministic catalogue: "faults" (every oddity once) or "demo" (learnable + faults).

    `sizes` tune the demo (n_classes, train_max, train_min, val_per_class, n_test, min_px,
    max_px) or the faults catalogue (trickle_seconds: how long the trickle lasts).
    """
    if kind == "faults":
        return _faults_catalogue(seed, **sizes)
    if kind == "demo":
        return _demo_catalogue(seed, **sizes)
    raise ValueError(f"unknown catalogue kind {kind!r}; use 'faults' or 'demo'")


def big_catalogue(n_records: int, seed: int = 0, n_bodies: int = 32, size: int = 32,
                  n_classes: int = 100, split: str = "train") -> Catalogue:
    """`n_records` tiny images served at /tiny/{i}.jpg, without one Item per record.

    Bodies are a pool of `n_bodies` distinct small JPEGs; labels cycle through `n_classes`
    real leaf ids. Meant for memory/throughput benchmarks of fetch over huge lists.
    """
    rng = random.Random(seed)
    tree = json.loads((resources.files("imatdata") / "data/product_tree.json").read_text())
    leaves = sorted(int(x) for l1 in tree.values() for l2 in l1.values() for l3 in l2.values() for x in l3)
    labels = tuple(rng.sample(leaves, min(n_classes, len(leaves))))
    bodies = tuple(encode(render_product(labels[i % len(labels)], rng, size), "jpeg", quality=85)
                   for i in range(n_bodies))
    cat = Catalogue(kind="big", seed=seed)
    cat.ranges.append(TinyRange(n=n_records, bodies=bodies, labels=labels, split=split, salt=seed))
    return cat


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


# --------------------------------------------------------------------------------------------
# server


def _running_in(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _host_name(host_header: str | None) -> str:
    """'127.0.0.1:8080' -> '127.0.0.1', '[::1]:80' -> '::1', 'localhost' -> 'localhost'."""
    if not host_header:
        return ""
    return urlsplit("//" + host_header).hostname or host_header


class SampleServer:
    """An aiohttp server on 127.0.0.1 (and ::1 when available) at an ephemeral port.

    Instrumentation: `counter[path]` requests per path (query excluded), `request_times[path]`
    their time.monotonic() arrival times, `max_concurrency(host)` peak in-flight requests per
    Host header name. Stateful faults (503/429 then success) count from `reset_counters()`.
    `track_paths=False` keeps per-path records for catalogue items only, so a million
    /tiny/{i}.jpg requests do not grow the server's memory (they count under "/tiny/*").
    """

    def __init__(self, catalogue: Catalogue, *, shutdown_timeout: float = 0.5,
                 track_paths: bool = True) -> None:
        self.catalogue = catalogue
        self.track_paths = track_paths
        self.port: int = 0
        self.counter: Counter[str] = Counter()
        self.request_times: dict[str, list[float]] = defaultdict(list)
        self._inflight: Counter[str] = Counter()
        self._peak: Counter[str] = Counter()
        self._peak_all = 0
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ipv6 = False

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> SampleServer:
        self._closing = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=self._shutdown_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # aiohttp has no public accessor for the bound port
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        # Where localhost resolves to ::1 first, clients must find us there too.
        try:
            site6 = web.TCPSite(self._runner, "::1", self.port)
            await site6.start()
            self.ipv6 = True
        except OSError:
            self.ipv6 = False
        return self

    async def close(self) -> None:
        if self._closing is not None:
            self._closing.set()  # lets trickles stop at once
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SampleServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- addresses and instrumentation -----------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str, host: str = HOSTS[0]) -> str:
        if not path.startswith("/"):
            path = "/" + path
        if ":" in host:  # an IPv6 literal such as ::1
            host = f"[{host}]"
        return f"http://{host}:{self.port}{path}"

    def item_url(self, item: Item) -> str:
        return self.url(item.url_path, item.host)

    def max_concurrency(self, host: str | None = None) -> int:
        """Peak in-flight requests whose Host header names `host` (all hosts when None)."""
        return self._peak_all if host is None else self._peak[host]

    @property
    def total_requests(self) -> int:
        return sum(self.counter.values())

    def reset_counters(self) -> None:
        """Forget requests seen so far (503/429 sequences start over). Safe from any thread."""
        loop = self._loop
        if loop is not None and loop.is_running() and not _running_in(loop):
            # serve_in_thread: clear on the server's own loop, between two requests.
            asyncio.run_coroutine_threadsafe(self._clear_counters_async(), loop).result(timeout=10)
            return
        self._clear_counters()

    async def _clear_counters_async(self) -> None:
        self._clear_counters()

    def _clear_counters(self) -> None:
        self.counter.clear()
        self.request_times.clear()
        self._peak.clear()
        self._peak_all = 0

    # -- handling ---------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        host = _host_name(request.host)
        key = path if self.track_paths or path in self.catalogue.by_path else self._bucket(path)
        self.counter[key] += 1
        nth = self.counter[key]
        if self.track_paths:
            self.request_times[key].append(time.monotonic())
        self._inflight[host] += 1
        self._peak[host] = max(self._peak[host], self._inflight[host])
        self._peak_all = max(self._peak_all, sum(self._inflight.values()))
        try:
            item = self.catalogue.resolve(path)
            if item is None:
                return web.Response(status=404, text="no such sample\n")
            return await self._respond(request, item, nth)
        finally:
            self._inflight[host] -= 1

    def _bucket(self, path: str) -> str:
        for rng in self.catalogue.ranges:
            if path.startswith(rng.prefix):
                return rng.prefix + "*"
        return "*"

    async def _respond(self, request: web.Request, item: Item, nth: int) -> web.StreamResponse:
        p = item.params
        fault = item.fault
        if fault in ("flaky_503", "rate_429") and nth <= int(p.get("fail_first", 1)):
            headers = {}
            if "retry_after" in p:
                headers["Retry-After"] = str(p["retry_after"])
            return web.Response(status=int(p.get("fail_status", 503)), text="try again later\n",
                                headers=headers)
        if fault == "redirect":
            return web.Response(status=item.status or 302, headers={"Location": f"http://{request.host}{p['target']}"})
        if fault == "redirect_private":
            return web.Response(status=item.status or 302, headers={"Location": p["location"]})
        if fault == "reset":
            return await self._reset_connection(request, item)
        if fault == "trickle":
            return await self._trickle(request, item)
        if fault == "stall":
            await self._idle(float(p.get("max_seconds", 60.0)))
        if fault in ("oversize", "oversize_chunked"):
            return await self._oversize(request, item)
        headers = {"Content-Type": item.content_type, **item.headers}
        return web.Response(status=item.status, body=item.body or b"", headers=headers)

    async def _reset_connection(self, request: web.Request, item: Item) -> web.StreamResponse:
        body = item.body or b""
        resp = web.StreamResponse(status=200, headers={"Content-Type": item.content_type})
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: int(len(body) * float(item.params.get("cut_at", 0.5)))])
        await asyncio.sleep(0.05)  # let the first half reach the client before the RST
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER 0 turns close into a TCP RST: a real "connection reset by peer".
                # (Windows wants two u_shorts; an abort there resets the connection anyway.)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            transport.abort()
        return resp

    async def _idle(self, seconds: float) -> None:
        """Sleep, but wake at once when the server closes."""
        assert self._closing is not None
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _trickle(self, request: web.Request, item: Item) -> web.StreamResponse:
        body = item.body or b""
        interval = float(item.params.get("interval", 0.2))
        deadline = time.monotonic() + float(item.params.get("max_seconds", 60.0))
        resp = web.StreamResponse(status=200, headers={"Content-Type": item.content_type})
        resp.content_length = len(body)
        await resp.prepare(request)
        assert self._closing is not None
        try:
            for i in range(len(body)):
                if time.monotonic() > deadline or self._closing.is_set():
                    break
                await resp.write(body[i:i + 1])
                if i == len(body) - 1:
                    break  # no pause after the last byte: in-flight ends when the client has it all
                await self._idle(interval)
        except (ConnectionError, RuntimeError):
            pass  # the client gave up, as it should
        return resp

    async def _oversize(self, request: web.Request, item: Item) -> web.StreamResponse:
        total = int(item.params.get("total_bytes", 25 * MIB))
        resp = web.StreamResponse(status=200, headers={"Content-Type": item.content_type})
        if not item.params.get("chunked", False):
            resp.content_length = total
        await resp.prepare(request)
        # A JPEG header then filler, generated chunk by chunk rather than held whole.
        head = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
        chunk = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        try:
            await resp.write(head)
            sent = len(head)
            while sent < total:
                piece = chunk[: min(len(chunk), total - sent)]
                await resp.write(piece)
                sent += len(piece)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return resp


@contextmanager
def serve_in_thread(catalogue: Catalogue, *, start_timeout: float = 15.0,
                    **server_kw: Any) -> Iterator[SampleServer]:
    """A started SampleServer running on its own event loop in a daemon thread.

    For sync tests, benchmarks and CLI subprocess tests; `server_kw` go to SampleServer
    (e.g. track_paths=False). The counters may be read from the calling thread: they are
    only written by the server's loop, and a test reads them after its requests are done.
    """
    loop = asyncio.new_event_loop()
    srv = SampleServer(catalogue, **server_kw)
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(srv.start())
        except BaseException as exc:  # surfaced to the caller below
            failure.append(exc)
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="imat-sample-server", daemon=True)
    thread.start()
    if not ready.wait(start_timeout):
        raise RuntimeError("sample server did not start in time")
    if failure:
        raise RuntimeError("sample server failed to start") from failure[0]
    try:
        yield srv
    finally:
        asyncio.run_coroutine_threadsafe(srv.close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


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
        tmp = temp_path_for(final)
        try:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
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
            commit_file(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        written[split] = final
    return written


# --------------------------------------------------------------------------------------------
# CLI: python -m imatdata.sample serve --out DIR


async def _serve_forever(kind: str, seed: int, out: Path, records: int) -> None:
    catalogue = big_catalogue(records, seed) if kind == "big" else build_catalogue(kind, seed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGBREAK is what Ctrl-Break (and CTRL_BREAK_EVENT from a parent) sends on Windows.
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGBREAK", None)):
        if sig is None:
            continue
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows: fall back to signal.signal
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    async with SampleServer(catalogue, track_paths=kind != "big") as srv:
        paths = write_lists(catalogue, srv, out)
        write_bytes_atomic(json.dumps({"port": srv.port, "pid": os.getpid(), "kind": kind, "seed": seed,
                                       "url": srv.base_url,
                                       "lists": {k: str(v) for k, v in paths.items()}}).encode(),
                           out / "server.json")
        print(f"sample server ({kind}, {len(catalogue)} records) at {srv.base_url} - lists in {out}",
              flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imatdata.sample",
                                     description="Serve a seeded sample image catalogue on 127.0.0.1.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the server, write the URL lists and server.json")
    serve.add_argument("--out", type=Path, required=True, help="folder for train/val/test.json and server.json")
    serve.add_argument("--kind", choices=("demo", "faults", "big"), default="demo")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--records", type=int, default=1_000_000, help="list length for --kind big")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve_forever(args.kind, args.seed, args.out, args.records))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
