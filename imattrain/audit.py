"""`imattrain audit`: which training images carry a wrong label.

Out-of-fold probabilities, then a ranking (Northcutt et al., "Confident learning", 2021):

1. train's usable rows are split into K folds, stratified by class (each class's rows are
   shuffled with --seed and dealt round-robin), so every fold has every class;
2. for each fold a model is trained on the other K-1 with the same engine and flags as
   `imattrain run` (`engine.train` with a row mask: the fold's rows are skipped like rows
   without an image), validated on val as usual, and its chosen checkpoint (best.pt, else
   last.pt) predicts the held-out fold;
3. every row then has probabilities from a model that never saw it, and is scored:

   * `cl` (confident learning, the default): per-class thresholds t_j = the mean p_j over
     rows labelled j; a row labelled i counts in the confident joint at (i, j) for the most
     probable j with p_j >= t_j; each row of the joint is calibrated to class i's count (in
     whole numbers that keep that total, as cleanlab's), and
     for every j != i that many of class i's rows with the highest p_j - p_i are flagged
     ("prune by noise rate", cleanlab's default), keeping those another class wins; ranked
     by self-confidence;
   * `self-confidence`: score 1 - p[given]; flagged when another class wins;
   * `margin` (normalised margin): score p[suggested] - p[given], where suggested is the
     most probable class other than the given one; flagged when positive.

   Measured on Fashion-MNIST with injected flips (bench/audit.py; README "Auditing labels"),
   which is why ranking is by self-confidence and `cl` chooses how many are flagged.

Files in --out: `oof_probs.parquet` (id, label, fold, probs: what `--probs` audits again
without training), `suspects.parquet` (the flagged rows, most suspect first: rank, id,
given, suggested, score, p_given, p_suggested, fold, plus tree_distance with --tree),
`suspects.png` (a contact sheet of the top suspects: image, given -> suggested), `audit.json`
(figures and timings) and `fold-K/` (each fold's run folder). `imatdata clean --drop-ids
suspects.parquet` drops the suspects with reason `label_noise`; `imattrain run --relabel
suspects.parquet` keeps them and trains them on their suggested class (`relabel_index`: the
loader reads labels from the train split's index). Measured on 3,000 Fashion-MNIST images
with 20% of the labels flipped, relabelling the confident suspects recovered a third of the
accuracy the noise cost and dropping them an eighth, as much as dropping exactly the flips.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from imatdata import storage
from imatdata.errors import UserError
from imatdata.manifest import read_row_group, read_table, write_table_atomic
from imattrain.config import AUDIT_METHODS, AuditConfig, TrainConfig

OOF_FILE = "oof_probs.parquet"
SUSPECTS_FILE = "suspects.parquet"
SHEET_FILE = "suspects.png"
REPORT_FILE = "audit.json"
SUSPECT_COLUMNS = ("rank", "id", "given", "suggested", "score", "p_given", "p_suggested", "fold")

Say = Callable[[str], None]


# --- folds ------------------------------------------------------------------------------------


def assign_folds(labels: np.ndarray, usable: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold (0..k-1) of every row, -1 for rows without a usable image: each class's rows are
    shuffled with `seed` and dealt round-robin, starting where the previous class stopped, so
    fold sizes differ by at most one and every class with k rows or more is in every fold."""
    folds = np.full(len(labels), -1, dtype=np.int64)
    rng = np.random.default_rng([seed, 2021])
    start = 0
    for c in np.unique(labels[usable]):
        rows = rng.permutation(np.flatnonzero(usable & (labels == c)))
        folds[rows] = (start + np.arange(len(rows))) % k
        start = (start + len(rows)) % k
    return folds


# --- ranking (pure numpy) ---------------------------------------------------------------------


@dataclass
class Ranking:
    """Per audited row: the score (higher = more likely mislabelled), the suggested class
    and whether the method flags it."""

    score: np.ndarray
    suggested: np.ndarray
    flagged: np.ndarray
    thresholds: np.ndarray | None = None  # cl's per-class thresholds


def _others(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p[given], the best other class, its probability) per row."""
    n = len(labels)
    p_given = probs[np.arange(n), labels]
    masked = probs.copy()
    masked[np.arange(n), labels] = -np.inf
    suggested = masked.argmax(axis=1)
    return p_given, suggested, masked[np.arange(n), suggested]


def confident_joint(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the confident joint C[given, true] of counts, the per-class thresholds). A row counts
    at (given, j) for the most probable class j whose probability reaches j's threshold (the
    mean p_j over rows given j); a row reaching no threshold does not count."""
    c = probs.shape[1]
    counts = np.bincount(labels, minlength=c)
    sums = np.zeros(c)
    np.add.at(sums, labels, probs[np.arange(len(labels)), labels])
    thresholds = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)
    above = probs >= thresholds[None, :] - 1e-12
    candidates = np.where(above, probs, -np.inf)
    best = candidates.argmax(axis=1)
    counted = above.any(axis=1)
    joint = np.zeros((c, c), dtype=np.int64)
    np.add.at(joint, (labels[counted], best[counted]), 1)
    return joint, thresholds


