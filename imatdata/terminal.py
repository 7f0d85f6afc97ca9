"""What every command draws on a terminal: progress bars and tables, on stderr.

stdout stays free for `--json` and scripts. Rich is imported only when something is drawn
(its import costs ~0.1 s), so library callers that pass `enabled=False` never pay for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def console(stderr: bool = True) -> Any:
    """A rich console (stderr unless told otherwise)."""
    from rich.console import Console

    return Console(stderr=stderr)


class Bars:
    """Named progress bars in one live display: `update(name, completed=, total=, **fields)`
    adds a bar the first time a name is seen.

    Each bar shows its name, the bar, done/total, then one column per `fields` template (e.g.
    "[green]ok {task.fields[ok]}", whose initial values come from `initial`), the time taken
    and the time left. A no-op when `enabled` is false, or when `terminal_only` and stderr is
    not a terminal (logs and pipes get the commands' one-line summaries only). `transient`
    bars vanish when done.
    """

    def __init__(self, *, enabled: bool = True, fields: Sequence[str] = (),
                 initial: Mapping[str, Any] | None = None, transient: bool = False,
                 terminal_only: bool = False, out: Any = None) -> None:
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._initial = dict(initial or {})
        if not enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        out = out if out is not None else console()
        if terminal_only and not out.is_terminal:
            return
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  *(TextColumn(f) for f in fields), TimeElapsedColumn(),
                                  TextColumn("ETA"), TimeRemainingColumn(), console=out, transient=transient,
                                  refresh_per_second=4)

    def __enter__(self) -> Bars:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def update(self, name: str, *, completed: int | None = None, total: int | None = None,
               advance: int | None = None, **fields: Any) -> None:
        if self._progress is None:
            return
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(name, total=total, completed=completed or 0,
                                                        **{**self._initial, **fields})
            return
        self._progress.update(self._tasks[name], completed=completed, total=total, advance=advance, **fields)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any] | None], *,
          left: int = 1, caption: str | None = None) -> Any:
    """A rich table: the first `left` columns flush left (names), the rest right (figures).
    Cells are printed with str(); format numbers before passing them. A row of None ends a
    section (a rule under it). Text is literal: square brackets in a path or a class name
    are not markup."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(title), title_justify="left",
              caption=None if caption is None else escape(caption), caption_justify="left")
    for i, name in enumerate(columns):
        t.add_column(name, justify="left" if i < left else "right")
    for row in rows:
        if row is None:
            t.add_section()
        else:
            t.add_row(*(escape(str(c)) for c in row))
    return t
