"""Trainer configuration: dataclasses whose fields are the commands' flags.

`TrainConfig` is everything a run needs. Every field is a `imattrain run` (and `lr-find`)
flag (the CLI is generated from the fields by `imatdata.options`, so none is forgotten) and a
key of `runs/NAME/config.toml`, which a later run can take back with `--config`. Values are
checked in one place, `TrainConfig.validate`, so a bad value from a flag and from a file get
the same one-line error.

`EvalConfig`, `PredictConfig` (both an `InferConfig`) and `LRFindConfig` are the options of
`eval`, `predict` and `lr-find`'s range test, generated the same way. They live here rather
than beside their code because the CLI builds every command's flags at import time, and this
module does not import torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from imatdata import options
from imatdata.errors import UserError
from imatdata.options import flag_name, opt

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "sgdr", "cyclic", "onecycle", "step", "constant")
AUGMENTS = ("basic", "autoaugment", "randaugment", "trivialaugment", "none")
SAMPLERS = ("instance", "sqrt", "balanced")
LOSSES = ("ce", "focal", "class-balanced")
AMPS = ("auto", "none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


def _opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
         group: str = "general") -> Any:
    return opt(default, help, choices=choices, group=group)


@dataclass
class TrainConfig:
    """Everything a training run needs; `asdict()` of it is saved in every checkpoint."""

    # data and output
    data: str | None = _opt(None, "Folder of clean shards holding the train and val splits "
                                  "(default: <root>/clean).", group="data")
    root: str | None = _opt(None, "Manifest root used to find --data (default: $IMAT_ROOT or "
                                  "./manifests).", group="data")
    out: str | None = _opt(None, "Run folder for config, metrics, checkpoints and curves "
                                 "(default: runs/<model>-<timestamp>).", group="data")
    train_split: str = _opt("train", "Split to train on.", group="data")
    val_split: str = _opt("val", "Split to validate on ('' to skip validation).", group="data")
    num_classes: int | None = _opt(None, "Number of classes (default: largest label in train "
                                         "and val + 1).", group="data")
    workers: int = _opt(2, "DataLoader worker processes per rank (0: load in the main "
                           "process).", group="data")
    prefetch: int = _opt(2, "Batches each worker prepares ahead.", group="data")
    shuffle_buffer: int = _opt(2048, "Samples mixed across row groups by the shuffle buffer.",
                               group="data")
    threads: int = _opt(0, "CPU threads for the model on a CPU device (0: all of the rank's "
                           "cores but those the loader workers are measured to keep busy).",
                        group="data")
    gpu_decode: bool = _opt(False, "Decode JPEGs on the GPU in batches (nvjpeg); workers then "
                                   "only read bytes. Needs CUDA.", group="data")
    relabel: str | None = _opt(None, "Train the rows an audit's suspects.parquet names on its "
                                     "suggested class instead of their given label (`imattrain "
                                     "audit`).", group="data")
    relabel_min_score: float | None = _opt(None, "With --relabel: only the suspects whose score "
                                                 "is at least this (default: all of them).",
                                           group="data")

    # model
    model: str = _opt("resnet50", "torchvision (or timm, when installed) model name.",
                      group="model")
    pretrained: str | None = _opt(None, "Initial weights: a local state dict / checkpoint path, "
                                        "or 'torchvision' for torchvision's weights.",
                                  group="model")
    image_size: int = _opt(224, "Training and evaluation crop size in pixels.", group="model")
    eval_resize: int | None = _opt(None, "Evaluation resize of the shorter side before the "
                                         "centre crop (default: the whole image, --image-size, "
                                         "when the augmentation is none; else image-size * "
                                         "256/224).", group="model")
    channels_last: bool = _opt(False, "Use the channels_last memory format.", group="model")
    compile: bool = _opt(False, "torch.compile the model.", group="model")

    # augmentation
    augment: str = _opt("auto", "Augmentation preset; auto: none (resize, centre crop, flip) "
                                "for a short run, basic beyond (see auto_recipe).",
                        choices=("auto", *AUGMENTS), group="augment")
    crop_scale: float | None = _opt(None, "Smallest area fraction of RandomResizedCrop "
                                          "\\[default: auto, from the run's length].",
                                    group="augment")
    color_jitter: float | None = _opt(None, "Brightness/contrast/saturation jitter of the basic "
                                            "preset, 0: off \\[default: auto].", group="augment")
    rotation: float | None = _opt(None, "Largest random rotation in degrees of the basic preset "
                                        "\\[default: auto].", group="augment")
    hflip: float = _opt(0.5, "Probability of a horizontal flip.", group="augment")

    # optimisation
    epochs: int = _opt(10, "Training epochs.", group="optim")
    batch_size: int = _opt(64, "Images per batch per rank.", group="optim")
    grad_accum: int = _opt(1, "Batches accumulated per optimiser step.", group="optim")
    optimizer: str = _opt("sgd", "Optimiser.", choices=OPTIMIZERS, group="optim")
    lr: float = _opt(0.1, "Peak learning rate.", group="optim")
    momentum: float = _opt(0.9, "SGD momentum (AdamW beta1).", group="optim")
    nesterov: bool = _opt(True, "Nesterov momentum for SGD.", group="optim")
    weight_decay: float | None = _opt(None, "Weight decay, not applied to norms and biases "
                                            "\\[default: auto: 5e-4 from scratch, 1e-4 from "
                                            "pretrained weights].", group="optim")
    clip_grad: float = _opt(0.0, "Clip the gradient norm to this value (0: off).",
                            group="optim")
    schedule: str = _opt("cosine", "Learning-rate schedule, stepped every optimiser step.",
                         choices=SCHEDULES, group="optim")
    warmup_epochs: float | None = _opt(None, "Linear warm-up length in epochs (cosine, sgdr, "
                                             "step, constant) \\[default: auto: 10% of a cosine "
                                             "run, 0.3-2 epochs; 0 for the others].",
                                       group="optim")
    min_lr: float = _opt(0.0, "Lowest learning rate of cosine, sgdr and cyclic (cyclic: "
                                "--lr/10 when 0).", group="optim")
    sgdr_t0: float = _opt(1.0, "SGDR: length of the first cycle in epochs.", group="optim")
    sgdr_tmult: float = _opt(2.0, "SGDR: each cycle is this many times longer than the last.",
                             group="optim")
    cycle_epochs: float = _opt(2.0, "cyclic: length of one triangular cycle in epochs.",
                               group="optim")
    pct_start: float = _opt(0.3, "onecycle: fraction of the run spent increasing the rate.",
                            group="optim")
    step_epochs: float = _opt(3.0, "step: epochs between decays.", group="optim")
    step_gamma: float = _opt(0.1, "step: factor applied at each decay.", group="optim")
    amp: str = _opt("auto", "Mixed precision: auto (bf16 on CUDA, none on CPU), none, bf16, "
                            "fp16 (CUDA only, with a GradScaler).", choices=AMPS, group="optim")
    ema_decay: float = _opt(0.0, "Keep an exponential moving average of the weights with this "
                                 "decay, e.g. 0.9998 (0: off).", group="optim")

    # imbalance and hierarchy (see imattrain.tricks.losses / sampling / hierarchy / two_stage)
    sampler: str = _opt("instance", "Class sampling: instance (natural), sqrt (square-root "
                                    "frequency), balanced (uniform over classes).",
                        choices=SAMPLERS, group="imbalance")
    loss: str = _opt("ce", "Loss: cross-entropy, focal or class-balanced (effective number).",
                     choices=LOSSES, group="imbalance")
    focal_gamma: float = _opt(2.0, "Focal loss gamma.", group="imbalance")
    cb_beta: float = _opt(0.999, "Class-balanced loss beta.", group="imbalance")
    label_smoothing: float = _opt(0.1, "Label smoothing of the loss.", group="imbalance")
    two_stage: bool = _opt(False, "After the main run, re-train the classifier on "
                                  "class-balanced batches.", group="imbalance")
    two_stage_epochs: int = _opt(2, "Epochs of the classifier re-training.", group="imbalance")
    tau: float = _opt(0.0, "Post-hoc logit adjustment that eval and predict apply to this run's "
                           "checkpoints unless their --tau says otherwise (0: off).",
                      group="imbalance")
    tree: str | None = _opt(None, "Product tree JSON: adds hierarchical (level) heads and "
                                  "loss.", group="imbalance")
    hier_weight: float = _opt(0.3, "Weight of the hierarchy levels' loss.", group="imbalance")

    # run control
    seed: int = _opt(0, "Seed of shuffling, augmentation and initialisation.", group="run")
    device: str = _opt("auto", "Device: auto, cpu or cuda.", choices=DEVICES, group="run")
    resume: bool = _opt(False, "Continue from <out>/checkpoints/last.pt exactly where it "
                               "stopped.", group="run")
    checkpoint_every: int = _opt(0, "Also save last.pt every this many optimiser steps, so a "
                                    "killed run resumes mid-epoch (0: end of epoch only).",
                                 group="run")
    max_steps: int = _opt(0, "Stop (saving last.pt) after this many optimiser steps in total "
                             "(0: no limit).", group="run")
    eval_every: int = _opt(1, "Validate every this many epochs (and after the last).",
                           group="run")
    quiet: bool = _opt(False, "No progress display.", group="run")

    # --- helpers ----------------------------------------------------------------------------

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self) -> TrainConfig:
        """This config with every auto value (None, augment "auto") filled in by
        `auto_recipe`; itself when there is none. Everything that trains calls it."""
        missing = self.auto_fields()
        if not missing:
            return self
        values = auto_recipe(self.epochs, self.pretrained is not None, self.schedule)
        if self.augment == "auto" and any(getattr(self, name) is not None
                                        for name in ("crop_scale", "rotation", "color_jitter")):
            values["augment"] = "basic"  # a basic-preset value was given: that preset is meant
        augment = values["augment"] if "augment" in missing else self.augment
        # `none` trains on the evaluation view: the whole image, as a plain loop does (a centre
        # crop only pays for itself against the zoom of random-crop training). ResNet-18 at
        # 64 px, 2 epochs, same seed: test top-1 0.850 on the whole image, 0.819 centre-cropped.
        values["eval_resize"] = (self.image_size if augment == "none"
                                 else int(round(self.image_size * 256 / 224)))
        return dataclasses.replace(self, **{name: values[name] for name in missing})

    def auto_fields(self) -> list[str]:
        """The recipe fields left to `auto_recipe` (None, or augment "auto")."""
        return [name for name in AUTO_FIELDS if getattr(self, name) in (None, "auto")]

    def validate(self) -> TrainConfig:
        """Raise UserError naming the first bad value; returns self for chaining."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise UserError(f"--{flag_name(f.name)} must be one of {', '.join(choices)} "
                                f"(got {value!r})")
        positive_int = ("epochs", "batch_size", "grad_accum", "image_size", "prefetch",
                        "eval_every")
        for name in positive_int:
            if getattr(self, name) < 1:
                raise UserError(f"--{flag_name(name)} must be at least 1 "
                                f"(got {getattr(self, name)})")
        non_negative = ("workers", "threads", "shuffle_buffer", "checkpoint_every", "max_steps",
                        "weight_decay", "clip_grad", "warmup_epochs", "min_lr", "focal_gamma",
                        "tau", "hier_weight", "color_jitter", "rotation")
        for name in non_negative:
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise UserError(f"--{flag_name(name)} must not be negative "
                                f"(got {getattr(self, name)})")
        for name in ("lr", "sgdr_t0", "cycle_epochs", "step_epochs"):
            value = getattr(self, name)
            if not value > 0 or not math.isfinite(value):
                raise UserError(f"--{flag_name(name)} must be a positive number (got {value})")
        ranges = {
            "momentum": (0.0, 1.0, True), "label_smoothing": (0.0, 1.0, False),
            "ema_decay": (0.0, 1.0, False), "hflip": (0.0, 1.0, True),
            "cb_beta": (0.0, 1.0, False), "pct_start": (0.0, 1.0, False),
            "step_gamma": (0.0, 1.0, True),
        }
        for name, (lo, hi, hi_inclusive) in ranges.items():
            value = getattr(self, name)
            ok = lo <= value <= hi if hi_inclusive else lo <= value < hi
            if name in ("cb_beta", "pct_start", "step_gamma"):
                ok = ok and value > lo
            if not ok:
                bound = "]" if hi_inclusive else ")"
                raise UserError(f"--{flag_name(name)} must be in [{lo:g}, {hi:g}{bound} "
                                f"(got {value})")
        if self.crop_scale is not None and not 0 < self.crop_scale <= 1:
            raise UserError(f"--crop-scale must be in (0, 1] (got {self.crop_scale})")
        if self.sgdr_tmult < 1:
            raise UserError(f"--sgdr-tmult must be at least 1 (got {self.sgdr_tmult})")
        if self.min_lr >= self.lr and self.schedule in ("cosine", "sgdr", "cyclic"):
            raise UserError(f"--min-lr ({self.min_lr}) must be below --lr ({self.lr})")
        if self.eval_resize is not None and self.eval_resize < self.image_size:
            raise UserError(f"--eval-resize ({self.eval_resize}) must be at least --image-size "
                            f"({self.image_size})")
        if self.num_classes is not None and self.num_classes < 2:
            raise UserError(f"--num-classes must be at least 2 (got {self.num_classes})")
        if self.two_stage_epochs < 1:
            raise UserError(f"--two-stage-epochs must be at least 1 "
                            f"(got {self.two_stage_epochs})")
        if self.tree is not None and not Path(self.tree).is_file():
            raise UserError(f"--tree {self.tree}: no such file; give the product tree JSON")
        if self.amp == "fp16" and self.device == "cpu":
            raise UserError("--amp fp16 needs CUDA; use --amp bf16 on CPU")
        if self.relabel_min_score is not None and self.relabel is None:
            raise UserError("--relabel-min-score needs --relabel FILE (an audit's suspects.parquet)")
        if not self.model:
            raise UserError("--model must name a model, e.g. resnet50")
        return self

    @property
    def resolved_eval_resize(self) -> int:
        if self.eval_resize is not None:
            return self.eval_resize
        return int(round(self.image_size * 256 / 224))


