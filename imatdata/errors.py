"""Errors a user can cause, and the one place they become a message and an exit code.

Both CLIs (imatdata and imattrain) wrap their commands in `user_errors`: a UserError is one
line on stderr and exit code 2, never a traceback; Ctrl-C is exit 130 with a hint.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A problem with the user's input or environment, worded as a sentence that says what to do."""

    exit_code = 2


@contextmanager
def user_errors(prog: str, interrupted_hint: str) -> Iterator[None]:
    import typer  # the CLIs' dependency; the library itself never needs it

    try:
        yield
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted_hint}", file=sys.stderr)
        raise typer.Exit(130) from None
