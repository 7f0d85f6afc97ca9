"""`imatdata`: the thin command-line layer. Parses flags, calls the library, renders with rich.

This is the only place that maps errors to exit codes and messages: a UserError becomes one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer

from imatdata.errors import UserError

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


@contextmanager
def user_errors(prog: str = "imatdata") -> Iterator[None]:
    """One line on stderr and exit 2 for errors the user can fix; 130 on Ctrl-C."""
    try:
        yield
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        raise typer.Exit(130) from None


def run_command(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with user_errors():
        return fn(*args, **kwargs)


# Commands are registered by their modules' CLI sections below; each keeps its own flags.
# fetch --------------------------------------------------------------------------------------
# clean --------------------------------------------------------------------------------------
# stats --------------------------------------------------------------------------------------


@app.command()
def stats(
    root: str = typer.Option(None, "--root", help="Manifest root (default: $IMAT_ROOT, else ./manifests)."),
    stage: str = typer.Option(None, "--stage", help="raw or clean (default: clean when clean/ has shards, else raw)."),
    tree: str = typer.Option(None, "--tree", help="Product tree JSON (level1 → level2 → level3 → class ids) "
                             "for per-level figures; 'packaged' uses the tree shipped with imatdata."),
    as_json: bool = typer.Option(False, "--json", help="Print stats.json to stdout instead of tables."),
    min_count: int = typer.Option(20, "--min-count", help="Classes with fewer usable images are counted as rare."),
    top: int = typer.Option(10, "--top", help="How many most and least frequent classes to list."),
    top_hosts: int = typer.Option(20, "--top-hosts", help="How many hosts to list, worst failure rate first."),
    host_min_records: int = typer.Option(1, "--host-min-records",
                                         help="Rank only hosts with at least this many rows."),
) -> None:
    """Describe a manifest root: per split, per class, per tree level and per host; writes stats/."""
    from pathlib import Path

    from imatdata.manifest import resolve_root

    def _run() -> None:
        from imatdata import stats as stats_mod

        options = stats_mod.StatsOptions(min_count=min_count, top=top, top_hosts=top_hosts,
                                         host_min_records=host_min_records)
        data = stats_mod.write_stats(resolve_root(root), stage, Path(tree) if tree else None,
                                     quiet=as_json, options=options)
        if as_json:
            sys.stdout.write(stats_mod.dumps(data))

    run_command(_run)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
