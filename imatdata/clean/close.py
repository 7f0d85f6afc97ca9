"""The fourth look: each pair the hashes, signatures and fine hashes confirmed is decoded
again and compared pixel by pixel, once aligned.

The first three looks are summaries kept for every row (`dedup`): an 8x8 luma, 4x4 chroma and
a 32x32 DCT band. At a million distinct pictures a few hundred pairs of different product
shots on white pass all three: the same plain shape, of the same size and place, differing in
a pattern, a sticker, a shadow or a background tint that those summaries cannot see. Looked at
as 48x48 colour pixels the difference is plain. Keeping such thumbnails for every row would be
~7 KB a row (7 GB at a million), ten times all the rest, so only the confirmed pairs' rows are
read again: a few hundred of a million on bench/dedup.py's corpus, at ~0.2 ms a decode (a
JPEG at reduced DCT scale). Pairs whose whole fine hashes agree within SURE_FINE_BITS (most
re-encodes, brightness changes and resizes) are not looked at: no two different pictures
came that close at a million.

`close_agree` compares two thumbnails on the pixels that belong to either picture's object
(further than OBJECT_DELTA from the median of its border, i.e. not background), after fitting
one brightness gain (within GAIN_RANGE) to them: the mean absolute difference of the best 90%
of those pixels (a line of overlaid text is the rest) must be at most CLOSE_LIMIT. A crop moves
every pixel, so when the whole pictures do not agree, one picture's view is trimmed on each
side in turn by the best of TRIMS (twice round) and compared with the other's whole, either
way round; any alignment within the limit confirms the pair.

Memory stays bounded whatever the number of pairs: pairs are handled in rounds whose rows'
thumbnails (at most THUMB_SIDE px a side) fit ROUND_ROWS, and each round reads only the row
groups that hold its rows.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from imatdata.clean import dedup
from imatdata.clean.rows import Rows
from imatdata.manifest import read_row_group, row_groups

# Side of the square views compared (pixels).
CLOSE_SIDE = 48
# Thumbnails kept per row: at most this many pixels a side (twice the views', so that a
# trimmed view is still resampled down).
THUMB_SIDE = 2 * CLOSE_SIDE
# A pixel further than this (0-255, any channel) from its view's border median is the object's.
OBJECT_DELTA = 30
# The brightness gain fitted between two views is clipped to this range (bench/dedup.py's
# brightness changes are 0.88-1.12).
GAIN_RANGE = (0.85, 1.18)
# The share of the object's pixels whose mean difference counts (the rest: overlaid text).
KEEP_SHARE = 0.9
# A view is trimmed by 0, 1, ... 6% of its width or height on each side (crops are up to 5%).
TRIMS = np.arange(7) * 0.01
# The most a pair's aligned object pixels may differ (mean absolute, 0-255). Fitted on
# bench/dedup.py's corpora: the 337 pairs of different pictures that passed the first three
# looks among 1,000,000 (seed 2, 96-160 px) score 3.7 at the 1st percentile, 11.8 at the
# 10th and 15.9 at the 20th; 12 keeps 36 of them. Planted copies (seed 1: 6,000 images at
# 96-160 and at 256-512 px; seed 3: 24,000 at 256-512 px) score at most 4.8 (brightness),
# 9.4 (crop), 11.1 (resize, at 96-160 px), 6.6 (re-encode); overlays at most 10.0, but for
# 2 of 667 at 17-18.
CLOSE_LIMIT = 12.0
# Pairs whose whole fine hashes are within this many of their 192 bits pass without the close
# look (re-encodes, brightness changes, many resizes and overlays): of the 3,184 pairs clean
# confirms on bench/dedup.py's seed-3 corpus (20,000 pictures at 256-512 px, 3,963 copies),
# 770 are looked at (1,054 at 8 bits), while the pairs of different pictures that pass the
# first three looks among a million are 18 bits apart or more (seed 2: 337 pairs; held-out
# seed 4: 315, the next closest at 22).
SURE_FINE_BITS = 12
# Rows whose thumbnails are held at once (~27 KB each at most).
ROUND_ROWS = 4096
# Fewer object pixels than this: the pictures are blank alike; every pixel counts.
_MIN_OBJECT = 16


def agree_pairs(raw: Path, rows: Rows, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether each pair of rows `(a[k], b[k])` (global indices into `rows`) passes the
    close look: pairs whose whole fine hashes are within SURE_FINE_BITS pass as they are,
    the others are decoded again and compared. A row whose bytes no longer decode agrees
    with nothing."""
    ok = dedup.fine_bits(rows.fine[a, 0], rows.fine[b, 0]) <= SURE_FINE_BITS
    look = np.flatnonzero(~ok)
    for part in _rounds(a[look], b[look], ROUND_ROWS):
        pairs = look[part]
        thumbs = dict(_thumbnails(raw, rows, np.unique(np.concatenate([a[pairs], b[pairs]]))))
        for k in pairs.tolist():
            ta, tb = thumbs.get(int(a[k])), thumbs.get(int(b[k]))
            ok[k] = ta is not None and tb is not None and close_agree(ta, tb)
    return ok


def _rounds(a: np.ndarray, b: np.ndarray, limit: int) -> Iterator[np.ndarray]:
    """The pair indices in rounds whose rows number at most `limit` (>= 2)."""
    order = np.lexsort((b, a))
    seen: set[int] = set()
    start = 0
    for pos, k in enumerate(order.tolist()):
        new = {int(a[k]), int(b[k])} - seen
        if len(seen) + len(new) > limit:
            yield order[start:pos]
            seen, start = set(), pos
            new = {int(a[k]), int(b[k])}
        seen |= new
    if start < order.size:
        yield order[start:]