# --- the auto recipe ---------------------------------------------------------------------------

AUTO_FIELDS = ("augment", "crop_scale", "rotation", "color_jitter", "warmup_epochs",
               "weight_decay", "eval_resize")
# Runs up to LIGHT_EPOCHS long (from scratch; half as many from pretrained weights) train on
# the evaluation view and its mirror only (`--augment none`); beyond, the basic preset grows
# linearly to the 2019 recipe's strength (crop scale 0.35, rotation 10, jitter 0.3) at
# FULL_AUGMENT_EPOCHS.
LIGHT_EPOCHS = 8
FULL_AUGMENT_EPOCHS = 30
# The basic preset's mildest crop: the area of the evaluation centre crop ((224/256)^2), so
# training and evaluation see objects at about the same scale.
MILD_CROP_SCALE = 0.766


def auto_recipe(epochs: int, pretrained: bool, schedule: str) -> dict[str, Any]:
    """The values `TrainConfig.resolved` gives the recipe fields left unset.

    Augmentation follows the run's length: a short run cannot fit the harder samples strong
    augmentation makes, a long one needs them against over-fitting. Measured on Fashion-MNIST
    photos with ResNet-18 at 32 px, 3 epochs from scratch (bench/recipes.py; README
    "Training recipes"): test top-1 0.816 with `--augment none` (flip only), 0.758 with a
    light basic preset (crop scale 0.755, rotation 1, jitter 0.12), 0.720 with the 2019
    preset (the old default), 0.782 for the plain torchvision loop; at 6 epochs `none`
    still beat the mildest basic preset, 0.864 to 0.844, hence `none` up to 8 epochs (the
    default 10-epoch run gets a mild basic preset); at 64 px, 6 epochs from scratch (issue
    #17's budget), these defaults reached 0.890 against the plain loop's 0.888 (one seed).
    Pretrained features already fit, so a fine-tune reaches each strength in half the
    epochs.
    Warm-up: a linear ramp over 10% of the run (0.3-2 epochs) keeps the first steps at the
    peak rate from wrecking BatchNorm statistics (from scratch) or pretrained features (a
    fine-tune's new head sends large gradients back). Only the default schedule, cosine, gets
    it: the others are a shape chosen on purpose (onecycle and cyclic ramp up themselves, a
    warm-up would shift SGDR's cycle ends and snapshots, step and constant keep theirs).
    Weight decay: 5e-4 from scratch (the value of CIFAR-style short runs; with `none`, 3
    epochs at 32 px, test top-1 0.816 against 0.784 at 1e-4, single runs), 1e-4 for a
    fine-tune (torchvision's ImageNet recipes), whose weights should stay near the
    pretrained ones.
    """
    scale = 2.0 if pretrained else 1.0
    light, full = LIGHT_EPOCHS / scale, FULL_AUGMENT_EPOCHS / scale
    strength = min(1.0, max(0.0, (epochs - light) / (full - light)))
    warmup = round(min(2.0, max(0.3, 0.1 * epochs)), 3) if schedule == "cosine" else 0.0
    return {
        "augment": "basic" if strength > 0 else "none",
        "crop_scale": round(MILD_CROP_SCALE - (MILD_CROP_SCALE - 0.35) * strength, 3),
        "rotation": round(10.0 * strength, 2),
        "color_jitter": round(0.1 + 0.2 * strength, 3),
        "warmup_epochs": warmup,
        "weight_decay": 1e-4 if pretrained else 5e-4,
    }