def _whole_counts(shares: np.ndarray, total: int) -> np.ndarray:
    """`shares` (summing to `total`) as whole numbers that still sum to `total`: each rounded
    down, then one more for the largest remainders (rounding each on its own flagged up to 4
    rows of 10,000 more or fewer than cleanlab, which keeps the row totals too)."""
    whole = np.floor(shares + 1e-9).astype(np.int64)
    short = total - int(whole.sum())
    if short > 0:
        whole[np.argsort(-(shares - whole), kind="stable")[:short]] += 1
    return whole


def rank_suspects(probs: np.ndarray, labels: np.ndarray, method: str) -> Ranking:
    """Score and flag every row of out-of-fold `probs` (N, C) against the `labels` given."""
    if method not in AUDIT_METHODS:
        raise UserError(f"--method must be one of {', '.join(AUDIT_METHODS)} (got {method!r})")
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        z = np.zeros(0)
        return Ranking(z, z.astype(np.int64), z.astype(bool))
    p_given, suggested, p_other = _others(probs, labels)
    margin = p_other - p_given
    wrong = margin > 0  # another class wins
    if method == "margin":
        return Ranking(margin, suggested, wrong)
    if method == "self-confidence":
        return Ranking(1.0 - p_given, suggested, wrong)
    joint, thresholds = confident_joint(probs, labels)
    counts = np.bincount(labels, minlength=probs.shape[1])
    flagged = np.zeros(len(labels), dtype=bool)
    for i in np.flatnonzero(joint.sum(axis=1)):
        # Class i's row of the joint scaled to its size: how many of its rows belong to j.
        calibrated = _whole_counts(joint[i] / joint[i].sum() * counts[i], int(counts[i]))
        members = np.flatnonzero(labels == i)
        for j in np.flatnonzero(np.arange(len(calibrated)) != i):
            n = int(calibrated[j])
            if n > 0:
                towards = probs[members, j] - probs[members, i]
                flagged[members[np.argsort(-towards, kind="stable")[:n]]] = True
    return Ranking(1.0 - p_given, suggested, flagged & wrong, thresholds)


def tree_distance(tree: Any, a: int, b: int) -> int | None:
    """Levels from a leaf up to the lowest node shared with the other: 0 same class, 1 two
    leaves of one level-3 node, ... 4 when only the root is shared; None when either class
    is not in the tree."""
    if a == b:
        return 0
    pa_, pb = tree.path(a), tree.path(b)
    if pa_ is None or pb is None:
        return None
    shared = 0
    while shared < len(pa_) and pa_[shared] == pb[shared]:
        shared += 1
    return len(pa_) + 1 - shared


# --- files ------------------------------------------------------------------------------------


@dataclass
class OutOfFold:
    """Out-of-fold probabilities of the audited rows (train rows with a usable image)."""

    ids: list[str]
    labels: np.ndarray  # (N,) int64
    folds: np.ndarray  # (N,) int64, -1 when unknown
    probs: np.ndarray  # (N, C) float32


def write_oof(path: Path, oof: OutOfFold) -> None:
    probs = np.ascontiguousarray(oof.probs, dtype=np.float32)
    n, c = probs.shape
    column = pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1), type=pa.float32()), c)
    table = pa.table({"id": pa.array(oof.ids, type=pa.string()),
                      "label": pa.array(oof.labels, type=pa.int64()),
                      "fold": pa.array(oof.folds, type=pa.int64()), "probs": column})
    write_table_atomic(table.replace_schema_metadata({"num_classes": str(c)}), Path(path))


