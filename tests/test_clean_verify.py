"""Near duplicates need a second look (issue #16): real JPEGs, real Parquet, the real clean.

A phash match between different pictures (same silhouette, other colour or shade; a chain of
overlapping crops) must not drop anything; re-encoded copies must still be found; groups,
placeholders, conflicts and leaks stand only on exact or confirmed links.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from imatsample.shards import jpeg, manifest_row, write_shards
from PIL import Image, ImageDraw

from imatdata import clean as clean_mod
from imatdata.clean import dedup
from imatdata.manifest import RAW_SCHEMA, read_table

# Colours of (nearly) one luma and far-apart hues (red, green, blue, purple, teal, grey):
# their phashes collide, their chroma does not.
SAME_LUMA = [(200, 40, 40), (40, 120, 60), (60, 70, 230), (150, 60, 160), (20, 110, 120), (88, 88, 88)]


def product(fill: tuple[int, int, int], size: int = 256) -> Image.Image:
    """A product shot: one object centred on white."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((60, 40, 200, 220), fill=fill)
    return img


def photo(seed: int, size: tuple[int, int] = (320, 320)) -> Image.Image:
    """A smooth random colour field with some detail: distinct seeds are far apart in phash."""
    g = np.random.default_rng(seed)
    cells = (g.random((6, 6, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(cells, "RGB").resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = (float(v) for v in g.uniform(0, 1, 2) * size)
        draw.ellipse((x - 12, y - 12, x + 12, y + 12), fill=tuple(int(c) for c in g.integers(0, 256, 3)))
    return img


def look(body: bytes) -> tuple[int, np.ndarray]:
    return clean_mod.image_phash(body), np.frombuffer(clean_mod.image_signature(body), np.uint8)


def distance(a: bytes, b: bytes) -> int:
    return int(dedup.hamming(look(a)[0], look(b)[0]))


def confirmed(a: bytes, b: bytes) -> bool:
    (pa, sa), (pb, sb) = look(a), look(b)
    d = np.array([int(dedup.hamming(pa, pb))])
    return bool(dedup.confirm_pairs(sa[None], sb[None], d)[0])


def linked(a: bytes, b: bytes, hash_distance: int) -> bool:
    """Whether clean's candidate search (phash, crop windows, halves) and second look pair a, b."""
    from imatdata.clean.checks import image_crop_signatures, image_fine_hashes, image_windows

    looks = [look(a), look(b)]
    i, _, _ = dedup.confirmed_pairs(np.array([p for p, _ in looks]), np.stack([s for _, s in looks]),
                                    hash_distance, windows=np.stack([image_windows(a), image_windows(b)]),
                                    crop_signatures=np.stack([image_crop_signatures(a), image_crop_signatures(b)]),
                                    fine=np.stack([image_fine_hashes(a), image_fine_hashes(b)]))
    return i.size == 1


def run_clean(root: Path, rows: list[dict], **kw: object) -> tuple[clean_mod.CleanResult, dict[str, tuple[str, str]]]:
    for split in sorted({r["split"] for r in rows}):
        write_shards(root / "raw" / split, [r for r in rows if r["split"] == split], schema=RAW_SCHEMA)
    cfg = clean_mod.CleanConfig(**{"workers": 1, **kw})  # type: ignore[arg-type]
    result = clean_mod.clean(root, cfg, write_stats=False)
    dropped = {r["id"]: (r["reason"], r["detail"]) for r in pq.read_table(root / "clean" / "dropped.parquet").to_pylist()}
    return result, dropped


def row(id_: str, split: str, label: int | None, body: bytes) -> dict:
    return manifest_row(id_, split, label, body, sha256=True)


def test_distinct_images_with_colliding_phashes_are_kept(tmp_path: Path) -> None:
    bodies = [jpeg(product(c)) for c in SAME_LUMA[:4]]
    assert all(distance(bodies[0], b) <= 4 for b in bodies[1:])  # the phashes do collide
    assert not any(confirmed(bodies[0], b) for b in bodies[1:])
    # Before the second look these were a tie (label_conflict) and a leak.
    rows = [row("red", "train", 1, bodies[0]), row("green", "train", 2, bodies[1]),
            row("blue", "val", 3, bodies[2]), row("purple", "test", None, bodies[3])]
    result, dropped = run_clean(tmp_path, rows)
    assert dropped == {}
    assert result.candidate_pairs >= 3 and result.confirmed_pairs == 0 and result.groups == 0
    assert read_table(tmp_path / "clean" / "train").num_rows == 2


def test_planted_copies_are_found(tmp_path: Path) -> None:
    original = photo(1)
    big = jpeg(original, 92)
    rows = [row("orig", "train", 1, big),
            row("q50", "train", 1, jpeg(original, 50)),  # re-encoded
            row("small", "train", 1, jpeg(original.resize((200, 200), Image.Resampling.LANCZOS), 85)),
            row("other", "train", 1, jpeg(photo(2), 92))]
    _, dropped = run_clean(tmp_path, rows)
    assert dropped.keys() == {"q50", "small"}
    for copy in ("q50", "small"):
        reason, detail = dropped[copy]
        assert reason == "near_duplicate" and detail.startswith("kept=orig distance=")


def test_a_chain_of_neighbours_is_not_one_group(tmp_path: Path) -> None:
    # Three overlapping windows of one wide picture: A~B and B~C are the same picture within
    # a small crop, A and C are not. A is the largest, so it represents its group.
    wide = photo(5, (480, 320))
    a = jpeg(wide.crop((0, 0, 320, 320)).resize((330, 330), Image.Resampling.LANCZOS))
    b = jpeg(wide.crop((8, 0, 328, 320)))
    c = jpeg(wide.crop((16, 0, 336, 320)))
    assert distance(a, c) <= 10  # A and C are candidates...
    assert confirmed(a, b) and confirmed(b, c) and not confirmed(a, c)  # ...that the second look rejects
    # Chained, C would have gone as B's and so A's neighbour with another label.
    _, dropped = run_clean(tmp_path, [row("A", "train", 1, a), row("B", "train", 1, b), row("C", "train", 2, c)],
                           hash_distance=10)
    assert dropped == {"B": ("near_duplicate", f"kept=A distance={distance(a, b)}")}


def test_placeholders_and_conflicts_come_only_from_confirmed_groups(tmp_path: Path) -> None:
    # Six different objects of one silhouette over six classes collide in phash: not a
    # placeholder (from 5 URLs here), not a conflict. One picture re-encoded for twelve URLs
    # over four classes is a placeholder.
    lookalikes = [row(f"look{k}", "train", 10 + k, jpeg(product(c))) for k, c in enumerate(SAME_LUMA)]
    dead = photo(4)
    placeholder = [row(f"dead{k}", "train", k % 4, jpeg(dead, 60 + 3 * k)) for k in range(12)]
    conflict = photo(5)
    pair = [row("x1", "train", 30, jpeg(conflict, 90)), row("x2", "train", 31, jpeg(conflict, 70))]
    result, dropped = run_clean(tmp_path, lookalikes + placeholder + pair, placeholder_min_urls=5)
    assert result.candidate_pairs > result.confirmed_pairs
    assert {k: v[0] for k, v in dropped.items()} == {**{f"dead{k}": "placeholder" for k in range(12)},
                                                      "x1": "label_conflict", "x2": "label_conflict"}
    assert dropped["dead0"][1] == "urls=12 classes=4 rows=12"
    assert dropped["x1"][1] == "tie labels=30,31 rows=2"


def test_a_leak_needs_confirmation(tmp_path: Path) -> None:
    held = photo(6)
    val = jpeg(held, 90)
    twin = jpeg(product(SAME_LUMA[1]))
    rows = [row("val", "val", 1, val), row("val_lookalike", "val", 2, jpeg(product(SAME_LUMA[0]))),
            row("copy", "train", 1, jpeg(held, 60)), row("lookalike", "train", 3, twin)]
    _, dropped = run_clean(tmp_path, rows)
    assert dropped == {"copy": ("leak", f"twin=val split=val distance={distance(val, jpeg(held, 60))}")}


def test_every_drop_names_a_row_it_was_confirmed_against(tmp_path: Path) -> None:
    # A mixed bag: copies, lookalikes and a chain, across labels and splits.
    wide = photo(7, (480, 320))
    bodies = {
        "p": jpeg(photo(8)), "p_q60": jpeg(photo(8), 60), "p_small": jpeg(photo(8).resize((240, 240)), 80),
        "w0": jpeg(wide.crop((0, 0, 320, 320))), "w1": jpeg(wide.crop((12, 0, 332, 320))),
        "w2": jpeg(wide.crop((24, 0, 344, 320))), **{f"l{k}": jpeg(product(c)) for k, c in enumerate(SAME_LUMA[:5])},
    }
    labels = {"p": 1, "p_q60": 2, "p_small": 2, "w0": 3, "w1": 4, "w2": 3}
    rows = [row(k, "val" if k == "w2" else "train", labels.get(k, 20), b) for k, b in bodies.items()]
    _, dropped = run_clean(tmp_path, rows, hash_distance=10)
    assert dropped
    for id_, (reason, detail) in dropped.items():
        named = next((w.split("=", 1)[1] for w in detail.split() if w.startswith(("kept=", "twin="))), None)
        if detail.startswith("tie "):  # a label tie names no keeper: its rows are linked to each other
            tied = [k for k, (_, d) in dropped.items() if d == detail and k != id_]
            assert any(linked(bodies[id_], bodies[k], 10) for k in tied), (id_, reason, detail)
            continue
        assert named is not None and linked(bodies[id_], bodies[named], 10), (id_, reason, detail)


def test_phash_is_imagehash_phash_of_the_draft() -> None:
    # The YCbCr draft and the shared resize leave the stored phash exactly what it was.
    bodies = [jpeg(photo(s), q) for s in range(9, 14) for q in (60, 95)] + [jpeg(product(c)) for c in SAME_LUMA[:3]]
    bodies += [jpeg(photo(17, (500, 140))), jpeg(photo(18, (70, 90)))]
    if int(Image.__version__.split(".")[0]) >= 13:  # its resize of a tall image, as clean's (see below)
        bodies.append(jpeg(photo(19, (140, 500))))
    grey = io.BytesIO()
    photo(15).convert("L").save(grey, format="JPEG")
    png = io.BytesIO()
    photo(16).save(png, format="PNG")
    for body in [*bodies, grey.getvalue(), png.getvalue()]:
        img = Image.open(io.BytesIO(body))
        if img.format == "JPEG":
            img.draft("L", (64, 64))
        img.load()
        assert clean_mod.image_phash(body) == clean_mod.phash_int64(img)
        assert len(clean_mod.image_signature(body)) == dedup.SIG_BYTES


@pytest.mark.parametrize("dedup_mode", ["exact", "off"])
def test_other_modes_take_no_second_look(tmp_path: Path, dedup_mode: str) -> None:
    copy = photo(17)
    rows = [row("a", "train", 1, jpeg(copy, 90)), row("b", "train", 1, jpeg(copy, 60)),
            row("c", "train", 1, jpeg(copy, 90))]
    result, dropped = run_clean(tmp_path, rows, dedup=dedup_mode)
    assert result.candidate_pairs == 0
    assert dropped == ({"c": ("duplicate", "kept=a distance=0")} if dedup_mode == "exact" else {})


def boxed_product(seed: int) -> Image.Image:
    """A product shot with a label and a logo: a box on white, its colours drawn from `seed`."""
    g = np.random.default_rng(seed)
    img = Image.new("RGB", (400, 400), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle((110, 60, 290, 360), radius=30, fill=tuple(int(c) for c in g.integers(0, 200, 3)))
    draw.rectangle((140, 150, 260, 230), fill=tuple(int(c) for c in g.integers(100, 256, 3)))
    draw.ellipse((170, 260, 230, 320), fill=tuple(int(c) for c in g.integers(0, 256, 3)))
    return img


def test_a_cropped_and_an_overlaid_copy_are_found_at_default_settings(tmp_path: Path) -> None:
    from PIL import ImageFont

    shot = boxed_product(3)
    cropped = jpeg(shot.crop((16, 4, 396, 384)), 85)  # 5% off each axis: 4% left, 1% right, 1% top, 4% bottom
    scene = photo(14, (400, 400))
    marked = scene.copy()
    ImageDraw.Draw(marked).text((20, 250), "SALE -30%", font=ImageFont.load_default(size=36), fill=(255, 255, 255))
    overlaid = jpeg(marked, 85)
    # Neither copy is within the default 4 bits of its source's phash: a crop window and a half
    # are what find them.
    assert distance(jpeg(shot), cropped) > 4 and distance(jpeg(scene), overlaid) > 4
    rows = [row("shot", "train", 1, jpeg(shot)), row("shot_crop", "train", 1, cropped),
            row("scene", "train", 2, jpeg(scene)), row("scene_text", "train", 2, overlaid)]
    result, dropped = run_clean(tmp_path, rows)
    assert result.config.hash_distance == 4
    assert {k: (v[0], v[1].split()[0]) for k, v in dropped.items()} == {
        "shot_crop": ("near_duplicate", "kept=shot"), "scene_text": ("near_duplicate", "kept=scene")}


def test_window_lookalikes_are_kept(tmp_path: Path) -> None:
    # One box in six colours of one luma, each cropped a little: crop windows and halves make
    # them candidates of each other; the second look keeps them apart.
    fills = SAME_LUMA
    rows = []
    for k, fill in enumerate(fills):
        img = Image.new("RGB", (400, 400), (255, 255, 255))
        ImageDraw.Draw(img).rounded_rectangle((110, 60, 290, 360), radius=30, fill=fill)
        rows.append(row(f"box{k}", "train", 40 + k, jpeg(img.crop((8 * (k % 3), 8 * (k // 3), 400, 400)))))
    result, dropped = run_clean(tmp_path, rows)
    assert result.candidate_pairs > 0 and result.confirmed_pairs == 0
    assert dropped == {}


def test_a_crop_of_a_busy_photo_is_confirmed_on_its_window(tmp_path: Path) -> None:
    # A photo whose colour changes everywhere, cropped 5% per axis (4% + 1%): a crop window
    # finds it, but every cell of the whole thumbnails changed. The window's own thumbnails
    # confirm it; the whole ones alone would not.
    scene = photo(21, (400, 400))
    source, cropped = jpeg(scene, 90), jpeg(scene.crop((16, 4, 396, 384)), 85)
    assert distance(source, cropped) > 4 and not confirmed(source, cropped)
    assert linked(source, cropped, 4)
    _, dropped = run_clean(tmp_path, [row("scene", "train", 1, source), row("scene_crop", "train", 1, cropped)])
    assert {k: (v[0], v[1].split()[0]) for k, v in dropped.items()} == {"scene_crop": ("near_duplicate", "kept=scene")}


@pytest.mark.parametrize("filt", [Image.Resampling.LANCZOS, Image.Resampling.BOX])
def test_resize_is_pillows_bit_for_bit(filt: Image.Resampling) -> None:
    # clean's own resize (weights made once per size, matrix products) gives Pillow's result
    # exactly: the phash and the signature are what imagehash and Pillow would make. Pillow
    # 13 makes the vertical pass first for images over twice as tall as wide (older ones
    # always horizontal first): those sizes are compared there only.
    from imatdata.clean.checks import _resize

    pillow13 = int(Image.__version__.split(".")[0]) >= 13
    g = np.random.default_rng(8)
    out = 32 if filt == Image.Resampling.LANCZOS else 4
    sizes = [(64, 64), (95, 127), (128, 128), (127, 300), (300, 127), (33, 40), (32, 90), (90, 32), (20, 12),
             (1500, 70), (70, 1500), (31, 31), (32, 32)]
    sizes += [tuple(int(v) for v in g.integers(5, 400, 2)) for _ in range(30)]
    for w, h in sizes:
        if not pillow13 and h - out > 0 and h - out > 2 * (w - out):
            continue
        plane = g.integers(0, 256, (h, w), dtype=np.uint8)
        if g.random() < 0.5:  # hard edges: Lanczos overshoots, so the clipping counts
            plane = np.where(plane > 128, 255, 0).astype(np.uint8)
        got = _resize(np.stack([plane, 255 - plane]), out, out, filt)
        for k, p in enumerate((plane, 255 - plane)):
            assert np.array_equal(got[k], np.asarray(Image.fromarray(p).resize((out, out), filt))), (w, h, k)


def test_a_batch_hashes_as_single_images_do() -> None:
    # hash_batch resizes colour JPEG drafts together; any other image alone. Each row comes out
    # as the one-image functions say, whatever the batch around it.
    from imatdata.clean.checks import hash_batch, image_crop_signatures, image_fine_hashes, image_windows

    grey, png, cmyk = io.BytesIO(), io.BytesIO(), io.BytesIO()
    photo(30, (200, 150)).convert("L").save(grey, format="JPEG")
    photo(31, (90, 260)).save(png, format="PNG")
    photo(32).convert("CMYK").save(cmyk, format="JPEG")
    bodies = [jpeg(photo(33, (400, 300))), grey.getvalue(), jpeg(photo(34, (130, 500))), png.getvalue(), None,
              cmyk.getvalue(), b"not an image", jpeg(photo(35, (20, 20))), jpeg(product(SAME_LUMA[2], 512))]
    rows = hash_batch(bodies, [True] * len(bodies))
    for body, got in zip(bodies, rows):
        if body is None or body == b"not an image":
            assert got.error is not None and got.phash is None
            continue
        assert got.error is None
        assert (got.phash, got.signature) == look_bytes(body)
        assert got.windows == image_windows(body).tobytes()
        assert got.crop_signatures == image_crop_signatures(body).tobytes()
        assert got.fine == image_fine_hashes(body).tobytes()
        assert rows[bodies.index(body)] == hash_batch([body], [True])[0]


def look_bytes(body: bytes) -> tuple[int, bytes]:
    return clean_mod.image_phash(body), clean_mod.image_signature(body)


LOOKALIKES = Path(__file__).parent / "data" / "lookalikes"


def test_grey_objects_on_white_that_pass_the_signatures_are_kept(tmp_path: Path) -> None:
    # Two different dark objects of one size and place on white, from bench/dedup.py's corpus
    # of 100,000 distinct pictures (seed 1): their phashes are 4 bits apart and their
    # signatures confirm them (neutral chroma; at 8x8 the shapes are a few cells). The fine
    # hashes tell them apart; a re-encode and a 3% crop of one are still found.
    ring, slab = ((LOOKALIKES / f"{name}.jpg").read_bytes() for name in ("ring", "slab"))
    assert distance(ring, slab) <= 4 and confirmed(ring, slab)
    assert not linked(ring, slab, 4)
    picture = Image.open(io.BytesIO(ring)).convert("RGB")
    w, h = picture.size
    copies = {"ring_q60": jpeg(picture, 60), "ring_crop": jpeg(picture.crop((0, 0, w - 4, h - 4)), 90)}
    rows = [row("ring", "train", 1, ring), row("slab", "train", 2, slab),
            *(row(name, "train", 1, body) for name, body in copies.items())]
    result, dropped = run_clean(tmp_path, rows)
    assert {k: (v[0], v[1].split()[0]) for k, v in dropped.items()} == {
        "ring_q60": ("near_duplicate", "kept=ring"), "ring_crop": ("near_duplicate", "kept=ring")}


def lookalike(name: str) -> bytes:
    return (LOOKALIKES / f"{name}.jpg").read_bytes()


def overlaid(picture: Image.Image, text: str) -> Image.Image:
    out = picture.copy()
    ImageDraw.Draw(out).text((4, out.height - 14), text, fill=(200, 30, 30))
    return out


@pytest.mark.parametrize("pair", [("bottle_olive", "bottle_black"), ("ring_brown", "ring_grey")])
def test_lookalikes_every_summary_confirms_are_kept(tmp_path: Path, pair: tuple[str, str]) -> None:
    # Two different objects of one shape, size and place on white, from bench/dedup.py's
    # corpus of 1,000,000 distinct pictures (seed 2): phash, signatures and fine hashes all
    # confirm them (an olive bottle with a shadow and a black one; a brown ring on white and a
    # grey one on a grey ground). The close look, at 48x48 colour pixels, keeps them apart;
    # a re-encode, a 3% crop, a brighter copy and a word of text over one are still found.
    a, b = (lookalike(name) for name in pair)
    picture = Image.open(io.BytesIO(a)).convert("RGB")
    a = jpeg(picture, 97)  # the largest body: the keeper its copies are confirmed against
    assert linked(a, b, 4)
    w, h = picture.size
    copies = {"q60": jpeg(picture, 60), "crop": jpeg(picture.crop((0, 0, w - 4, h - 4)), 90),
              "bright": jpeg(picture.point(lambda v: min(255, round(v * 1.1))), 90),
              "text": jpeg(overlaid(picture, "ok"), 90)}
    rows = [row("a", "train", 1, a), row("b", "train", 2, b), *(row(k, "train", 1, c) for k, c in copies.items())]
    result, dropped = run_clean(tmp_path, rows)
    assert {k: (v[0], v[1].split()[0]) for k, v in dropped.items()} == {
        k: ("near_duplicate", "kept=a") for k in copies}
    assert result.confirmed_pairs >= len(copies)


def test_the_close_look_alone() -> None:
    from imatdata.clean import close

    a, b = (close.thumbnail(lookalike(name)) for name in ("bottle_olive", "bottle_black"))
    assert a is not None and b is not None and max(a.size) <= close.THUMB_SIDE
    assert not close.close_agree(a, b)
    assert close.close_agree(a, a.copy())
    w, h = a.size
    trimmed = a.crop((3, 2, w - 1, h))  # found only once aligned
    whole = close._scores(close._view(trimmed, close.NO_TRIM)[None], close._Target(close._view(a, close.NO_TRIM)))[0]
    assert whole > close.CLOSE_LIMIT and close.close_agree(trimmed, a) and close.close_agree(a, trimmed)
    # A blank picture against another: every pixel counts, and white is not black.
    white, black = Image.new("RGB", (60, 60), "white"), Image.new("RGB", (60, 60), "black")
    assert close.close_agree(white, white.copy()) and not close.close_agree(white, black)
    assert close.thumbnail(b"not an image") is None and close.thumbnail(None) is None


def test_close_look_rounds_hold_at_most_their_rows() -> None:
    from imatdata.clean import close

    g = np.random.default_rng(0)
    a, b = g.integers(0, 50, 400), g.integers(50, 100, 400)
    seen = []
    for pairs in close._rounds(a, b, 10):
        assert np.unique(np.concatenate([a[pairs], b[pairs]])).size <= 10
        seen += pairs.tolist()
    assert sorted(seen) == list(range(400))


def test_close_look_reads_only_what_it_compares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows in several row groups and splits, compared in rounds of a few rows: the same
    # verdicts as one round, each pair's thumbnails those of its own rows.
    from imatdata.clean import close
    from imatdata.clean.checks import check_rows

    bodies = {name: lookalike(name) for name in ("bottle_olive", "bottle_black", "ring_brown", "ring_grey")}
    rows = [row(f"{name}{k}", split, 1, jpeg(Image.open(io.BytesIO(body)).convert("RGB"), 70 + 5 * k))
            for k, split in enumerate(["train", "train", "val"]) for name, body in bodies.items()]
    for split in ("train", "val"):
        write_shards(tmp_path / "raw" / split, [r for r in rows if r["split"] == split], schema=RAW_SCHEMA,
                     shard_rows=5, row_group_rows=2)
    table = check_rows(tmp_path / "raw", ["train", "val"], clean_mod.CleanConfig(workers=1), None)
    n = len(rows)
    a, b = np.repeat(np.arange(n), n), np.tile(np.arange(n), n)
    same = np.array([rows[i]["id"][:-1] == rows[j]["id"][:-1] for i, j in zip(a, b)])
    monkeypatch.setattr(close, "ROUND_ROWS", 3)
    decoded: list[int] = []
    thumbnail = close.thumbnail
    monkeypatch.setattr(close, "thumbnail", lambda data: decoded.append(1) or thumbnail(data))
    assert np.array_equal(close.agree_pairs(tmp_path / "raw", table, a, b), same)
    # Re-encodes whose fine hashes agree closely pass without being decoded; the rest is looked at.
    sure = dedup.fine_bits(table.fine[a, 0], table.fine[b, 0]) <= close.SURE_FINE_BITS
    assert same[sure].all() and sure.sum() > n and 0 < len(decoded) < 2 * (~sure).sum()
    monkeypatch.setattr(close, "SURE_FINE_BITS", -1)
    assert np.array_equal(close.agree_pairs(tmp_path / "raw", table, a, b), same)
