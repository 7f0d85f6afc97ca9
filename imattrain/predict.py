"""Evaluation and prediction: TTA, checkpoint ensembles, logit adjustment, the submission file.

One inference path serves `imattrain eval` and `imattrain predict`:

1. checkpoints are loaded (EMA weights when the checkpoint has them) and grouped by the
   image size they were trained at, so each group costs one pass over the shards;
2. each batch goes through every model of the group under `torch.inference_mode()`,
   autocast (bf16 on CUDA), channels_last, once per TTA view;
3. per (model, view) the softmax is taken and the probabilities are averaged — over views
   and over checkpoints alike (the usual "average the probabilities" ensemble);
4. post-hoc logit adjustment (Menon et al. 2021): ``score = log(p̄) - tau * log(prior)``,
   prior = training class frequencies (the first checkpoint's `class_counts`). tau = 0 is a
   no-op; `--tune-tau` picks tau on a labelled split by top-3 error.

TTA modes: `none`; `flip` (image and its mirror); `five-crop` (four corners and the centre
of the resized, uncropped image, each of the training crop size).

The submission (`id,predicted`, three distinct labels best first, space separated) has
one row per row of the split, in shard order; rows without a usable image get the top 3 of
the class prior. It is written atomically, as is the optional probabilities Parquet.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from imatdata import storage
from imatdata.errors import UserError
from imatdata.manifest import read_table, write_table_atomic
from imattrain.config import DEFAULT_TAU_GRID, TTA_MODES, EvalConfig, InferConfig, PredictConfig
from imattrain.runtime import autocast_dtype, resolve_device


# --- pure maths -------------------------------------------------------------------------------


def tta_views(images: torch.Tensor, mode: str, crop_size: int | None = None) -> list[torch.Tensor]:
    """The views of a batch (N, C, H, W) that `mode` averages over."""
    if mode == "none":
        return [images]
    if mode == "flip":
        return [images, torch.flip(images, dims=[-1])]
    if mode == "five-crop":
        h, w = images.shape[-2:]
        c = crop_size or min(h, w)
        if c > h or c > w:
            raise ValueError(f"five-crop of {c} px does not fit in {h}x{w} images")
        top, left = (h - c) // 2, (w - c) // 2
        return [
            images[..., :c, :c], images[..., :c, w - c:],
            images[..., h - c:, :c], images[..., h - c:, w - c:],
            images[..., top:top + c, left:left + c],
        ]
    raise UserError(f"unknown --tta {mode!r}: choose one of {', '.join(TTA_MODES)}")


def log_prior(class_counts: np.ndarray) -> np.ndarray:
    """log of the training class frequencies. A class with no training image would get
    log 0 = -inf and an infinite boost from any tau > 0; it is counted as half an image
    instead — still the rarest, but finite."""
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.size == 0 or counts.sum() <= 0:
        raise UserError("the checkpoint has no training class counts, so --tau cannot be applied")
    counts = np.where(counts > 0, counts, 0.5)
    return np.log(counts / counts.sum())


def adjust(log_probs: np.ndarray, prior_log: np.ndarray | None, tau: float) -> np.ndarray:
    """Logit adjustment ``log p - tau * log prior``; exactly the input when tau == 0."""
    if tau == 0 or prior_log is None:
        return log_probs
    return log_probs - tau * prior_log[None, :].astype(log_probs.dtype)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores per row, best first (ties: lower class index first)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
        np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1))
    # Stable order among the chosen: sort by (-score, index).
    chosen = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -chosen), axis=1)
    return np.take_along_axis(part, order, axis=1)


@dataclass
class ClassAccuracy:
    label: int
    count: int
    top1: float
    top3: float


@dataclass
class Metrics:
    n: int
    top1: float
    top3: float
    top5: float
    balanced_accuracy: float  # mean over classes present of per-class top-1 recall
    balanced_top3: float
    per_class: list[ClassAccuracy] = field(default_factory=list)

    @property
    def top3_error(self) -> float:
        return 1.0 - self.top3

    def worst(self, n: int = 10) -> list[ClassAccuracy]:
        return sorted(self.per_class, key=lambda c: (c.top3, c.top1, -c.count, c.label))[:n]


def compute_metrics(scores: np.ndarray, labels: np.ndarray, *, per_class: bool = True) -> Metrics:
    """Top-1/3/5, per-class and balanced accuracy of `scores` (N, C) against `labels` (N,)."""
    labels = np.asarray(labels, dtype=np.int64)
    keep = labels >= 0
    scores, labels = scores[keep], labels[keep]
    n = int(labels.size)
    if n == 0:
        raise UserError("no labelled rows with images to evaluate: check --split and --data")
    top = top_k(scores, 5)
    hit = top == labels[:, None]
    h1, h3, h5 = hit[:, :1].any(1), hit[:, :3].any(1), hit[:, :5].any(1)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    c1 = np.bincount(inverse, weights=h1, minlength=classes.size) / counts
    c3 = np.bincount(inverse, weights=h3, minlength=classes.size) / counts
    rows = [ClassAccuracy(int(c), int(k), float(a1), float(a3))
            for c, k, a1, a3 in zip(classes, counts, c1, c3)] if per_class else []
    return Metrics(n=n, top1=float(h1.mean()), top3=float(h3.mean()), top5=float(h5.mean()),
                   balanced_accuracy=float(c1.mean()), balanced_top3=float(c3.mean()), per_class=rows)


@dataclass
class TauChoice:
    tau: float
    grid: list[dict[str, float]]  # {"tau", "top1", "top3", "top3_error"} per grid value


def tune_tau(log_probs: np.ndarray, labels: np.ndarray, prior_log: np.ndarray,
             grid: Sequence[float] = DEFAULT_TAU_GRID) -> TauChoice:
    """The tau of `grid` with the lowest top-3 error (ties: higher top-1, then the tau
    closest to 0). 0 is always tried, so the choice never has a higher top-3 error on this
    split than no adjustment."""
    values = sorted({0.0, *(float(t) for t in grid)})
    if any(t < 0 or not math.isfinite(t) for t in values):
        raise UserError("tau grid values must be finite and >= 0")
    rows = []
    for t in values:
        m = compute_metrics(adjust(log_probs, prior_log, t), labels, per_class=False)
        rows.append({"tau": t, "top1": m.top1, "top3": m.top3, "top3_error": m.top3_error})
    best = min(rows, key=lambda r: (r["top3_error"], -r["top1"], abs(r["tau"])))
    return TauChoice(tau=best["tau"], grid=rows)


def prior_top(class_counts: np.ndarray, k: int = 3) -> np.ndarray:
    """The k most frequent training classes (ties: lower class id first)."""
    counts = np.asarray(class_counts, dtype=np.float64)
    return top_k(counts[None, :], k)[0]


# --- files ------------------------------------------------------------------------------------


def format_submission(ids: Sequence[str], top3: np.ndarray, labels: Sequence[int] | None = None) -> str:
    """`id,predicted` CSV text: one line per id, the predicted labels space separated.
    `labels[i]` is the class id of model output i (identity when None)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "predicted"])
    for row_id, classes in zip(ids, top3):
        names = [str(labels[c] if labels is not None else int(c)) for c in classes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate labels predicted for {row_id}: {names}")
        writer.writerow([row_id, " ".join(names)])
    return buf.getvalue()


def _same_file(a: Path, b: Path) -> bool:
    if storage.is_remote(a) or storage.is_remote(b):
        return storage.same_location(a, b)
    if storage.exists(a) and storage.exists(b):
        try:
            return os.path.samefile(a, b)  # hard links and symlinks too
        except OSError:
            pass
    return a.resolve() == b.resolve()


def check_outputs(outputs: dict[str, Path | None], inputs: Sequence[Path], data_dir: Path | None,
                  force: bool = False) -> None:
    """Refuse, before any work is done, an output file (flag -> path) that would replace an
    input (a checkpoint, a file inside the data folder), another output of the same command,
    or, without `force`, any existing file. `--force` never lets an input be replaced."""
    seen: dict[str, Path] = {}
    for flag, out in outputs.items():
        if out is None:
            continue
        out = storage.as_location(out)
        for source in inputs:
            if _same_file(out, storage.as_location(source)):
                raise UserError(f"{flag} {out} is {source}, an input of this command; write the "
                                f"output to another file (--force never replaces an input)")
        if data_dir is not None and _inside(out, storage.as_location(data_dir)):
            raise UserError(f"{flag} {out} is inside the data folder {data_dir}; write outputs "
                            f"elsewhere (a file there could be read as data, or replace a shard)")
        for other, path in seen.items():
            if _same_file(out, path):
                raise UserError(f"{flag} and {other} are the same file {out}; give each its own")
        if storage.is_dir(out):
            raise UserError(f"{flag} {out} is a folder; give a file name")
        if storage.exists(out) and not force:
            raise UserError(f"{flag} {out} already exists; pass --force to replace it")
        seen[flag] = out


def _inside(path: Path, folder: Path) -> bool:
    if storage.is_remote(path) or storage.is_remote(folder):
        return storage.is_remote(path) and storage.is_remote(folder) and \
            str(path).startswith(str(folder).rstrip("/") + "/")
    return path.resolve().is_relative_to(folder.resolve())


def write_submission(path: Path, ids: Sequence[str], top3: np.ndarray,
                     labels: Sequence[int] | None = None) -> Path:
    if len(ids) != len(top3):
        raise ValueError("one prediction per id is needed")
    path = storage.as_location(path)
    storage.write_bytes_atomic(format_submission(ids, top3, labels).encode("utf-8"), path)
    return path


def write_probs(path: Path, ids: Sequence[str], probs: np.ndarray) -> Path:
    """Parquet with `id` and `probs` (fixed-size list<float32>, one value per class)."""
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    n, c = probs.shape
    values = pa.array(probs.reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(values, c)
    table = pa.table({"id": pa.array(list(ids), type=pa.string()), "probs": column})
    table = table.replace_schema_metadata({"num_classes": str(c)})
    write_table_atomic(table, storage.as_location(path))
    return storage.as_location(path)


def read_probs(path: Path) -> tuple[list[str], np.ndarray]:
    table = read_table([storage.as_location(path)])
    ids = table.column("id").to_pylist()
    flat = table.column("probs").combine_chunks()
    c = flat.type.list_size
    return ids, flat.flatten().to_numpy(zero_copy_only=False).reshape(-1, c)


# --- checkpoints ------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    path: Path
    model: nn.Module
    image_size: int
    eval_resize: int
    num_classes: int
    class_counts: np.ndarray
    tau: float = 0.0  # the run's --tau: the default logit adjustment for its checkpoints
    note: str = ""  # one line: which weights these are and why (`checkpoint_note`)


def run_checkpoint(path: Path) -> Path:
    """A `--checkpoint` argument as a file: a run folder (or its checkpoints/ folder) means
    the run's choice, `best.pt` (the latest epoch within noise of the lowest val top-3
    error; see imattrain.selection), or `last.pt` when the run had no validation."""
    path = storage.as_location(path)
    if not storage.is_dir(path):
        return path
    folder = path if storage.is_file(path / "last.pt") else path / "checkpoints"
    for name in ("best.pt", "last.pt"):
        if storage.is_file(folder / name):
            return folder / name
    raise UserError(f"{path} is a folder without checkpoints/best.pt or last.pt; give a run "
                    f"folder (runs/NAME) or a checkpoint file")


def checkpoint_note(path: Path, ckpt: dict[str, Any], *, ema: bool, chosen: bool) -> str:
    """One line saying which weights a checkpoint holds and why they are the ones used;
    `chosen`: picked from a run folder rather than named by the user."""
    from imattrain.selection import Choice

    cfg = ckpt.get("config") or {}
    epoch, epochs = ckpt.get("epoch"), cfg.get("epochs")
    when = f"epoch {epoch}/{epochs}" if epoch is not None and epochs else f"step {ckpt.get('step')}"
    selection = ckpt.get("selection")
    partial = (ckpt.get("data_state") or {}).get("samples", 0)
    if ckpt.get("two_stage"):
        why = "after the two-stage classifier re-training"
    elif path.name.startswith("snapshot"):
        why = f"an SGDR snapshot (end of a cycle, step {ckpt.get('step')})"
    elif partial:
        why = f"saved mid-epoch at step {ckpt.get('step')} (the run was stopped)"
    elif selection and selection.get("epoch") == epoch:
        why = Choice.from_state(selection).reason()
    elif path.name == "best.pt" and ckpt.get("best_top3_err") is not None:
        why = f"lowest val top-3 error {float(ckpt['best_top3_err']):.4f}"
    elif epoch is not None and epoch == epochs:
        why = ("the last epoch (the run had no validation split)" if path.name == "last.pt"
               and not selection else "the last epoch")
    else:
        why = "as saved"
    source = "the run's choice" if chosen else "as given"
    weights = ", EMA weights" if ema else ""
    return f"checkpoint {path} ({source}): {when}{weights}; {why}"


def _natural_key(path: Path) -> list[Any]:
    # snapshot-cycle10 after snapshot-cycle9.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def snapshot_paths(run_dir: Path) -> list[Path]:
    """The SGDR snapshots of one run (`RUN_DIR/checkpoints/snapshot*.pt`), in cycle order."""
    folder = storage.as_location(run_dir) / "checkpoints"
    found = sorted((p for p in storage.children(folder) if fnmatch.fnmatch(p.name, "snapshot*.pt")),
                   key=_natural_key)
    if not found:
        raise UserError(f"no SGDR snapshots in {folder}: train with --schedule sgdr, or pass "
                        "--checkpoint files instead")
    return found


def load_checkpoints(paths: Sequence[Path], device: torch.device, *, use_ema: bool = True,
                     channels_last: bool = True) -> list[LoadedCheckpoint]:
    """Load every checkpoint for inference; they must agree on the number of classes."""
    from imattrain.checkpoint import load_model

    if not paths:
        raise UserError("give at least one --checkpoint (or --snapshots RUN_DIR)")
    loaded: list[LoadedCheckpoint] = []
    for given in paths:
        path = run_checkpoint(storage.as_location(given))
        if not storage.is_file(path):
            raise UserError(f"checkpoint {path} does not exist")
        model, ckpt = load_model(path, device, use_ema=use_ema)
        model.eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        cfg = ckpt.get("config") or {}
        image_size = int(ckpt.get("image_size") or cfg.get("image_size") or 224)
        resize = cfg.get("eval_resize") or int(round(image_size * 256 / 224))
        num_classes = int(ckpt["num_classes"])
        counts = np.asarray(ckpt.get("class_counts") if ckpt.get("class_counts") is not None
                            else np.zeros(num_classes), dtype=np.float64)
        note = checkpoint_note(path, ckpt, ema=use_ema and ckpt.get("ema") is not None,
                               chosen=path != storage.as_location(given))
        loaded.append(LoadedCheckpoint(path, model, image_size, int(resize), num_classes, counts,
                                       float(cfg.get("tau") or 0.0), note))
    sizes = {c.num_classes for c in loaded}
    if len(sizes) > 1:
        raise UserError(f"the checkpoints disagree on the number of classes ({sorted(sizes)}); "
                        "ensemble only models trained on the same label set")
    return loaded


# --- inference --------------------------------------------------------------------------------


@dataclass
class Predictions:
    """Averaged probabilities of every row of a split the loader yielded, in shard order."""

    ids: list[str]
    probs: np.ndarray  # (N, C) float32; rows without an image are zeros
    labels: np.ndarray  # (N,) int64, -1 when unknown
    has_image: np.ndarray  # (N,) bool


def _group_by_input(checkpoints: Sequence[LoadedCheckpoint], tta: str) -> list[list[LoadedCheckpoint]]:
    # Models trained at one size share one pass over the data (decode once, run all).
    groups: dict[tuple[int, int], list[LoadedCheckpoint]] = {}
    for c in checkpoints:
        groups.setdefault((c.image_size, c.eval_resize if tta == "five-crop" else 0), []).append(c)
    return list(groups.values())


def split_row_ids(index: Any) -> list[str]:
    """Every id of a scanned split (`imattrain.data.SplitIndex`), in the index's (shard) order."""
    from imatdata.manifest import read_row_group

    ids: list[str] = []
    for unit in index.units:
        ids += [str(v) for v in read_row_group(unit, ["id"]).column("id").to_pylist()]
    return ids


def infer(checkpoints: Sequence[LoadedCheckpoint], data_dir: Path, cfg: InferConfig, *,
          device: torch.device | None = None, include_missing: bool = False,
          channels_last: bool = True, index: Any = None) -> Predictions:
    """Probabilities averaged over TTA views and checkpoints for the rows of `cfg.split`
    (all of them with `include_missing`, else those with a decodable image). `device`, when
    given, is `cfg.device` already resolved. `index`, when given, is the split's
    `SplitIndex` already scanned (its `usable` mask may leave rows out: audit's folds)."""
    from imattrain.data import build_loader, scan_split
    from imattrain.transforms import build_eval_transform

    split, tta = cfg.split, cfg.tta
    if tta not in TTA_MODES:
        raise UserError(f"unknown --tta {tta!r}: choose one of {', '.join(TTA_MODES)}")
    if cfg.batch_size < 1 or cfg.workers < 0:
        raise UserError("--batch-size must be at least 1 and --workers not negative")
    device = device or resolve_device(cfg.device)
    dtype = autocast_dtype(cfg.amp, device)
    index = index if index is not None else scan_split(data_dir, split)
    all_ids = split_row_ids(index)
    position = {row_id: i for i, row_id in enumerate(all_ids)}
    num_classes = checkpoints[0].num_classes
    # Preallocated in shard order: loader workers interleave batches, and accumulating
    # into one float32 array keeps memory at N x C x 4 bytes whatever the ensemble size.
    total = np.zeros((len(all_ids), num_classes), dtype=np.float32)
    seen = np.zeros(len(all_ids), dtype=bool)
    has_image = np.zeros(len(all_ids), dtype=bool)
    labels = np.full(len(all_ids), -1, dtype=np.int64)
    for group in _group_by_input(checkpoints, tta):
        size = group[0].image_size
        if tta == "five-crop":
            # Resize the shorter side and keep the whole square; the five crops come from it.
            transform = build_eval_transform(group[0].eval_resize, group[0].eval_resize)
        else:
            transform = build_eval_transform(size, group[0].eval_resize)
        loader = build_loader(data_dir, split, transform=transform, batch_size=cfg.batch_size,
                              workers=cfg.workers, train=False, include_missing=include_missing,
                              index=index)
        with torch.inference_mode():
            for batch in loader:
                rows = np.array([position[str(i)] for i in batch["id"]], dtype=np.int64)
                if rows.size == 0:
                    continue
                has = batch["has_image"].numpy().astype(bool)
                seen[rows] = True
                has_image[rows] = has
                labels[rows] = batch["label"].numpy()
                if not has.any():
                    continue
                images = batch["image"][torch.from_numpy(has)].to(device, non_blocking=True)
                views = tta_views(images, tta, size)
                acc = torch.zeros(images.shape[0], num_classes, dtype=torch.float32, device=device)
                for member in group:
                    for view in views:
                        if channels_last:
                            view = view.contiguous(memory_format=torch.channels_last)
                        with torch.autocast(device.type, dtype=dtype or torch.float32,
                                            enabled=dtype is not None):
                            logits = member.model(view)
                        acc += F.softmax(logits.float(), dim=1)
                total[rows[has]] += (acc / len(views)).cpu().numpy()
    total /= len(checkpoints)
    # With include_missing every row counts (one the loader never yielded is treated as
    # having no image); otherwise only the rows that had one.
    keep = np.arange(len(all_ids)) if include_missing else np.flatnonzero(seen)
    return Predictions(ids=[all_ids[i] for i in keep], probs=total[keep] if keep.size < len(all_ids) else total,
                       labels=labels[keep], has_image=has_image[keep])


# --- eval -------------------------------------------------------------------------------------


@dataclass
class EvalReport:
    split: str
    checkpoints: list[str]
    tta: str
    tau: float
    metrics: Metrics
    tau_search: list[dict[str, float]] | None = None
    unadjusted: Metrics | None = None  # the tau = 0 figures, when tau != 0
    notes: list[str] = field(default_factory=list)  # per checkpoint: which weights and why

    def to_dict(self, worst: int = 10) -> dict[str, Any]:
        def m(x: Metrics) -> dict[str, Any]:
            return {"n": x.n, "top1": x.top1, "top3": x.top3, "top5": x.top5,
                    "top3_error": x.top3_error, "balanced_accuracy": x.balanced_accuracy,
                    "balanced_top3": x.balanced_top3}

        out: dict[str, Any] = {"split": self.split, "checkpoints": self.checkpoints, "tta": self.tta,
                               "checkpoint_notes": self.notes, "tau": self.tau, **m(self.metrics),
                               "worst_classes": [asdict(c) for c in self.metrics.worst(worst)],
                               "per_class": [asdict(c) for c in self.metrics.per_class]}
        if self.unadjusted is not None:
            out["without_tau"] = m(self.unadjusted)
        if self.tau_search is not None:
            out["tau_search"] = self.tau_search
        return out

    def to_json(self, worst: int = 10) -> str:
        """What `eval --json` prints and `eval --out` writes."""
        return json.dumps(self.to_dict(worst), indent=2)


def _check_tau(tau: float | None) -> None:
    """None means the first checkpoint's own `--tau` (0 unless its run set one)."""
    if tau is not None and (tau < 0 or not math.isfinite(tau)):
        raise UserError(f"--tau must be a finite number >= 0 (got {tau})")


def evaluate_checkpoints(paths: Sequence[Path], data_dir: Path, cfg: EvalConfig) -> EvalReport:
    """Metrics of `cfg.split` for one checkpoint or an ensemble; with `cfg.out`, the full
    report (`to_dict(cfg.worst)`) is also written there as JSON (see `check_outputs`)."""
    _check_tau(cfg.tau)
    check_outputs({"--out": cfg.out}, [*paths, *map(run_checkpoint, paths)], data_dir, cfg.force)
    dev = resolve_device(cfg.device)
    loaded = load_checkpoints(paths, dev)
    tau = loaded[0].tau if cfg.tau is None else cfg.tau
    preds = infer(loaded, data_dir, cfg, device=dev, include_missing=False)
    log_p = np.log(np.clip(preds.probs, 1e-30, None))
    prior = log_prior(loaded[0].class_counts) if (tau or cfg.tune_tau) else None
    search = None
    if cfg.tune_tau:
        assert prior is not None
        grid = DEFAULT_TAU_GRID if cfg.tau_grid is None else cfg.tau_grid
        choice = tune_tau(log_p, preds.labels, prior, grid)
        tau, search = choice.tau, choice.grid
    metrics = compute_metrics(adjust(log_p, prior, tau), preds.labels)
    base = compute_metrics(log_p, preds.labels) if tau else None
    report = EvalReport(split=cfg.split, checkpoints=[str(c.path) for c in loaded], tta=cfg.tta,
                        tau=tau, metrics=metrics, tau_search=search, unadjusted=base,
                        notes=[c.note for c in loaded])
    if cfg.out is not None:
        storage.write_bytes_atomic((report.to_json(cfg.worst) + "\n").encode(), cfg.out)
    return report


# --- predict ----------------------------------------------------------------------------------


@dataclass
class PredictReport:
    rows: int
    with_image: int
    from_prior: int
    out: str
    probs: str | None
    checkpoints: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # per checkpoint: which weights and why


def predict_submission(paths: Sequence[Path], data_dir: Path, out: Path,
                       cfg: PredictConfig) -> PredictReport:
    """Write the competition file `out` (and, with `cfg.probs`, the probabilities) for every row
    of `cfg.split`. Existing files are replaced only with `cfg.force`; inputs never (see
    `check_outputs`)."""
    probs_out = cfg.probs
    _check_tau(cfg.tau)
    check_outputs({"--out": out, "--probs": probs_out}, [*paths, *map(run_checkpoint, paths)],
                  data_dir, cfg.force)
    dev = resolve_device(cfg.device)
    loaded = load_checkpoints(paths, dev)
    tau = loaded[0].tau if cfg.tau is None else cfg.tau
    preds = infer(loaded, data_dir, cfg, device=dev, include_missing=True)
    all_ids = preds.ids  # include_missing: every row of the split, in shard order
    counts = loaded[0].class_counts
    num_classes = loaded[0].num_classes
    if counts.sum() <= 0:
        counts = np.ones(num_classes)
    prior_probs = (counts / counts.sum()).astype(np.float32)
    prior = log_prior(counts) if tau else None
    with_image = preds.has_image
    top3 = np.empty((len(all_ids), min(3, num_classes)), dtype=np.int64)
    if with_image.any():
        log_p = np.log(np.clip(preds.probs[with_image], 1e-30, None))
        top3[with_image] = top_k(adjust(log_p, prior, tau), 3)
    top3[~with_image] = prior_top(counts, 3)
    if probs_out is not None:
        probs = preds.probs
        probs[~with_image] = prior_probs
        write_probs(probs_out, all_ids, probs)
    write_submission(out, all_ids, top3)
    return PredictReport(rows=len(all_ids), with_image=int(with_image.sum()), from_prior=int((~with_image).sum()),
                         out=str(out), probs=str(probs_out) if probs_out else None,
                         checkpoints=[str(c.path) for c in loaded], notes=[c.note for c in loaded])

