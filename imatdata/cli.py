"""`imatdata`: the thin command-line layer. Parses flags, calls the library, renders with rich.

This is the only place that maps errors to exit codes and messages: a UserError becomes one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Optional

import typer

# The config modules are light (no aiohttp, Pillow, pyarrow or numpy): `imatdata --help`
# builds every command's flags from them without loading the pipeline.
from imatdata.clean.config import CleanConfig
from imatdata.errors import user_errors as _user_errors
from imatdata.fetch.config import FetchOptions, NetConfig
from imatdata.options import command, parse_given, typer_parameters
from imatdata.stats.config import StatsOptions

app = typer.Typer(
    name="imatdata",
    help="Download, clean and describe image datasets given as URL lists (iMaterialist format).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _group() -> None:
    # An explicit callback keeps `imatdata <command>` a command group even while only one
    # command is registered (Typer would otherwise run that command without its name).
    pass


# What Ctrl-C leaves behind, per command: fetch resumes where it stopped; clean and stats
# start over (clean/ and stats/ files are only ever replaced whole, so nothing is half-done).
RESUME_HINT = "rerun the same command to resume"
CLEAN_HINT = "clean/ is only ever replaced by a complete result; run clean again to start over"
STATS_HINT = "stats/ files are only ever replaced whole; run stats again"


def user_errors(interrupted_hint: str = RESUME_HINT) -> AbstractContextManager[None]:
    return _user_errors("imatdata", interrupted_hint)


def run_command(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with user_errors():
        return fn(*args, **kwargs)


# Every command's flags come from its config dataclasses (`opt()` fields) through
# `imatdata.options`: the name, help and default are written once, on the field. Typed flags
# arrive as text (None: not typed) and are parsed inside `user_errors`, so a bad value is one
# line and exit 2. Only what no config holds is written here: the sources, --root, and how a
# command shows its result.


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=default)


def _root_param() -> inspect.Parameter:
    return _param("root", Optional[str], typer.Option(
        None, "--root", help="Manifest root (default: $IMAT_ROOT, else ./manifests)."))


# fetch --------------------------------------------------------------------------------------


def fetch_command(*, sources: list[str], root: str | None, **given: Any) -> None:
    def _run() -> None:
        from rich.console import Console

        from imatdata import fetch as fetch_mod

        net = NetConfig(**parse_given(NetConfig, given))
        opts = FetchOptions(sources=sources, root=root, net=net, **parse_given(FetchOptions, given))
        summary = fetch_mod.run_fetch(opts)
        if not opts.quiet:
            fetch_mod.render_summary(summary, Console())

    run_command(_run)


_FETCH_PARAMS = typer_parameters(FetchOptions)
app.command("fetch")(command(fetch_command, [
    _param("sources", list[str], typer.Argument(
        ..., help="URL lists: iMaterialist .json, .jsonl, .csv or .parquet (columns id,url[,class]); "
                  "the split is the file's stem.")),
    _root_param(),
    # Where the rows go, then the network, then the rest of the run (as SPEC.md lists them).
    *[p for p in _FETCH_PARAMS if p.name == "split"],
    *typer_parameters(NetConfig),
    *[p for p in _FETCH_PARAMS if p.name != "split"],
], "Download URL lists into raw Parquet shards (<root>/raw/<split>/), one row per record, resumable."))


# clean --------------------------------------------------------------------------------------


def clean_command(*, root: str | None, quiet: bool, **given: Any) -> None:
    def _run() -> None:
        from rich.console import Console

        from imatdata import clean as clean_mod
        from imatdata.manifest import resolve_root

        config = CleanConfig(**parse_given(CleanConfig, given))
        where = resolve_root(root)  # before the progress bar: a bad root is one line and nothing else
        if quiet:
            clean_mod.clean(where, config)
            return
        console = Console()
        with clean_mod.RichProgress(console) as progress:
            result = clean_mod.clean(where, config, progress=progress)
        clean_mod.render_report(result, console)

    with user_errors(CLEAN_HINT):
        _run()


app.command("clean")(command(clean_command, [
    _root_param(),
    *typer_parameters(CleanConfig),
    # How clean shows its progress, not one of its knobs: not a CleanConfig field.
    _param("quiet", bool, typer.Option(False, "--quiet", help="No progress bar and no table.")),
], "Drop broken, undersized, duplicate, placeholder and leaked images: raw/ -> clean/ + dropped.parquet."))


# stats --------------------------------------------------------------------------------------


def stats_command(*, root: str | None, stage: str | None, tree: str | None, as_json: bool,
                  **given: Any) -> None:
    from pathlib import Path

    from imatdata.manifest import resolve_root

    def _run() -> None:
        from imatdata import stats as stats_mod

        options = StatsOptions(**parse_given(StatsOptions, given))
        data = stats_mod.write_stats(resolve_root(root), stage, Path(tree) if tree else None,
                                     quiet=as_json, options=options)
        if as_json:
            sys.stdout.write(stats_mod.dumps(data))

    with user_errors(STATS_HINT):
        _run()


app.command("stats")(command(stats_command, [
    _root_param(),
    _param("stage", Optional[str], typer.Option(
        None, "--stage", help="raw or clean (default: clean when clean/ has shards, else raw).")),
    _param("tree", Optional[str], typer.Option(
        None, "--tree", help="Product tree JSON (level1 → level2 → level3 → class ids) for per-level "
                             "figures; 'packaged' uses the tree shipped with imatdata.")),
    _param("as_json", bool, typer.Option(False, "--json", help="Print stats.json to stdout instead of tables.")),
    *typer_parameters(StatsOptions),
], "Describe a manifest root: per split, per class, per tree level and per host; writes stats/."))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