def _thumbnails(raw: Path, rows: Rows, wanted: np.ndarray) -> Iterator[tuple[int, Image.Image]]:
    """(global row, thumbnail) for the `wanted` rows (ascending), reading only the image
    column of the row groups that hold them."""
    for code, split in enumerate(rows.splits):
        g0 = rows.offsets[code]
        for ref in row_groups(raw / split):
            lo, hi = np.searchsorted(wanted, [g0, g0 + ref.num_rows])
            if hi > lo:
                images = read_row_group(ref, ["image"]).column("image")
                for g in wanted[lo:hi].tolist():
                    thumb = thumbnail(images[g - g0].as_py())
                    if thumb is not None:
                        yield g, thumb
            g0 += ref.num_rows


def thumbnail(data: bytes | None) -> Image.Image | None:
    """The stored bytes decoded in RGB (a JPEG at the smallest DCT scale that keeps both sides
    at least CLOSE_SIDE), at most THUMB_SIDE a side; None when they do not decode."""
    if data is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            if img.format == "JPEG":
                img.draft("RGB", (CLOSE_SIDE, CLOSE_SIDE))
            img = img.convert("RGB")
            img.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR)
            return img
    except Exception:  # it decoded in pass 1; whatever fails now, no pair is confirmed on it
        return None


def close_agree(a: Image.Image, b: Image.Image) -> bool:
    """Whether two thumbnails are one picture: whole, or once one of them is trimmed."""
    whole_a, whole_b = _Target(_view(a, NO_TRIM)), _Target(_view(b, NO_TRIM))
    if _scores(whole_a.pixels[None], whole_b)[0] <= CLOSE_LIMIT:
        return True
    return _aligned(a, whole_b) or _aligned(b, whole_a)


NO_TRIM = (0.0, 0.0, 0.0, 0.0)


class _Target:
    """A whole view that trimmed views are scored against, with what every score needs of it."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels
        self.grey = _channel_mean(pixels).reshape(1, -1)
        self.object = _object(pixels[None]).reshape(1, -1)


def _aligned(img: Image.Image, target: _Target) -> bool:
    """Whether some trim of `img` scores within CLOSE_LIMIT against `target`: each side's
    trim chosen in turn (the best of TRIMS, the other sides held), twice round."""
    box = NO_TRIM
    best = float("inf")
    for _sweep in range(2):
        for side in range(4):
            boxes = [box[:side] + (float(t),) + box[side + 1:] for t in TRIMS]
            scores = _scores(np.stack([_view(img, x) for x in boxes]), target)
            k = int(np.argmin(scores))
            if scores[k] <= CLOSE_LIMIT:
                return True
            if scores[k] < best:
                best, box = float(scores[k]), boxes[k]
    return False


def _view(img: Image.Image, trim: tuple[float, ...]) -> np.ndarray:
    """`img` less `trim` (left, top, right, bottom: shares of its width or height), resampled
    to CLOSE_SIDE x CLOSE_SIDE, float32 (S, S, 3)."""
    w, h = img.size
    left, top, right, bottom = trim
    box = (left * w, top * h, w - right * w, h - bottom * h)
    return np.asarray(img.resize((CLOSE_SIDE, CLOSE_SIDE), Image.Resampling.BILINEAR, box=box), np.float32)


def _object(views: np.ndarray) -> np.ndarray:
    """Per view (m, S, S, 3), its object's pixels (m, S, S): not within OBJECT_DELTA of the
    median colour of its border."""
    border = np.concatenate([views[:, 0], views[:, -1], views[:, 1:-1, 0], views[:, 1:-1, -1]], axis=1)
    mid = border.shape[1] // 2
    background = np.partition(border, mid, axis=1)[:, mid]
    far = np.abs(views - background[:, None, None, :]) > OBJECT_DELTA
    return far[..., 0] | far[..., 1] | far[..., 2]


def _channel_mean(pixels: np.ndarray) -> np.ndarray:
    """The mean over the last axis of (..., 3), as three adds (numpy's reduction over a
    short last axis is several times slower)."""
    return (pixels[..., 0] + pixels[..., 1] + pixels[..., 2]) / 3


def _scores(views: np.ndarray, target: _Target) -> np.ndarray:
    """Each view's score against `target`: the mean absolute difference (0-255, averaged over
    the channels) of the best KEEP_SHARE of the object pixels of either, after the gain that
    best maps the target's brightness onto the view's."""
    m = views.shape[0]
    fg = _object(views).reshape(m, -1) | target.object
    fg[fg.sum(axis=1) < _MIN_OBJECT] = True
    ga, gb = _channel_mean(views).reshape(m, -1), target.grey
    fit = fg & (ga < 250) & (gb < 250) & (gb > 8)
    num, den = (fit * (ga * gb)).sum(axis=1), (fit * (gb * gb)).sum(axis=1)
    gain = np.clip(np.where(den > 0, num / np.maximum(den, 1e-6), 1.0), *GAIN_RANGE).astype(np.float32)
    diff = _channel_mean(np.abs(views - np.minimum(255, gain[:, None, None, None] * target.pixels[None])))
    diff = diff.reshape(m, -1)
    diff[~fg] = np.inf
    diff.sort(axis=1)
    keep = np.maximum(1, (KEEP_SHARE * fg.sum(axis=1)).astype(np.int64))
    sums = np.cumsum(diff[:, :int(keep.max())], axis=1)
    return sums[np.arange(m), keep - 1] / keep
