"""The sample server really produces each fault, and the catalogues are what they claim."""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import imagehash
import pytest
from PIL import Image, ImageOps

from imatsample import (
    EXPECTED_STATUSES, HOSTS, PRIVATE_REDIRECT, Catalogue, Item, SampleServer, big_catalogue,
    build_catalogue, encode, jpeg_bomb, photo_corpus, product_classes, product_style, render_product,
    serve_in_thread, write_lists,
)

ROOT = Path(__file__).resolve().parents[1]


def _session(**kw: object) -> aiohttp.ClientSession:
    # auto_decompress off: we want to see the bytes exactly as served.
    return aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=20), **kw)


# -- plain HTTP behaviour of each fault ------------------------------------------------------


async def test_status_faults(sample_server: SampleServer) -> None:
    cat = sample_server.catalogue
    async with _session() as s:
        for kind, code in (("http_404", 404), ("http_403", 403), ("http_500", 500)):
            it = cat.one(kind=kind)
            for _ in range(2):  # always fails, not only the first time
                async with s.get(sample_server.item_url(it)) as r:
                    assert r.status == code
            assert sample_server.counter[it.path] == 2
        async with s.get(sample_server.url("/no/such/path.jpg")) as r:
            assert r.status == 404


async def test_503_then_success_and_reset(sample_server: SampleServer) -> None:
    it = sample_server.catalogue.one(kind="flaky_503")
    assert it.params["fail_first"] == 2
    async with _session() as s:
        seen = []
        for _ in range(3):
            async with s.get(sample_server.item_url(it)) as r:
                seen.append(r.status)
                body = await r.read()
        assert seen == [503, 503, 200]
        assert body == it.body
        sample_server.reset_counters()  # the failure sequence starts over
        async with s.get(sample_server.item_url(it)) as r:
            assert r.status == 503
    assert sample_server.counter[it.path] == 1


async def test_429_retry_after(sample_server: SampleServer) -> None:
    it = sample_server.catalogue.one(kind="rate_429")
    async with _session() as s:
        async with s.get(sample_server.item_url(it)) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "1"
        async with s.get(sample_server.item_url(it)) as r:
            assert r.status == 200
            assert await r.read() == it.body
    times = sample_server.request_times[it.path]
    assert len(times) == 2 and times[0] <= times[1]


async def test_reset_mid_body(sample_server: SampleServer) -> None:
    it = sample_server.catalogue.one(kind="reset")
    async with _session() as s:
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
            async with s.get(sample_server.item_url(it)) as r:
                assert r.status == 200
                assert r.content_length == len(it.body or b"")
                await r.read()


async def test_trickle_is_slow(sample_server: SampleServer) -> None:
    it = sample_server.catalogue.one(kind="trickle")
    interval = it.params["interval"]
    async with _session() as s:
        async with s.get(sample_server.item_url(it)) as r:
            assert r.status == 200
            t0 = time.monotonic()
            got = b""
            while len(got) < 4:
                got += await r.content.read(4 - len(got))
            elapsed = time.monotonic() - t0
    # 4 bytes at one byte per interval: at least ~3 intervals; the whole body would take minutes.
    assert elapsed >= 2.5 * interval
    assert len(it.body or b"") * interval > 60
    assert got == (it.body or b"")[:4]


async def test_truncated_html_empty_bomb(sample_server: SampleServer) -> None:
    cat = sample_server.catalogue
    async with _session() as s:
        tr = cat.one(kind="truncated")
        async with s.get(sample_server.item_url(tr)) as r:
            body = await r.read()
            assert r.content_length == len(body) == len(tr.body or b"") < tr.params["full_length"]
        assert body.startswith(b"\xff\xd8")
        with pytest.raises(OSError):
            Image.open(io.BytesIO(body)).load()

        html = cat.one(kind="html")
        async with s.get(sample_server.item_url(html)) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("image/")
            assert (await r.read()).startswith(b"<html")

        empty = cat.one(kind="empty")
        async with s.get(sample_server.item_url(empty)) as r:
            assert r.status == 200 and await r.read() == b""

        for kind in ("bomb_png", "bomb_jpeg"):
            bomb = cat.one(kind=kind)
            async with s.get(sample_server.item_url(bomb)) as r:
                data = await r.read()
            assert len(data) < 10_000
            with pytest.raises(Image.DecompressionBombError):
                Image.open(io.BytesIO(data))