# --- flags and TOML ----------------------------------------------------------------------------


def config_fields() -> list[dataclasses.Field[Any]]:
    """The fields of TrainConfig that are flags (all of them)."""
    return options.option_fields(TrainConfig)


def load_toml(path: Path) -> dict[str, Any]:
    """Read a run config file; keys may use '-' or '_'; unknown keys are an error."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {path}: not valid TOML ({exc})") from None
    # Allow an optional [train] table so the file can share space with other tools.
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    known = {f.name for f in fields(TrainConfig)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UserError(f"{path}: unknown key {key!r}; see `imattrain run --help` for the keys")
        out[name] = options.parse_value(TrainConfig, name, value, source=str(path))
    return out


def build_config(file_values: Mapping[str, Any] | None = None,
                 flag_values: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the TOML file, then flags (already parsed to their types)."""
    merged: dict[str, Any] = {}
    merged.update(file_values or {})
    merged.update(flag_values or {})
    return TrainConfig(**merged).validate()


def to_toml(cfg: TrainConfig) -> str:
    """The config as TOML (None values are left out: TOML has no null)."""
    lines = ["# imattrain run configuration; reuse with `imattrain run --config config.toml`"]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(str(value))  # a JSON string is a valid TOML basic string
        lines.append(f"{f.name} = {text}")
    return "\n".join(lines) + "\n"