def read_oof(path: Path) -> OutOfFold:
    """An `oof_probs.parquet` (id, label, probs; fold optional), with one-line errors."""
    path = Path(path)
    if not storage.is_file(path):
        raise UserError(f"--probs {path}: no such file")
    try:
        table = read_table([path])
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"--probs {path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in ("id", "label", "probs") if c not in table.column_names]
    if missing:
        raise UserError(f"--probs {path}: no {', '.join(missing)} column(s); give the "
                        f"{OOF_FILE} an earlier audit wrote")
    flat = table.column("probs").combine_chunks()
    if not pa.types.is_fixed_size_list(flat.type) and not pa.types.is_list(flat.type):
        raise UserError(f"--probs {path}: column probs is {flat.type}, not a list of floats")
    labels_col = table.column("label")
    if labels_col.null_count:
        raise UserError(f"--probs {path}: {labels_col.null_count} rows without a label")
    try:
        rows = flat.to_pylist() if pa.types.is_list(flat.type) else None
        probs = (np.asarray(rows, dtype=np.float64) if rows is not None else
                 flat.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
                 .reshape(len(table), flat.type.list_size))
    except ValueError:
        raise UserError(f"--probs {path}: rows of probs differ in length") from None
    labels = labels_col.to_numpy().astype(np.int64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise UserError(f"--probs {path}: probs needs at least 2 classes per row")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise UserError(f"--probs {path}: probabilities must be finite and not negative")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise UserError(f"--probs {path}: labels must be 0..{probs.shape[1] - 1} (the probs' "
                        f"classes); got {labels.min()}..{labels.max()}")
    folds = (table.column("fold").fill_null(-1).to_numpy().astype(np.int64)
             if "fold" in table.column_names else np.full(len(labels), -1, np.int64))
    return OutOfFold([str(i) for i in table.column("id").to_pylist()], labels, folds,
                     probs.astype(np.float32))


def suspects_table(oof: OutOfFold, ranking: Ranking, tree: Any = None) -> pa.Table:
    """The flagged rows, most suspect first (ties: file order)."""
    rows = np.flatnonzero(ranking.flagged)
    rows = rows[np.argsort(-ranking.score[rows], kind="stable")]
    given, suggested = oof.labels[rows], ranking.suggested[rows]
    n = np.arange(len(oof.labels))
    data: dict[str, Any] = {
        "rank": pa.array(np.arange(1, len(rows) + 1), type=pa.int64()),
        "id": pa.array([oof.ids[i] for i in rows], type=pa.string()),
        "given": pa.array(given, type=pa.int64()),
        "suggested": pa.array(suggested, type=pa.int64()),
        "score": pa.array(ranking.score[rows], type=pa.float64()),
        "p_given": pa.array(oof.probs[n, oof.labels][rows], type=pa.float32()),
        "p_suggested": pa.array(oof.probs[n, ranking.suggested][rows], type=pa.float32()),
        "fold": pa.array(oof.folds[rows], type=pa.int64()),
    }
    if tree is not None:
        data["tree_distance"] = pa.array(
            [tree_distance(tree, int(a), int(b)) for a, b in zip(given, suggested)], type=pa.int64())
    return pa.table(data)


# --- feeding it back: run --relabel ---------------------------------------------------------


def relabel_index(index: Any, path: str | Path, min_score: float | None,
                  say: Say = lambda _m: None) -> Any:
    """`imattrain run --relabel FILE [--relabel-min-score S]`: the train split's `SplitIndex`
    with the rows the suspects file names given its suggested class (the loader reads labels
    from the index, so that is what the model trains on). Ids train does not hold are counted
    and ignored, as `imatdata clean --drop-ids` does."""
    from imatdata.clean.label_noise import read_relabels
    from imattrain.predict import split_row_ids

    new = read_relabels(path, min_score)
    labels = index.labels.copy()
    found = changed = 0
    if new:
        for row, row_id in enumerate(split_row_ids(index)):
            c = new.get(row_id)
            if c is not None:
                found += 1
                changed += int(labels[row] != c)
                labels[row] = c
    line = f"relabel ({path}): {changed:,} train rows take the suggested class of {len(new):,} named"
    if len(new) - found:
        line += f"; {len(new) - found:,} not in train (ignored)"
    say(line)
    return dataclasses.replace(index, labels=labels)


# --- the contact sheet ------------------------------------------------------------------------


def read_images(data_dir: Path, split: str, ids: Sequence[str]) -> dict[str, bytes]:
    """Image bytes of `ids` from a split's shards (only the row groups holding them)."""
    from imattrain.data import scan_split

    wanted = set(ids)
    found: dict[str, bytes] = {}
    for unit in scan_split(data_dir, split).units:
        if len(found) == len(wanted):
            break
        unit_ids = [str(v) for v in read_row_group(unit, ["id"]).column("id").to_pylist()]
        hits = [i for i, v in enumerate(unit_ids) if v in wanted]
        if hits:
            images = read_row_group(unit, ["image"]).column("image")
            for i in hits:
                data = images[i].as_py()
                if data:
                    found[unit_ids[i]] = data
    return found


def contact_sheet(suspects: pa.Table, images: dict[str, bytes], names: Sequence[str] | None = None,
                  *, cell: int = 128, columns: int = 8) -> bytes:
    """PNG: one cell per suspect (its image, "#rank given -> suggested", the score)."""
    from PIL import Image, ImageDraw, ImageFont

    def name(c: int) -> str:
        return names[c] if names is not None and 0 <= c < len(names) else str(c)

    n = suspects.num_rows
    rows = max(1, (n + columns - 1) // columns)
    text_h = 30
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    d = suspects.to_pydict()
    for k in range(n):
        x, y = (k % columns) * cell, (k // columns) * (cell + text_h)
        data = images.get(d["id"][k])
        if data:
            try:
                img = Image.open(io.BytesIO(data)).convert("RGB")
                scale = (cell - 8) / max(img.width, img.height)  # small images are enlarged too
                img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                                 Image.Resampling.LANCZOS)
                sheet.paste(img, (x + (cell - img.width) // 2, y + (cell - img.height) // 2))
            except Exception:  # noqa: BLE001 - a corrupt image is a grey box, not a failed sheet
                draw.rectangle((x + 4, y + 4, x + cell - 4, y + cell - 4), fill="#bbbbbb")
        else:
            draw.rectangle((x + 4, y + 4, x + cell - 4, y + cell - 4), fill="#bbbbbb")
        draw.text((x + 4, y + cell), f"#{d['rank'][k]}: {name(d['given'][k])} -> "
                  f"{name(d['suggested'][k])}", fill="black", font=font)
        draw.text((x + 4, y + cell + 13), f"score {d['score'][k]:.3f}", fill="#a00000", font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


# --- the audit --------------------------------------------------------------------------------


@dataclass
class AuditResult:
    out: Path
    audited: int
    flagged: int
    method: str
    suspects: Path
    oof: Path
    sheet: Path | None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _default_out(cfg: TrainConfig) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(f"runs/audit-{cfg.model}-{stamp}")


def _check_outputs(out: Path, acfg: AuditConfig, resume: bool) -> None:
    for name in (SUSPECTS_FILE, SHEET_FILE):
        if storage.exists(out / name) and not (acfg.force or resume):
            raise UserError(f"{out / name} exists (an earlier audit); pass --force to replace "
                            f"it or choose another --out")


def out_of_fold(cfg: TrainConfig, folds: int, out: Path, say: Say) -> tuple[OutOfFold, dict[str, float]]:
    """Train one model per fold and predict the fold it did not see."""
    from imattrain import distributed as D
    from imattrain.config import InferConfig
    from imattrain.data import infer_num_classes, scan_split
    from imattrain.engine import train
    from imattrain.predict import infer, load_checkpoints, split_row_ids
    from imattrain.runtime import resolve_device
    from imattrain.setup import resolve_data_dir

    if D.env_world().distributed:
        raise UserError("imattrain audit trains its folds one after another in one process; "
                        "run it without torchrun")
    data_dir = resolve_data_dir(cfg.data, cfg.root)
    index = scan_split(data_dir, cfg.train_split)
    ids = split_row_ids(index)
    if len(set(ids)) != len(ids):
        raise UserError(f"split {cfg.train_split!r} repeats ids; the audit names rows by id")
    usable = index.usable & (index.labels >= 0)
    fold_of = assign_folds(index.labels, usable, folds, cfg.seed)
    if int(usable.sum()) < folds:
        raise UserError(f"{int(usable.sum())} labelled train images cannot make {folds} folds")
    if cfg.num_classes is None:
        # Every fold's model gets the same head, whatever classes its rows happen to hold.
        indexes = [index]
        if cfg.val_split:
            from imatdata.manifest import list_shards

            if list_shards(data_dir / cfg.val_split):
                indexes.append(scan_split(data_dir, cfg.val_split))
        cfg = dataclasses.replace(cfg, num_classes=infer_num_classes(*indexes))
    num_classes = int(cfg.num_classes)
    position = {row_id: i for i, row_id in enumerate(ids)}
    probs = np.zeros((len(ids), num_classes), dtype=np.float32)
    seen = np.zeros(len(ids), dtype=bool)
    seconds = {"train": 0.0, "predict": 0.0}
    device = resolve_device(cfg.device)
    infer_cfg = InferConfig(split=cfg.train_split, tta="none", batch_size=max(cfg.batch_size, 64),
                            workers=cfg.workers, device=cfg.device, amp=cfg.amp)
    for k in range(folds):
        fold_dir = out / f"fold-{k}"
        done = fold_dir / "fold_probs.parquet"
        if cfg.resume and storage.is_file(done):
            part = read_oof(done)
            say(f"audit: fold {k + 1}/{folds} already predicted ({done})")
        else:
            held = fold_of == k
            resume = cfg.resume and storage.is_file(fold_dir / "checkpoints" / "last.pt")
            say(f"audit: fold {k + 1}/{folds}: training on {int((usable & ~held).sum())} images, "
                f"predicting {int(held.sum())}")
            t0 = time.perf_counter()
            train(dataclasses.replace(cfg, out=str(fold_dir), resume=resume),
                  train_rows=usable & ~held)
            t1 = time.perf_counter()
            loaded = load_checkpoints([fold_dir], device)
            say(loaded[0].note)
            preds = infer(loaded, data_dir, infer_cfg, device=device,
                          index=dataclasses.replace(index, usable=usable & held))
            seconds["train"] += t1 - t0
            seconds["predict"] += time.perf_counter() - t1
            part = OutOfFold(preds.ids, preds.labels, np.full(len(preds.ids), k, np.int64),
                             preds.probs)
            write_oof(done, part)
        rows = np.array([position[i] for i in part.ids], dtype=np.int64)
        probs[rows] = part.probs
        seen[rows] = True
    keep = np.flatnonzero(seen)
    return OutOfFold([ids[i] for i in keep], index.labels[keep], fold_of[keep], probs[keep]), seconds


def run_audit(cfg: TrainConfig, acfg: AuditConfig, *, say: Say = lambda m: print(m, file=sys.stderr),
              names: Sequence[str] | None = None) -> AuditResult:
    """The whole audit: out-of-fold probabilities (or `--probs`), ranking, files."""
    acfg.validate()
    t_start = time.perf_counter()
    out = Path(cfg.out) if cfg.out else _default_out(cfg)
    _check_outputs(out, acfg, cfg.resume)
    tree = None
    if cfg.tree:
        from imatdata.tree import ProductTree

        tree = ProductTree.load(cfg.tree)
    notes: list[str] = []
    seconds: dict[str, float] = {}
    if acfg.probs is not None:
        oof = read_oof(acfg.probs)
        oof_path = Path(acfg.probs)
        say(f"audit: {len(oof.ids)} rows of out-of-fold probabilities from {oof_path}")
    else:
        if storage.exists(out / OOF_FILE) and not cfg.resume and not acfg.force:
            raise UserError(f"{out} already holds an audit: pass --resume to finish it, "
                            f"--probs {out / OOF_FILE} to rank it again, or choose another --out")
        storage.make_dirs(out)
        oof, seconds = out_of_fold(cfg, acfg.folds, out, say)
        oof_path = out / OOF_FILE
        write_oof(oof_path, oof)
    storage.make_dirs(out)
    ranking = rank_suspects(oof.probs, oof.labels, acfg.method)
    table = suspects_table(oof, ranking, tree)
    suspects_path = out / SUSPECTS_FILE
    write_table_atomic(table.replace_schema_metadata({"method": acfg.method}), suspects_path)
    sheet_path = None
    if acfg.sheet and table.num_rows:
        from imattrain.setup import resolve_data_dir

        top = table.slice(0, acfg.sheet)
        try:
            images = read_images(resolve_data_dir(cfg.data, cfg.root), cfg.train_split,
                                 top.column("id").to_pylist())
        except UserError as exc:
            images = {}
            notes.append(f"contact sheet without images ({exc})")
        sheet_path = out / SHEET_FILE
        storage.write_bytes_atomic(contact_sheet(top, images, names), sheet_path)
    seconds["total"] = time.perf_counter() - t_start
    pairs: dict[str, int] = {}
    for a, b in zip(table.column("given").to_pylist(), table.column("suggested").to_pylist()):
        pairs[f"{a}->{b}"] = pairs.get(f"{a}->{b}", 0) + 1
    report = {"method": acfg.method, "folds": acfg.folds if acfg.probs is None else None,
              "audited": len(oof.ids), "flagged": int(table.num_rows),
              "oof_top1": float((oof.probs.argmax(1) == oof.labels).mean()) if len(oof.ids) else None,
              "top_pairs": dict(sorted(pairs.items(), key=lambda kv: -kv[1])[:20]),
              "seconds": seconds, "probs": str(oof_path), "notes": notes}
    storage.write_bytes_atomic(json.dumps(report, indent=2).encode(), out / REPORT_FILE)
    return AuditResult(out=out, audited=len(oof.ids), flagged=int(table.num_rows),
                       method=acfg.method, suspects=suspects_path, oof=oof_path,
                       sheet=sheet_path, seconds=seconds, notes=notes)
