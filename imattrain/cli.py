"""`imattrain`: the thin command-line layer over the trainer.

Parses flags, calls the library, and is the only place that maps errors to exit codes: a
UserError becomes one line on stderr and exit code 2, never a traceback (through
`imatdata.errors.user_errors`, shared with imatdata's CLI). Every command's flags are
generated from its config dataclass (`imattrain.config`) by `imatdata.options`; only the
checkpoint list, predict's required --out, --json and --config are written here.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from imatdata.errors import UserError
from imatdata.errors import user_errors as _user_errors
from imatdata.options import command, opt, parse_given, typer_parameters
from imattrain.config import (
    AuditConfig,
    EvalConfig,
    LRFindConfig,
    PredictConfig,
    TrainConfig,
    build_config,
    load_toml,
)

app = typer.Typer(
    name="imattrain",
    help="Train, evaluate and predict image classifiers from imatdata's clean Parquet shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _group() -> None:
    """Train, evaluate and predict image classifiers from imatdata's clean Parquet shards."""


def user_errors() -> AbstractContextManager[None]:
    return _user_errors("imattrain", "rerun with --resume to continue")


# --- flags -------------------------------------------------------------------------------------

_PANELS = {
    "data": "Data and output", "model": "Model", "augment": "Augmentation",
    "optim": "Optimisation", "imbalance": "Imbalance and hierarchy", "run": "Run control",
    "general": "Options",
}
_INFER_PANELS = {"infer": "Inference"}
_RANGE_PANELS = {"range": "Range test"}


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=default)


# --- run ---------------------------------------------------------------------------------------

_RUN_FLAGS = [
    _param("config", Optional[Path],
           typer.Option(None, "--config", help="TOML file of config keys (flags win).",
                        rich_help_panel=_PANELS["data"])),
    *typer_parameters(TrainConfig, _PANELS),
]


def _train_config(config: Path | None, given: Mapping[str, Any]) -> TrainConfig:
    """Defaults, then the --config file, then the flags typed (None: not typed)."""
    file_values = load_toml(config) if config is not None else {}
    return build_config(file_values, parse_given(TrainConfig, given))


def run_command(*, config: Path | None, **given: Any) -> None:
    with user_errors():
        cfg = _train_config(config, given)
        from imattrain.engine import train  # torch is imported only when a run starts

        train(cfg)


app.command("run")(command(
    run_command, _RUN_FLAGS,
    "Train a classifier on the clean shards (every config key is a flag; --config reads them "
    "from TOML, flags win)."))


# --- eval / predict / lr-find (tricks) ---------------------------------------------------------


@dataclass
class Inputs:
    """Where eval and predict read, besides `--checkpoint`: SGDR snapshots and the shards."""

    snapshots: str | None = opt(None, "Ensemble every SGDR snapshot of this run folder.", parse=str)
    data: str | None = opt(None, "Folder of clean shards (default: <root>/clean).")
    root: str | None = opt(None, "Manifest root used to find --data (default: $IMAT_ROOT or "
                                 "./manifests).")


# A list option with an argument for the rest: no config field says that.
_CHECKPOINT_FLAGS = [
    _param("checkpoint", Optional[list[str]],  # str: a Path would turn s3://b/k into s3:/b/k
           typer.Option(None, "--checkpoint", "-c", show_default=False,
                        help="Checkpoint file(s) or run folder(s) (a run folder means its "
                             "best.pt, else last.pt); several are ensembled by averaging "
                             "probabilities. `--checkpoint A B` or repeat the flag.")),
    _param("more", Optional[list[str]],
           typer.Argument(None, show_default=False, metavar="CKPT",
                          help="More checkpoints (what follows --checkpoint A).")),
]


def _json_flag(help: str) -> inspect.Parameter:
    # How the result is shown, not an option of the library call: not a config field.
    return _param("json_output", bool, typer.Option(False, "--json", help=help))


def _checkpoint_list(checkpoint: Optional[list[Path]], more: Optional[list[Path]],
                     snapshots: Optional[Path]) -> list[Path]:
    """`--checkpoint A B C` (click hands B and C over as arguments), repeated `--checkpoint`,
    and `--snapshots RUN_DIR`, in that order."""
    paths = list(checkpoint or []) + list(more or [])
    if snapshots is not None:
        from imattrain.predict import snapshot_paths

        paths += snapshot_paths(snapshots)
    if not paths:
        raise UserError("give at least one --checkpoint CKPT (several are ensembled) or "
                        "--snapshots RUN_DIR")
    return paths