async def test_oversize_streams(sample_server: SampleServer) -> None:
    cat = sample_server.catalogue
    async with _session() as s:
        for kind, chunked in (("oversize", False), ("oversize_chunked", True)):
            it = cat.one(kind=kind)
            async with s.get(sample_server.item_url(it)) as r:
                assert r.status == 200
                if chunked:
                    assert r.content_length is None
                    assert r.headers.get("Transfer-Encoding") == "chunked"
                else:
                    assert r.content_length == it.params["total_bytes"] > 20 * (1 << 20)
                n = 0
                async for chunk in r.content.iter_chunked(1 << 20):
                    n += len(chunk)
            assert n == it.params["total_bytes"]


async def test_redirects_gzip_noai(sample_server: SampleServer) -> None:
    cat = sample_server.catalogue
    async with _session() as s:
        red = cat.one(kind="redirect")
        async with s.get(sample_server.item_url(red), allow_redirects=False) as r:
            assert r.status == 302
            loc = r.headers["Location"]
        assert loc == sample_server.url(red.params["target"], red.host)
        async with s.get(loc) as r:
            assert r.status == 200
            assert (await r.read()).startswith(b"\xff\xd8")

        priv = cat.one(kind="redirect_private")
        # Never follow it: this test only reads the Location header.
        async with s.get(sample_server.item_url(priv), allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == PRIVATE_REDIRECT

        gz = cat.one(kind="gzip")
        async with s.get(sample_server.item_url(gz)) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            raw = await r.read()
        decoded = gzip.decompress(raw)
        assert decoded.startswith(b"\xff\xd8") and len(decoded) == gz.params["decoded_length"]

        bomb = cat.one(kind="gzip_bomb")
        assert len(bomb.body or b"") < 100_000 and bomb.params["decoded_length"] > 20 * (1 << 20)

        noai = cat.one(kind="noai")
        async with s.get(sample_server.item_url(noai)) as r:
            assert r.headers["X-Robots-Tag"] == "noai"


async def test_localhost_and_concurrency_per_host(sample_server: SampleServer) -> None:
    it = sample_server.catalogue.one(kind="trickle")
    async with _session() as s:
        async with s.get(sample_server.url("/jpeg/x", host="localhost")) as r:
            assert r.status == 404  # reached the server by name
        sample_server.reset_counters()

        async def hold(host: str) -> None:
            async with s.get(sample_server.url(it.path, host=host)) as r:
                await r.content.read(1)
                await asyncio.sleep(0.3)

        await asyncio.gather(*[hold("localhost") for _ in range(3)], hold("127.0.0.1"))
    assert sample_server.max_concurrency("localhost") == 3
    assert sample_server.max_concurrency("127.0.0.1") == 1
    assert sample_server.max_concurrency() == 4
    assert sample_server.counter[it.path] == 4


async def test_stall_sends_nothing(sample_server: SampleServer) -> None:
    it = sample_server.catalogue.one(kind="stall")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.6)) as s:
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            async with s.get(sample_server.item_url(it)) as r:
                await r.read()
        assert time.monotonic() - t0 >= 0.5
    assert sample_server.counter[it.path] == 1


def test_serve_in_thread_from_sync_code(faults_catalogue: Catalogue) -> None:
    import urllib.error
    import urllib.request

    it = faults_catalogue.one(kind="jpeg")
    flaky = faults_catalogue.one(kind="flaky_503")
    with serve_in_thread(faults_catalogue) as srv:
        with urllib.request.urlopen(srv.item_url(it), timeout=10) as r:
            assert r.read() == it.body
        assert srv.counter[it.path] == 1
        for _ in range(2):
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(srv.item_url(flaky), timeout=10)
        srv.reset_counters()  # from this thread, while the server's loop runs in another
        assert not srv.counter
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(srv.item_url(flaky), timeout=10)
    with pytest.raises(OSError):  # closed afterwards
        urllib.request.urlopen(srv.item_url(it), timeout=2)