# --- eval, predict and lr-find ----------------------------------------------------------------

TTA_MODES = ("none", "flip", "five-crop")
DEFAULT_TAU_GRID = tuple(round(0.1 * i, 2) for i in range(0, 21))  # 0.0 .. 2.0

_FORCE_HELP = ("Replace output files that already exist (never an input: a checkpoint or the "
               "data).")


def output_location(text: str) -> Any:
    """A file to write: a local Path, or an S3 location for s3://bucket/key (a Path would
    read that as the folder 's3:')."""
    from imatdata.storage import as_location  # pyarrow: loaded only when the flag is given

    return as_location(text)


def parse_tau_grid(text: str) -> tuple[float, ...]:
    """`--tau-grid 0,0.5,1` as numbers (an empty flag never gets here: it is None, the
    default grid)."""
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UserError(f"--tau-grid must be comma-separated numbers, e.g. 0,0.5,1 "
                        f"(got {text!r})") from None


@dataclass
class InferConfig:
    """How eval and predict run checkpoints over a split: which split, the test-time views,
    the logit adjustment, and the loader and device (the "infer" flags panel)."""

    split: str = opt("val", "Split to run the checkpoints over.")
    tta: str = opt("none", "Test-time augmentation averaged per image.",
                   metavar="|".join(TTA_MODES))
    # None: the first checkpoint's own run --tau (0 unless its run set one).
    tau: float | None = opt(None, "Logit adjustment: log p - tau * log(train prior) "
                                  "\\[default: the run's --tau, else 0].")
    batch_size: int = opt(128, "Images per inference batch.", group="infer")
    workers: int = opt(2, "Loader worker processes.", group="infer")
    device: str = opt("auto", "auto, cpu or cuda.", group="infer")
    amp: str = opt("auto", "auto (bf16 on CUDA), none, bf16, fp16.", group="infer")


