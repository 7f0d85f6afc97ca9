"""`imattrain`: the thin command-line layer over the trainer.

Parses flags, calls the library, and is the only place that maps errors to exit codes: a
UserError becomes one line on stderr and exit code 2, never a traceback (through
`imatdata.errors.user_errors`, shared with imatdata's CLI).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Optional

import typer

from imatdata.errors import UserError
from imatdata.errors import user_errors as _user_errors
from imattrain.config import (
    build_config,
    config_fields,
    field_kind,
    flag_name,
    load_toml,
    parse_value,
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


# --- run ---------------------------------------------------------------------------------------

_PANELS = {
    "data": "Data and output", "model": "Model", "augment": "Augmentation",
    "optim": "Optimisation", "imbalance": "Imbalance and hierarchy", "run": "Run control",
    "general": "Options",
}


def _run_impl(config: Optional[Path] = None, **given: Any) -> None:
    with user_errors():
        file_values = load_toml(config) if config is not None else {}
        flag_values = {name: parse_value(name, raw, source="flag")
                       for name, raw in given.items() if raw is not None}
        cfg = build_config(file_values, flag_values)
        from imattrain.engine import train  # torch is imported only when a run starts

        train(cfg)


def _build_run_command() -> Callable[..., None]:
    """A function whose signature has one option per TrainConfig field.

    Generated so that a new config key is a flag at once. Every option defaults to None so
    that "not given" is visible and flags override the TOML file only where typed.
    """
    params = [inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
        default=typer.Option(None, "--config", help="TOML file of config keys (flags win).",
                             rich_help_panel=_PANELS["data"]))]
    for f in config_fields():
        tp, _optional = field_kind(f)
        name = flag_name(f.name)
        help_text = f.metadata["help"]
        choices = f.metadata.get("choices")
        if choices:
            help_text += f" One of: {', '.join(choices)}."
        panel = _PANELS[f.metadata.get("group", "general")]
        if tp is bool:
            default_word = "on" if f.default else "off"
            option = typer.Option(None, f"--{name}/--no-{name}", show_default=False,
                                  help=f"{help_text} \\[default: {default_word}]",
                                  rich_help_panel=panel)
            annotation: Any = Optional[bool]
        else:
            # None defaults are explained in the help sentence itself.
            suffix = "" if f.default is None else f" \\[default: {f.default}]"
            metavar = {int: "INT", float: "FLOAT", str: "TEXT"}[tp]
            if choices:
                metavar = "|".join(choices).upper() if len(choices) <= 4 else "CHOICE"
            option = typer.Option(None, f"--{name}", metavar=metavar, show_default=False,
                                  help=help_text + suffix,
                                  rich_help_panel=panel)
            annotation = Optional[str]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=annotation, default=option))

    def run(**kwargs: Any) -> None:
        config = kwargs.pop("config", None)
        _run_impl(config, **kwargs)

    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.__doc__ = ("Train a classifier on the clean shards (every config key is a flag; "
                   "--config reads them from TOML, flags win).")
    return run


app.command("run", help=_build_run_command().__doc__)(_build_run_command())


# --- eval / predict / lr-find (tricks) ---------------------------------------------------------

_INFER_PANEL = "Inference"


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


def _data_dir(data: Optional[str], root: Optional[str]) -> Path:
    from imatdata.manifest import resolve_root

    return Path(data) if data else resolve_root(root, writable=False) / "clean"


def _tau_grid(text: Optional[str]) -> tuple[float, ...]:
    from imattrain.predict import DEFAULT_TAU_GRID

    if not text:
        return DEFAULT_TAU_GRID
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UserError(f"--tau-grid must be comma-separated numbers, e.g. 0,0.5,1 (got {text!r})") from None


_CHECKPOINT_OPT = typer.Option(None, "--checkpoint", "-c", show_default=False,
                               help="Checkpoint file(s); several are ensembled by averaging "
                                    "probabilities. `--checkpoint A B` or repeat the flag.")
_MORE_ARG = typer.Argument(None, show_default=False, metavar="CKPT",
                           help="More checkpoints (what follows --checkpoint A).")
_SNAPSHOTS_OPT = typer.Option(None, "--snapshots", show_default=False,
                              help="Ensemble every SGDR snapshot of this run folder.")
_DATA_OPT = typer.Option(None, "--data", show_default=False,
                         help="Folder of clean shards (default: <root>/clean).")
_ROOT_OPT = typer.Option(None, "--root", show_default=False,
                         help="Manifest root used to find --data (default: $IMAT_ROOT or ./manifests).")
_TTA_OPT = typer.Option("none", "--tta", metavar="none|flip|five-crop",
                        help="Test-time augmentation averaged per image.")
_FORCE_OPT = typer.Option(False, "--force", help="Replace output files that already exist "
                                                 "(never an input: a checkpoint or the data).")


@app.command("eval")
def eval_command(
    checkpoint: Optional[list[Path]] = _CHECKPOINT_OPT,
    more: Optional[list[Path]] = _MORE_ARG,
    snapshots: Optional[Path] = _SNAPSHOTS_OPT,
    data: Optional[str] = _DATA_OPT,
    root: Optional[str] = _ROOT_OPT,
    split: str = typer.Option("val", "--split", help="Labelled split to evaluate."),
    tta: str = _TTA_OPT,
    tau: Optional[float] = typer.Option(None, "--tau", show_default=False,
                                        help="Logit adjustment: log p - tau * log(train prior) "
                                             "\\[default: the run's --tau, else 0]."),
    tune_tau: bool = typer.Option(False, "--tune-tau",
                                  help="Choose tau on this split by top-3 error (grid: --tau-grid)."),
    tau_grid: Optional[str] = typer.Option(None, "--tau-grid", show_default=False,
                                           help="Comma-separated taus for --tune-tau (default 0,0.1,...,2)."),
    worst: int = typer.Option(10, "--worst", help="How many of the worst classes to list."),
    batch_size: int = typer.Option(128, "--batch-size", help="Images per inference batch.", rich_help_panel=_INFER_PANEL),
    workers: int = typer.Option(2, "--workers", help="Loader worker processes.", rich_help_panel=_INFER_PANEL),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda.", rich_help_panel=_INFER_PANEL),
    amp: str = typer.Option("auto", "--amp", help="auto (bf16 on CUDA), none, bf16, fp16.",
                            rich_help_panel=_INFER_PANEL),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    out: Optional[Path] = typer.Option(None, "--out", show_default=False,
                                       help="Also write the full report (per-class figures included) as JSON."),
    force: bool = _FORCE_OPT,
) -> None:
    """Top-1/3/5, per-class and balanced accuracy of one checkpoint or an ensemble."""
    with user_errors():
        import json

        from imattrain.predict import check_outputs, evaluate_checkpoints

        paths = _checkpoint_list(checkpoint, more, snapshots)
        data_dir = _data_dir(data, root)
        check_outputs({"--out": out}, paths, data_dir, force)
        report = evaluate_checkpoints(paths, data_dir, split=split, tta=tta, tau=tau,
                                      tune=tune_tau, tau_grid=_tau_grid(tau_grid), batch_size=batch_size,
                                      workers=workers, device=device, amp=amp)
        text = json.dumps(report.to_dict(worst), indent=2)
        if out is not None:
            from imatdata.manifest import write_bytes_atomic

            write_bytes_atomic((text + "\n").encode(), out)
        if json_output:
            print(text)
        else:
            _print_eval(report, worst, out)


def _print_eval(report: Any, worst: int, out: Optional[Path]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    m = report.metrics
    console = Console()
    names = ", ".join(Path(p).name for p in report.checkpoints)
    title = escape(f"{report.split}: {m.n} images, {len(report.checkpoints)} checkpoint(s) ({names}), "
                   f"tta {report.tta}")
    table = Table(title=title)
    for col in ("", "top-1", "top-3", "top-5", "top-3 error", "balanced top-1", "balanced top-3"):
        table.add_column(col, justify="right" if col else "left")

    def row(label: str, x: Any) -> None:
        table.add_row(label, f"{x.top1:.4f}", f"{x.top3:.4f}", f"{x.top5:.4f}", f"{x.top3_error:.4f}",
                      f"{x.balanced_accuracy:.4f}", f"{x.balanced_top3:.4f}")

    if report.unadjusted is not None:
        row("tau 0", report.unadjusted)
    row(f"tau {report.tau:g}", m)
    console.print(table)
    if report.tau_search is not None:
        console.print(f"chosen tau = {report.tau:g} (lowest val top-3 error over "
                      f"{len(report.tau_search)} values); predict with --tau {report.tau:g}")
    bad = Table(title=f"worst {min(worst, len(m.per_class))} of {len(m.per_class)} classes (by top-3)")
    for col in ("class", "images", "top-1", "top-3"):
        bad.add_column(col, justify="right")
    for c in m.worst(worst):
        bad.add_row(str(c.label), str(c.count), f"{c.top1:.3f}", f"{c.top3:.3f}")
    console.print(bad)
    if out is not None:
        console.print(f"report: {out}")


@app.command("predict")
def predict_command(
    checkpoint: Optional[list[Path]] = _CHECKPOINT_OPT,
    more: Optional[list[Path]] = _MORE_ARG,
    out: Path = typer.Option(..., "--out", help="Submission CSV to write (id,predicted)."),
    snapshots: Optional[Path] = _SNAPSHOTS_OPT,
    data: Optional[str] = _DATA_OPT,
    root: Optional[str] = _ROOT_OPT,
    split: str = typer.Option("test", "--split", help="Split to predict (every row gets a line)."),
    tta: str = _TTA_OPT,
    tau: Optional[float] = typer.Option(None, "--tau", show_default=False,
                                        help="Logit adjustment (e.g. the value eval --tune-tau chose) "
                                             "\\[default: the run's --tau, else 0]."),
    probs: Optional[Path] = typer.Option(None, "--probs", show_default=False,
                                         help="Also write per-class probabilities (Parquet: id, probs)."),
    batch_size: int = typer.Option(128, "--batch-size", help="Images per inference batch.", rich_help_panel=_INFER_PANEL),
    workers: int = typer.Option(2, "--workers", help="Loader worker processes.", rich_help_panel=_INFER_PANEL),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda.", rich_help_panel=_INFER_PANEL),
    amp: str = typer.Option("auto", "--amp", help="auto (bf16 on CUDA), none, bf16, fp16.",
                            rich_help_panel=_INFER_PANEL),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    force: bool = _FORCE_OPT,
) -> None:
    """Write the competition file: id,predicted with three labels per row, best first."""
    with user_errors():
        import json

        from imattrain.predict import predict_submission

        paths = _checkpoint_list(checkpoint, more, snapshots)
        report = predict_submission(paths, _data_dir(data, root), out, split=split, tta=tta, tau=tau,
                                    probs_out=probs, batch_size=batch_size, workers=workers,
                                    device=device, amp=amp, force=force)
        if json_output:
            print(json.dumps(report.__dict__, indent=2))
        else:
            extra = f"; probabilities: {report.probs}" if report.probs else ""
            print(f"wrote {report.out}: {report.rows} rows ({report.with_image} predicted from images, "
                  f"{report.from_prior} without an image answered with the class prior){extra}",
                  file=sys.stderr)


def _build_lr_find_command() -> Callable[..., None]:
    """`run`'s options (same data/model/optimiser flags) plus the range-test ones."""
    base = [p for p in inspect.signature(_build_run_command()).parameters.values()]
    extra = [
        inspect.Parameter("start_lr", inspect.Parameter.KEYWORD_ONLY, annotation=float,
                          default=typer.Option(1e-7, "--start-lr", help="First learning rate.",
                                               rich_help_panel="Range test")),
        inspect.Parameter("end_lr", inspect.Parameter.KEYWORD_ONLY, annotation=float,
                          default=typer.Option(10.0, "--end-lr", help="Last learning rate.",
                                               rich_help_panel="Range test")),
        inspect.Parameter("steps", inspect.Parameter.KEYWORD_ONLY, annotation=int,
                          default=typer.Option(100, "--steps", help="Optimiser steps (exponential lr growth).",
                                               rich_help_panel="Range test")),
        inspect.Parameter("plot", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--plot", show_default=False,
                                               help="PNG to write (default: <out>/lr_find.png, or "
                                                    "runs/lr-find-<model>-<time>/lr_find.png).",
                                               rich_help_panel="Range test")),
        inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--force", help="Replace an existing --plot "
                                               "(and its .json curve).", rich_help_panel="Range test")),
    ]
    params = base + extra

    def lr_find(**kwargs: Any) -> None:
        config = kwargs.pop("config", None)
        start_lr, end_lr = kwargs.pop("start_lr"), kwargs.pop("end_lr")
        steps, plot, force = kwargs.pop("steps"), kwargs.pop("plot"), kwargs.pop("force")
        with user_errors():
            file_values = load_toml(config) if config is not None else {}
            flag_values = {name: parse_value(name, raw, source="flag")
                           for name, raw in kwargs.items() if raw is not None}
            cfg = build_config(file_values, flag_values)
            from imattrain.lrfind import run_lr_find

            if plot is not None:
                from imattrain.predict import check_outputs
                from imattrain.setup import resolve_data_dir

                inputs = [Path(f) for f in (config, cfg.pretrained, cfg.tree)
                          if f and f != "torchvision"]
                check_outputs({"--plot": plot, "--plot's curve": plot.with_suffix(".json")},
                              inputs, resolve_data_dir(cfg), force)

            say = (lambda msg: None) if cfg.quiet else (lambda msg: print(msg, file=sys.stderr))
            result, path = run_lr_find(cfg, start_lr=start_lr, end_lr=end_lr, steps=steps, plot=plot,
                                       say=say)
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

    lr_find.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    lr_find.__annotations__ = {p.name: p.annotation for p in params}
    lr_find.__doc__ = ("Learning-rate range test on the real data and model (takes run's flags): "
                       "exponential lr sweep, smoothed loss, plot and a suggested rate.")
    return lr_find


app.command("lr-find", help=_build_lr_find_command().__doc__)(_build_lr_find_command())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