# -- catalogue contents ----------------------------------------------------------------------


def test_catalogue_is_deterministic(faults_catalogue: Catalogue) -> None:
    again = build_catalogue("faults", seed=0)
    assert [(i.id, i.path, i.label, i.body) for i in again.items] == \
           [(i.id, i.path, i.label, i.body) for i in faults_catalogue.items]
    other = build_catalogue("faults", seed=1)
    assert {i.id for i in other.items}.isdisjoint({i.id for i in faults_catalogue.items})


def test_every_item_has_a_known_expected_status(faults_catalogue: Catalogue) -> None:
    expected = faults_catalogue.expected()
    assert set(expected.values()) == set(EXPECTED_STATUSES)
    kinds = {i.kind: i.expected_status for i in faults_catalogue.listed()}
    assert kinds["trickle"] == "timeout" and kinds["reset"] == "connection_error"
    assert kinds["redirect_private"] == "blocked" and kinds["noai"] == "opted_out"
    assert kinds["flaky_503"] == kinds["rate_429"] == kinds["redirect"] == kinds["gzip"] == "ok"
    assert kinds["noai_otherbot"] == "ok"


def test_image_variety(faults_catalogue: Catalogue) -> None:
    def img(kind: str) -> Image.Image:
        return Image.open(io.BytesIO(faults_catalogue.one(kind=kind).body or b""))

    assert img("jpeg").format == "JPEG" and img("jpeg").mode == "RGB"
    assert img("cmyk").mode == "CMYK" and img("cmyk").format == "JPEG"
    assert faults_catalogue.one(kind="cmyk").id.endswith(".png")  # extension lies
    assert img("png_alpha").mode == "RGBA"
    assert img("png_alpha").getchannel("A").getextrema() == (0, 255)
    pal = img("png_palette")
    assert pal.mode == "P" and "transparency" in pal.info
    assert img("bmp").format == "BMP"
    assert img("webp").format == "WEBP"
    assert img("gray").mode == "L"
    assert img("tiny").size == (20, 30)
    assert img("large").size == (2000, 1500)
    for orient in (6, 8):
        item = faults_catalogue.one(kind=f"exif_rot{orient}")
        im = Image.open(io.BytesIO(item.body or b""))
        assert im.getexif()[0x0112] == orient
        w, h = item.params["upright_size"]
        assert im.size == (h, w)  # stored sideways
        upright = ImageOps.exif_transpose(im)
        assert upright.size == (w, h) and w != h
        r, g, b = upright.convert("RGB").getpixel((2, 2))  # the red marker is top-left
        assert r > 150 and g < 100 and b < 100


def test_duplicates_leak_placeholder(faults_catalogue: Catalogue) -> None:
    cat = faults_catalogue
    exact = cat.one(kind="exact_dup")
    assert exact.body == cat.by_id[exact.dup_of].body and exact.id != exact.dup_of
    near = cat.one(kind="near_dup")
    orig = cat.by_id[near.dup_of]
    assert near.body != orig.body
    h1, h2 = (imagehash.phash(Image.open(io.BytesIO(x.body or b""))) for x in (near, orig))
    assert h1 - h2 <= 4
    cross = cat.one(kind="cross_class_dup")
    assert cross.body == cat.by_id[cross.dup_of].body and cross.label != cat.by_id[cross.dup_of].label
    leak = cat.one(kind="leak")
    assert leak.split == "train" and cat.by_id[leak.dup_of].split == "val"
    assert leak.body == cat.by_id[leak.dup_of].body and leak.expected_drop == "leak"
    ph = cat.where(kind="placeholder")
    assert len(ph) >= 10 and len({p.label for p in ph}) >= 3 and len({p.body for p in ph}) == 1
    assert {p.expected_drop for p in ph} == {"placeholder"}
    assert cat.one(kind="tiny").expected_drop == "undersized"
    # Failed fetches are dropped as fetch_failed, except in test where rows always stay.
    for it in cat.listed():
        if it.expected_status != "ok":
            assert it.expected_drop == (None if it.split == "test" else "fetch_failed"), it.kind