def _inputs(checkpoint: Optional[list[Path]], more: Optional[list[Path]],
            given: Mapping[str, Any]) -> tuple[list[Path], Path]:
    """The checkpoints and the data folder of eval and predict."""
    from imattrain.setup import resolve_data_dir

    inputs = Inputs(**parse_given(Inputs, given))
    return (_checkpoint_list(checkpoint, more, inputs.snapshots),
            resolve_data_dir(inputs.data, inputs.root))


def eval_command(*, checkpoint: Optional[list[Path]], more: Optional[list[Path]],
                 json_output: bool, **given: Any) -> None:
    with user_errors():
        from imattrain.predict import evaluate_checkpoints

        cfg = EvalConfig(**parse_given(EvalConfig, given))
        paths, data_dir = _inputs(checkpoint, more, given)
        report = evaluate_checkpoints(paths, data_dir, cfg)
        _say_checkpoints(report.notes)
        if json_output:
            print(report.to_json(cfg.worst))
        else:
            _print_eval(report, cfg.worst, cfg.out)


app.command("eval")(command(
    eval_command,
    [*_CHECKPOINT_FLAGS, *typer_parameters(Inputs, {}), *typer_parameters(EvalConfig, _INFER_PANELS),
     _json_flag("Print the report as JSON on stdout.")],
    "Top-1/3/5, per-class and balanced accuracy of one checkpoint or an ensemble."))


def _say_checkpoints(notes: list[str]) -> None:
    """Which weights were used and why, one line per checkpoint, on stderr (stdout carries
    the report or the JSON)."""
    for note in notes:
        print(note, file=sys.stderr)


def _print_eval(report: Any, worst: int, out: Optional[Path]) -> None:
    from imatdata.terminal import console, table

    m = report.metrics
    show = console(stderr=False)  # the report is the command's output, on stdout as --json's
    names = ", ".join(Path(p).name for p in report.checkpoints)
    title = (f"{report.split}: {m.n} images, {len(report.checkpoints)} checkpoint(s) ({names}), "
             f"tta {report.tta}")

    def row(label: str, x: Any) -> list[str]:
        return [label, f"{x.top1:.4f}", f"{x.top3:.4f}", f"{x.top5:.4f}", f"{x.top3_error:.4f}",
                f"{x.balanced_accuracy:.4f}", f"{x.balanced_top3:.4f}"]

    rows = [row("tau 0", report.unadjusted)] if report.unadjusted is not None else []
    rows.append(row(f"tau {report.tau:g}", m))
    show.print(table(title, ("", "top-1", "top-3", "top-5", "top-3 error", "balanced top-1",
                             "balanced top-3"), rows))
    if report.tau_search is not None:
        show.print(f"chosen tau = {report.tau:g} (lowest val top-3 error over "
                   f"{len(report.tau_search)} values); predict with --tau {report.tau:g}")
    show.print(table(f"worst {min(worst, len(m.per_class))} of {len(m.per_class)} classes (by top-3)",
                     ("class", "images", "top-1", "top-3"),
                     [(c.label, c.count, f"{c.top1:.3f}", f"{c.top3:.3f}") for c in m.worst(worst)],
                     left=0))
    if out is not None:
        show.print(f"report: {out}")


def predict_command(*, checkpoint: Optional[list[Path]], more: Optional[list[Path]], out: Path,
                    json_output: bool, **given: Any) -> None:
    with user_errors():
        import json

        from imattrain.predict import predict_submission

        cfg = PredictConfig(**parse_given(PredictConfig, given))
        paths, data_dir = _inputs(checkpoint, more, given)
        report = predict_submission(paths, data_dir, out, cfg)
        _say_checkpoints(report.notes)
        if json_output:
            print(json.dumps(report.__dict__, indent=2))
        else:
            extra = f"; probabilities: {report.probs}" if report.probs else ""
            print(f"wrote {report.out}: {report.rows} rows ({report.with_image} predicted from images, "
                  f"{report.from_prior} without an image answered with the class prior){extra}",
                  file=sys.stderr)


