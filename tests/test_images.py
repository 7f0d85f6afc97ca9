"""Image work over real bytes: sniffing, bombs, truncation, EXIF, colour modes, resizing."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imatdata.fetch.images import RESIZE_FILTERS, process_image, sniff, target_size, to_rgb
from imatsample import encode, jpeg_bomb, png_bomb, render_product


def rgb(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return render_product(7 + seed, random.Random(seed), max(size)).resize(size)


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def exif_jpeg(upright: Image.Image, orientation: int) -> bytes:
    # Stored sideways; the EXIF orientation turns it upright (6: rotate 90 CW to view).
    stored = upright.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "jpeg", exif=exif.tobytes())


def test_sniff_by_magic_not_name() -> None:
    img = rgb((20, 20))
    for fmt in ("jpeg", "png", "gif", "webp", "bmp"):
        assert sniff(encode(img, fmt)) == fmt
    assert sniff(b"<!DOCTYPE html><html>") is None
    assert sniff(b"") is None
    assert sniff(b"II*\x00rest") == "tiff"


def test_small_rgb_jpeg_kept_byte_for_byte() -> None:
    body = encode(rgb((300, 200)), "jpeg", quality=80)
    res = process_image(body, max_side=512)
    assert res.status == "ok" and res.image == body
    assert (res.width, res.height, res.orig_width, res.orig_height) == (300, 200, 300, 200)
    assert res.sha256 == hashlib.sha256(body).hexdigest() and res.orig_bytes == len(body)


def test_large_jpeg_downscaled_with_draft() -> None:
    body = encode(rgb((2000, 1500)), "jpeg", quality=85)
    res = process_image(body, max_side=512)
    assert res.status == "ok" and res.image_format == "jpeg"
    assert (res.width, res.height) == (512, 384) and (res.orig_width, res.orig_height) == (2000, 1500)
    out = decode(res.image)
    assert out.format == "JPEG" and out.mode == "RGB" and out.size == (512, 384)
    # The picture survives the resize: compare with a plain full-resolution downscale.
    ref = np.asarray(decode(body).resize((512, 384), Image.Resampling.LANCZOS), dtype=np.float32)
    assert np.abs(np.asarray(out, dtype=np.float32) - ref).mean() < 6


def test_every_resize_filter_gives_the_same_picture_and_the_filter_is_applied() -> None:
    body = encode(rgb((900, 640), seed=3), "jpeg", quality=92)  # 1.76x down: no draft, all resize
    ref = np.asarray(decode(body).resize((512, 364), Image.Resampling.LANCZOS), dtype=np.float32)
    stored = {}
    for name in RESIZE_FILTERS:
        res = process_image(body, max_side=512, resize_filter=name)
        assert res.status == "ok" and (res.width, res.height) == (512, 364), name
        out = np.asarray(decode(res.image), dtype=np.float32)
        assert np.abs(out - ref).mean() < 4, name  # antialiased: close to a lanczos downscale
        stored[name] = res.image
    assert len(set(stored.values())) == len(RESIZE_FILTERS)  # each filter really ran


def test_opencv_path_for_upright_rgb_jpegs_matches_pillows(monkeypatch) -> None:
    """With OpenCV installed, an upright RGB JPEG shrunk with the area filter goes through it
    (images._area_jpeg); the stored image is Pillow's to within JPEG noise, with every other
    field the same. Rotated, truncated or other-filter bodies keep to Pillow's path."""
    pytest.importorskip("cv2", exc_type=ImportError)
    from imatdata.fetch import images

    photo = rgb((900, 640), seed=5)
    bodies = {"upright": encode(photo, "jpeg", quality=92),
              "big": encode(rgb((2100, 1400), seed=6), "jpeg", quality=92),  # DCT-scaled by 2 first
              "rotated": exif_jpeg(photo, 6)}
    bodies["truncated"] = bodies["upright"][: len(bodies["upright"]) * 2 // 3]
    fast = {k: process_image(b, max_side=512) for k, b in bodies.items()}
    lanczos = process_image(bodies["upright"], max_side=512, resize_filter="lanczos")
    monkeypatch.setattr(images, "_cv2", False)  # as without OpenCV
    slow = {k: process_image(b, max_side=512) for k, b in bodies.items()}
    assert lanczos == process_image(bodies["upright"], max_side=512, resize_filter="lanczos")
    for k in ("upright", "big"):
        assert fast[k].image != slow[k].image, k  # each path ran
        assert {**vars(fast[k]), "image": None} == {**vars(slow[k]), "image": None}, k
        diff = np.abs(np.asarray(decode(fast[k].image), dtype=np.float32) - np.asarray(decode(slow[k].image)))
        assert diff.mean() < 2, (k, diff.mean())
    assert fast["rotated"] == slow["rotated"] and fast["truncated"] == slow["truncated"]
    assert fast["truncated"].status == "decode_error"


def test_max_side_zero_keeps_size_but_still_converts() -> None:
    body = encode(rgb((700, 300)), "png")
    res = process_image(body, max_side=0)
    assert res.status == "ok" and (res.width, res.height) == (700, 300)
    assert decode(res.image).format == "JPEG"
    big = encode(rgb((900, 600)), "jpeg")
    assert process_image(big, max_side=0).image == big


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotation_comes_out_upright(orientation: int) -> None:
    upright = Image.new("RGB", (90, 150), (40, 90, 200))
    upright.paste((230, 20, 20), (0, 0, 22, 25))  # a red mark in the top-left corner
    res = process_image(exif_jpeg(upright, orientation), max_side=512)
    assert res.status == "ok"
    assert (res.width, res.height) == (90, 150) and (res.orig_width, res.orig_height) == (90, 150)
    out = decode(res.image)
    assert not out.getexif().get(0x0112)  # nothing left for a viewer to rotate again
    r, g, b = out.getpixel((5, 5))
    assert r > 180 and g < 80 and b < 80, "red mark must be top-left once upright"
    assert out.getpixel((80, 140))[2] > 150


def test_exif_rotation_with_downscale() -> None:
    upright = rgb((600, 1200))
    res = process_image(exif_jpeg(upright, 6), max_side=512)
    assert (res.width, res.height) == (256, 512) and (res.orig_width, res.orig_height) == (600, 1200)


def test_cmyk_palette_alpha_grey_become_rgb_jpeg() -> None:
    base = rgb((96, 96))
    rgba = base.convert("RGBA")
    alpha = Image.new("L", rgba.size, 0)
    alpha.paste(255, (20, 20, 76, 76))
    rgba.putalpha(alpha)
    pal = base.quantize(colors=16)
    cases = {
        "cmyk": encode(base.convert("CMYK"), "jpeg"),
        "alpha": encode(rgba, "png"),
        "palette": encode(pal, "png", transparency=pal.getpixel((0, 0))),
        "grey": encode(base.convert("L"), "jpeg"),
        "la": encode(base.convert("LA"), "png"),
        "webp": encode(base, "webp"),
        "gif": encode(base, "gif"),
        "bmp": encode(base, "bmp"),
    }
    for name, body in cases.items():
        res = process_image(body, max_side=512)
        assert res.status == "ok", name
        out = decode(res.image)
        assert out.format == "JPEG" and out.mode == "RGB", name
        assert res.image != body, name
    # Transparent pixels are flattened on white, not black.
    corner = decode(process_image(cases["alpha"]).image).getpixel((2, 2))
    assert min(corner) > 240
    corner = decode(process_image(cases["palette"]).image).getpixel((0, 0))
    assert min(corner) > 240


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I")
    out = to_rgb(img)
    values = np.asarray(out)[..., 0]
    assert out.mode == "RGB" and values.min() < 10 and values.max() > 245
    res = process_image(encode(img, "png"))  # a real 16-bit PNG, end to end
    assert res.status == "ok"
    values = np.asarray(decode(res.image))[..., 0]
    assert values.min() < 10 and values.max() > 245


def test_truncated_html_empty() -> None:
    full = encode(rgb((120, 120)), "jpeg")
    assert process_image(full[: len(full) * 3 // 5]).status == "decode_error"
    png = encode(rgb((120, 120)), "png")
    assert process_image(png[: len(png) // 2]).status == "decode_error"
    html = process_image(b"<!DOCTYPE html><html><body>Access denied</body></html>")
    assert html.status == "not_image" and "HTML" in (html.error or "")
    assert html.orig_bytes > 0 and html.sha256
    empty = process_image(b"")
    assert empty.status == "not_image" and empty.orig_bytes == 0
    garbage = process_image(b"\xff\xd8\xff" + b"\x00" * 50)
    assert garbage.status == "decode_error"


def test_bombs_refused_from_the_header() -> None:
    small = encode(rgb((64, 64)), "jpeg")
    for body in (png_bomb(), jpeg_bomb(small)):
        t = time.perf_counter()
        res = process_image(body)
        assert res.status == "too_large"
        assert time.perf_counter() - t < 1.0  # refused without decoding 1.6 gigapixels
    # A header just over a custom limit is refused too, below Pillow's own limit.
    res = process_image(encode(rgb((200, 100)), "png"), max_pixels=19_999)
    assert res.status == "too_large" and "200x100" in (res.error or "")


def test_target_size() -> None:
    assert target_size(1000, 500, 512) == (512, 256)
    assert target_size(500, 1000, 512) == (256, 512)
    assert target_size(400, 300, 512) == (400, 300)
    assert target_size(4000, 3, 512) == (512, 1)
    assert target_size(4000, 3000, 0) == (4000, 3000)


def test_corrupt_exif_is_not_fatal() -> None:
    body = encode(rgb((50, 40)), "jpeg")
    # An APP1 Exif segment with garbage after the header.
    junk = b"Exif\x00\x00" + b"MM\x00*" + b"\xff" * 20
    bad = body[:2] + b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk + body[2:]
    res = process_image(bad)
    assert res.status == "ok" and (res.width, res.height) == (50, 40)


# --- decoding memory (issue #14) -----------------------------------------------------------------


def png_header(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A PNG whose header claims this size and pixel format (its pixels are never reached)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("body, needs", [
    (png_header(9000, 9000, 16, 0), "9000x9000 I;16 png needs 155 MiB"),  # 16-bit grey
    (png_header(9000, 9000, 8, 6), "9000x9000 RGBA png needs 309 MiB"),
    (png_header(6000, 6000, 8, 2), "6000x6000 RGB png needs 138 MiB"),
])
def test_images_too_dear_to_decode_are_refused_from_the_header(body: bytes, needs: str) -> None:
    from imatdata.fetch.images import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS

    t = time.perf_counter()
    res = process_image(body)
    assert time.perf_counter() - t < 0.5  # nothing decoded
    assert res.status == "too_large"
    assert needs in (res.error or "") and "over the limit of 128 MiB per image" in (res.error or "")
    assert DEFAULT_MAX_DECODE_BYTES == 128 * 2**20 and 9000 * 9000 <= DEFAULT_MAX_PIXELS  # under the pixel cap


def test_a_progressive_jpeg_counts_its_coefficient_buffer() -> None:
    from imatsample import jpeg_bomb

    progressive = encode(rgb((64, 48)), "jpeg", progressive=True)
    assert process_image(progressive).status == "ok"
    # Baseline JPEGs decode at 1/8 scale whatever their size; a progressive one still needs
    # every DCT coefficient of the full image (here 9000x9000, 4:2:0: ~232 MiB).
    res = process_image(jpeg_bomb(progressive, 9000, 9000))
    assert res.status == "too_large" and "9000x9000 RGB jpeg needs" in (res.error or "")
    baseline = process_image(jpeg_bomb(encode(rgb((64, 48)), "jpeg"), 9000, 9000))
    assert baseline.status != "too_large"  # 1/8 scale: ~5 MiB (the patched file fails to decode)


def test_normal_photos_are_accepted_without_the_heavy_slot() -> None:
    entered: list[int] = []

    class Slot:
        def __enter__(self) -> None:
            entered.append(1)

        def __exit__(self, *exc: object) -> None:
            pass

    camera = encode(Image.new("RGB", (6000, 4000), (120, 80, 40)), "jpeg", quality=85)
    for body in (encode(rgb((900, 640)), "jpeg"), encode(rgb((640, 800)), "jpeg"), camera):
        res = process_image(body, heavy_slot=Slot)
        assert res.status == "ok" and max(res.width, res.height) == 512
    assert entered == []
    big_png = encode(Image.new("RGBA", (2100, 2100), (1, 2, 3, 200)), "png")  # 17 MiB of pixels
    res = process_image(big_png, heavy_slot=Slot)
    assert res.status == "ok" and (res.width, res.height) == (512, 512) and entered == [1]


def _tiff(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "TIFF")
    return out.getvalue()


def _strip_cases() -> dict[str, bytes]:
    base = rgb((900, 620), seed=5)
    rgba = base.convert("RGBA")
    alpha = Image.linear_gradient("L").resize(base.size)
    rgba.putalpha(alpha)
    pal = base.quantize(colors=32)
    grey16 = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 200 + 300).astype(np.uint16))
    grey32 = Image.fromarray(np.asarray(base.convert("L"), dtype=np.int32) * 1000 - 5000)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "rgb": encode(base, "png"),
        "rgba": encode(rgba, "png"),
        "palette+transparency": encode(pal, "png", transparency=pal.getpixel((0, 0))),
        "grey16": encode(grey16, "png"),
        "grey32": _tiff(grey32),
        "la": encode(base.convert("LA"), "png"),
        "cmyk": encode(base.convert("CMYK"), "jpeg", quality=95),
        "rotated": encode(base, "png", exif=exif.tobytes()),
    }


@pytest.mark.parametrize("max_side", [512, 200, 0])
def test_conversion_in_strips_gives_the_same_picture(monkeypatch: pytest.MonkeyPatch, max_side: int) -> None:
    from imatdata.fetch import images

    cases = _strip_cases()
    whole = {name: process_image(body, max_side=max_side) for name, body in cases.items()}
    monkeypatch.setattr(images, "STRIP_BYTES", 0)  # every image takes the strip path
    monkeypatch.setattr(images, "_STRIP_PIXELS", 5000)  # in many strips
    for name, body in cases.items():
        res = process_image(body, max_side=max_side)
        ref = whole[name]
        assert res.status == ref.status == "ok", name
        assert (res.width, res.height, res.orig_width, res.orig_height) == \
            (ref.width, ref.height, ref.orig_width, ref.orig_height), name
        diff = np.abs(np.asarray(decode(res.image), np.float32) - np.asarray(decode(ref.image), np.float32))
        assert diff.mean() < 2.5, (name, diff.mean())
    assert (whole["rotated"].width, whole["rotated"].height) == ((620, 900) if max_side == 0 else
                                                                 target_size(620, 900, max_side))


def test_a_large_image_is_converted_near_its_decoded_size(tmp_path: Path) -> None:
    """Peak memory of one 3000x3000 RGBA PNG (34 MiB of pixels): converted in strips it grew
    by 49 MiB (the pixels, a half-size RGB copy, a strip); converted whole, by 114 MiB."""
    import subprocess
    import sys

    path = tmp_path / "big.png"
    gradient = Image.linear_gradient("L").resize((3000, 3000))
    Image.merge("RGBA", (gradient, gradient.transpose(Image.Transpose.ROTATE_90), gradient, gradient)).save(path)
    code = textwrap.dedent(f"""
        import resource
        from imatdata.fetch.images import process_image
        body = open({str(path)!r}, "rb").read()
        process_image(b"\\x89PNG")  # every import done before measuring
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res = process_image(body)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(res.status, res.width, res.height, (after - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    status, width, height, grew_mib = out.stdout.split()
    assert (status, width, height) == ("ok", "512", "512")
    assert int(grew_mib) < 60, out.stdout