@dataclass
class EvalConfig(InferConfig):
    """`imattrain eval`: metrics of a labelled split, optionally choosing tau on it."""

    split: str = opt("val", "Labelled split to evaluate.")
    tune_tau: bool = opt(False, "Choose tau on this split by top-3 error (grid: --tau-grid).", negatable=False)
    # Not a tuple field: the flag is one comma-separated value, read by `parse`.
    tau_grid: Sequence[float] | None = opt(None, "Comma-separated taus for --tune-tau (default "
                                                 "0,0.1,...,2).", parse=parse_tau_grid)
    worst: int = opt(10, "How many of the worst classes to list.")
    out: Path | None = opt(None, "Also write the full report (per-class figures included) as JSON.",
                           parse=output_location)
    force: bool = opt(False, _FORCE_HELP, negatable=False)


@dataclass
class PredictConfig(InferConfig):
    """`imattrain predict`: the submission of every row of a split (the file is an argument)."""

    split: str = opt("test", "Split to predict (every row gets a line).")
    tau: float | None = opt(None, "Logit adjustment (e.g. the value eval --tune-tau chose) "
                                  "\\[default: the run's --tau, else 0].")
    probs: Path | None = opt(None, "Also write per-class probabilities (Parquet: id, probs).",
                             parse=output_location)
    force: bool = opt(False, _FORCE_HELP, negatable=False)


