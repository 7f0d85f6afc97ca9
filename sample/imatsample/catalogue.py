"""The seeded catalogues: every record of a sample list, with the bytes and behaviour its URL serves."""

from __future__ import annotations

import functools
import gzip
import io
import json
import random
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

from PIL import Image, ImageDraw

from imatdata.manifest import STATUSES
from imatsample.images import (
    N_STYLES,
    encode,
    exif_rotated,
    html_page,
    jpeg_bomb,
    marked,
    placeholder_image,
    png_bomb,
    render_product,
)

HOSTS: tuple[str, str] = ("127.0.0.1", "localhost")
# A private address no test may ever contact: the fetcher must refuse the redirect before
# connecting. Nothing in this module connects to it either.
PRIVATE_REDIRECT = "http://10.255.255.1/x.jpg"
MIB = 1 << 20

# Statuses an item can expect from `imatdata fetch` with the default flags (--retries 3,
# --max-bytes 20MiB) and a short --timeout: every fetch outcome but `invalid`, which comes
# from the input list, not from a server.
EXPECTED_STATUSES = tuple(s for s in STATUSES if s != "invalid")

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
        upright = marked(b.product(lab(idx), 150).resize((90, 150)))
        b.add(split="train", label=lab(idx), body=exif_rotated(upright, orient), kind=f"exif_rot{orient}",
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
    fault("html", "not_image", body=html_page(), content_type="image/jpeg")
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
    b.add(split="train", label=c0, body=html_page(), kind="html", fault="html", expected="not_image")
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


def two_host_trickles(n: int = 40, interval: float = 0.05) -> Catalogue:
    """`n` tiny bodies on two host names (127.0.0.1 and localhost, alternating), each response
    trickling 4 bytes `interval` s apart so that requests overlap: for tests of concurrency
    caps per host and per run."""
    cat = Catalogue(kind="t", seed=0)
    for i in range(n):
        cat.add(Item(id=f"{i:032x}.jpg", path=f"/slow/{i}", split="train", label=1, body=b"abcd",
                     fault="trickle", host="127.0.0.1" if i % 2 else "localhost",
                     params={"interval": interval, "max_seconds": 5}))
    return cat


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