app.command("predict")(command(
    predict_command,
    [*_CHECKPOINT_FLAGS,
     # Required, which a config field (every flag defaults to "not typed") cannot say.
     _param("out", str, typer.Option(..., "--out", help="Submission CSV to write (id,predicted).")),
     *typer_parameters(Inputs, {}), *typer_parameters(PredictConfig, _INFER_PANELS),
     _json_flag("Print a JSON summary on stdout.")],
    "Write the competition file: id,predicted with three labels per row, best first."))


def lr_find_command(*, config: Path | None, **given: Any) -> None:
    with user_errors():
        cfg = _train_config(config, given)
        test = LRFindConfig(**parse_given(LRFindConfig, given))
        from imattrain.lrfind import run_lr_find

        if test.plot is not None:
            from imattrain.predict import check_outputs
            from imattrain.setup import resolve_data_dir

            inputs = [Path(f) for f in (config, cfg.pretrained, cfg.tree) if f and f != "torchvision"]
            check_outputs({"--plot": test.plot, "--plot's curve": test.plot.with_suffix(".json")},
                          inputs, resolve_data_dir(cfg.data, cfg.root), test.force)

        say = (lambda msg: None) if cfg.quiet else (lambda msg: print(msg, file=sys.stderr))
        result, path = run_lr_find(cfg, test, say=say)
        stop = (f"stopped at lr {result.lrs[-1]:.2e} (loss diverged)" if result.diverged
                else f"ran all {len(result.lrs)} steps")
        steep = f"{result.steepest_lr:.2e}" if result.steepest_lr else "n/a"
        low = f"{result.min_lr:.2e}" if result.min_lr else "n/a"
        print(f"lr-find: {stop}; steepest descent at {steep}, minimum loss at {low}", file=sys.stderr)
        print(f"plot: {path} (curve: {path.with_suffix('.json')})", file=sys.stderr)
        if result.suggested_lr is None:
            raise UserError("lr-find recorded no finite loss; lower --start-lr or check the data")
        # The suggestion alone on stdout, so scripts can capture it.
        print(f"suggested lr: {result.suggested_lr:.3g} ({result.rule})")


# run's options (same data/model/optimiser flags) plus the range-test ones.
app.command("lr-find")(command(
    lr_find_command, [*_RUN_FLAGS, *typer_parameters(LRFindConfig, _RANGE_PANELS)],
    "Learning-rate range test on the real data and model (takes run's flags): exponential lr "
    "sweep, smoothed loss, plot and a suggested rate."))


# --- audit -------------------------------------------------------------------------------------


def audit_command(*, config: Path | None, **given: Any) -> None:
    with user_errors():
        cfg = _train_config(config, given)
        acfg = AuditConfig(**parse_given(AuditConfig, given)).validate()
        from imattrain.audit import run_audit

        say = (lambda msg: None) if cfg.quiet else (lambda msg: print(msg, file=sys.stderr))
        result = run_audit(cfg, acfg, say=say)
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        share = result.flagged / result.audited if result.audited else 0.0
        sheet = f", contact sheet {result.sheet}" if result.sheet else ""
        print(f"audit ({result.method}): {result.flagged} of {result.audited} train images "
              f"flagged ({100 * share:.1f}%): {result.suspects}{sheet}; out-of-fold "
              f"probabilities {result.oof}", file=sys.stderr)
        # The suspects file alone on stdout, so scripts can capture it.
        print(result.suspects)


# run's options (same data/model/recipe flags; --out is the audit folder) plus the audit's.
app.command("audit")(command(
    audit_command, [*_RUN_FLAGS, *typer_parameters(AuditConfig, {"audit": "Audit"})],
    "Find mislabelled training images: K models on K folds of train (run's flags), "
    "out-of-fold probabilities ranked by how likely each given label is wrong; writes "
    "suspects.parquet and a contact sheet (--probs FILE ranks earlier probabilities)."))


def main() -> None:
    # OpenMP's idle threads sleep rather than spin (OMP_WAIT_POLICY=PASSIVE unless the user
    # set it): done by the package's __init__, which runs before this module and torch load.
    app()


if __name__ == "__main__":
    main()
