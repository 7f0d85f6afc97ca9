"""`imattrain`: the thin command-line layer over the trainer.

Parses flags, calls the library, and is the only place that maps errors to exit codes: a
UserError becomes one line on stderr and exit code 2, never a traceback. (imattrain keeps its
own small `user_errors` rather than importing imatdata's CLI.)
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer

from imatdata.errors import UserError
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


@contextmanager
def user_errors(prog: str = "imattrain") -> Iterator[None]:
    """One line on stderr and exit 2 for errors the user can fix; 130 on Ctrl-C."""
    try:
        yield
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun with --resume to continue", file=sys.stderr)
        raise typer.Exit(130) from None


def run_command(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with user_errors():
        return fn(*args, **kwargs)


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