@dataclass
class LRFindConfig:
    """The range test of `imattrain lr-find` (its other flags are run's: a TrainConfig)."""

    start_lr: float = opt(1e-7, "First learning rate.", group="range")
    end_lr: float = opt(10.0, "Last learning rate.", group="range")
    steps: int = opt(100, "Optimiser steps (exponential lr growth).", group="range")
    plot: Path | None = opt(None, "PNG to write (default: <out>/lr_find.png, or "
                                  "runs/lr-find-<model>-<time>/lr_find.png).",
                            group="range", parse=output_location)
    force: bool = opt(False, "Replace an existing --plot (and its .json curve).", group="range",
                      negatable=False)


AUDIT_METHODS = ("cl", "self-confidence", "margin")


@dataclass
class AuditConfig:
    """`imattrain audit`'s own options (its other flags are run's: a TrainConfig, whose --out
    is the audit folder and whose --tree also gives suspects their tree distance)."""

    folds: int = opt(5, "Folds of train: each is predicted by a model trained on the others "
                        "(stratified by class, seeded by --seed).", group="audit")
    method: str = opt("cl", "Which rows are flagged and how they rank: cl (confident "
                            "learning's per-class thresholds estimate how many of each class "
                            "are wrong, ranked by 1 - p(given)), self-confidence (score "
                            "1 - p(given)) or margin (score p(suggested) - p(given)); the last "
                            "two flag every row another class wins.",
                      choices=AUDIT_METHODS, group="audit")
    probs: Path | None = opt(None, "Audit the out-of-fold probabilities of an earlier audit "
                                   "(its oof_probs.parquet) instead of training.",
                             parse=Path, group="audit")
    sheet: int = opt(48, "Top suspects drawn on the contact sheet suspects.png (0: none).",
                     group="audit")
    force: bool = opt(False, "Replace the audit files (suspects.parquet, suspects.png) an "
                             "earlier audit left in --out.", group="audit", negatable=False)

    def validate(self) -> AuditConfig:
        if self.folds < 2:
            raise UserError(f"--folds must be at least 2 (got {self.folds})")
        if self.method not in AUDIT_METHODS:
            raise UserError(f"--method must be one of {', '.join(AUDIT_METHODS)} "
                            f"(got {self.method!r})")
        if self.sheet < 0:
            raise UserError(f"--sheet must not be negative (got {self.sheet})")
        return self