def test_catalogue_add_and_copy(faults_catalogue: Catalogue) -> None:
    n = len(faults_catalogue)
    body = encode(render_product(5, random.Random(1), 64), "png")
    it = faults_catalogue.add(Item(id="f" * 32 + ".jpg", path="/mine/1.png", split="train", label=5,
                                   body=body, content_type="image/png", kind="png"))
    assert faults_catalogue.by_id[it.id] is it and faults_catalogue.resolve("/mine/1.png") is it
    assert len(faults_catalogue) == n + 1
    with pytest.raises(ValueError):
        faults_catalogue.add(Item(id="e" * 32 + ".jpg", path="/mine/1.png", split="train", label=5, body=b""))
    with pytest.raises(ValueError):
        faults_catalogue.add(Item(id="f" * 32 + ".jpg", path="/mine/2.png", split="train", label=5, body=b""))


def test_lists_schema_and_hosts(faults_catalogue: Catalogue, tmp_path: Path) -> None:
    with serve_in_thread(faults_catalogue) as srv:
        paths = write_lists(faults_catalogue, srv, tmp_path)
        jl = write_lists(faults_catalogue, srv, tmp_path / "jl", fmt="jsonl")
        cs = write_lists(faults_catalogue, srv, tmp_path / "csv", fmt="csv")
    assert set(paths) == {"train", "val", "test"}
    hosts = set()
    for split, p in paths.items():
        assert p.name == f"{split}.json"
        images = json.loads(p.read_text())["images"]
        assert len(images) == len(faults_catalogue.listed(split))
        for rec in images:
            assert set(rec) == ({"id", "url"} if split == "test" else {"id", "url", "class"})
            stem, ext = rec["id"].rsplit(".", 1)
            assert len(stem) == 32 and int(stem, 16) >= 0 and ext in ("jpg", "png", "bmp")
            assert rec["url"].startswith("http://") and "?" in rec["url"]
            if split != "test":
                assert isinstance(rec["class"], int)
            hosts.add(rec["url"].split("/")[2].split(":")[0])
    assert hosts == set(HOSTS)
    assert [json.loads(x) for x in jl["train"].read_text().splitlines()] == \
           json.loads(paths["train"].read_text())["images"]
    rows = list(csv.DictReader(io.StringIO(cs["test"].read_text())))
    assert rows and set(rows[0]) == {"id", "url"}


def test_demo_catalogue(demo_catalogue: Catalogue) -> None:
    cat = demo_catalogue
    classes = product_classes()
    assert len(set(classes)) == len(classes) == 9
    assert len({product_style(c)[:2] for c in classes}) == 9  # distinct shape and hue
    train = Counter(i.label for i in cat.listed("train") if i.kind == "jpeg")
    assert set(train) == set(classes)
    assert 30 <= min(train.values()) < max(train.values()) <= 64  # mild imbalance
    assert len({i.label for i in cat.listed("train")[:60]}) == 9  # shuffled, not sorted by class
    val = Counter(i.label for i in cat.listed("val"))
    assert set(val.values()) == {10}
    assert len(cat.listed("test")) >= 30 and all(i.label is None for i in cat.listed("test"))
    statuses = Counter(i.expected_status for i in cat.listed())
    for s in ("http_error", "decode_error", "not_image", "blocked"):
        assert statuses[s] >= 1
    kinds = {i.kind for i in cat.listed()}
    assert {"flaky_503", "rate_429", "tiny", "exact_dup", "near_dup", "placeholder"} <= kinds
    sizes = {Image.open(io.BytesIO(i.body or b"")).size for i in cat.listed("train") if i.kind == "jpeg"}
    assert all(96 <= w <= 160 and w == h for w, h in sizes) and len(sizes) > 10
    t0 = time.perf_counter()
    again = build_catalogue("demo", seed=0)
    assert time.perf_counter() - t0 < 10  # budget is 5 s on an idle core; CI cores are shared
    assert [i.body for i in again.items] == [i.body for i in cat.items]


