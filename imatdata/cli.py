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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