def test_render_product_is_seeded_and_varied() -> None:
    import numpy as np

    a = render_product(398, random.Random(3), 96)
    assert a.size == (96, 96) and a.mode == "RGB"
    assert a.tobytes() == render_product(398, random.Random(3), 96).tobytes()
    assert a.tobytes() != render_product(398, random.Random(4), 96).tobytes()
    assert render_product(398, np.random.default_rng(0), 64).size == (64, 64)


def test_photo_corpus() -> None:
    t0 = time.perf_counter()
    corpus = photo_corpus(300, seed=0, pool=12)
    assert time.perf_counter() - t0 < 20
    assert len(corpus) == 300 and len(set(corpus)) == 300
    sizes = [len(b) for b in corpus[:12]]
    assert 60_000 <= min(sizes) and max(sizes) <= 200_000, sizes
    im = Image.open(io.BytesIO(corpus[-1]))
    im.load()
    assert 600 <= min(im.size) and max(im.size) <= 900


async def test_big_catalogue_serves_by_pattern(tmp_path: Path) -> None:
    cat = big_catalogue(100_000, seed=0, n_bodies=4)
    assert not cat.items and len(cat) == 100_000
    async with SampleServer(cat, track_paths=False) as srv:
        paths = write_lists(cat, srv, tmp_path)
        images = json.loads(paths["train"].read_text())["images"]
        assert len(images) == 100_000 and len({r["id"] for r in images}) == 100_000
        async with _session() as s:
            for rec in (images[0], images[99_999]):
                async with s.get(rec["url"]) as r:
                    assert r.status == 200 and (await r.read()).startswith(b"\xff\xd8")
            async with s.get(srv.url("/tiny/100000.jpg")) as r:
                assert r.status == 404
    # Untracked: a million distinct paths would cost the server memory, so they share a key.
    assert dict(srv.counter) == {"/tiny/*": 3} and not srv.request_times


def test_serve_cli(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "imatsample", "serve", "--out", str(tmp_path),
                             "--kind", "faults"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert "http://127.0.0.1:" in line
        info = json.loads((tmp_path / "server.json").read_text())
        assert info["pid"] == proc.pid
        for split in ("train", "val", "test"):
            assert (tmp_path / f"{split}.json").exists()
        first = json.loads((tmp_path / "train.json").read_text())["images"][0]
        assert f":{info['port']}/" in first["url"]
        import urllib.request

        with urllib.request.urlopen(first["url"], timeout=10) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
        if proc.stdout:
            proc.stdout.close()
    assert rc == 0 or os.name == "nt"  # Windows has no SIGTERM handler: terminate() is abrupt


async def test_fixtures_async(sample_server: SampleServer, sample_lists: dict[str, Path]) -> None:
    rec = json.loads(sample_lists["train"].read_text())["images"][0]
    async with _session() as s:
        async with s.get(rec["url"]) as r:
            assert r.status == 200
    assert sample_server.total_requests == 1


def test_fixtures_sync(sample_server_thread: SampleServer, sample_lists_thread: dict[str, Path],
                       tmp_root: Path) -> None:
    import urllib.request

    rec = json.loads(sample_lists_thread["val"].read_text())["images"][0]
    with urllib.request.urlopen(rec["url"], timeout=10) as r:
        assert r.status == 200
    assert sample_server_thread.total_requests == 1
    assert os.environ["IMAT_ROOT"] == str(tmp_root) and not tmp_root.exists()


def test_jpeg_bomb_walks_segments() -> None:
    small = encode(render_product(1, random.Random(0), 48), "jpeg")
    assert Image.open(io.BytesIO(small)).size == (48, 48)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(jpeg_bomb(small)))
    with pytest.raises(ValueError):
        jpeg_bomb(b"\xff\xd8\xff\xda\x00\x02")
