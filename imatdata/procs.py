"""Worker processes: how many to start, and starting them safely.

Fetch's image workers and event loops, clean's hashing pool and the trainer's CPU threads
all size themselves from `available_cpus()`, and every pool is started inside
`safe_path_children()`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def available_cpus() -> int:
    """The cores this process may run on: CPU affinity where the OS has it (taskset and
    container CPU sets limit it), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def safe_path_children() -> Iterator[None]:
    """Python processes started inside this block do not put the current directory on their
    sys.path (PYTHONSAFEPATH=1, as `-P`). For multiprocessing's spawn and forkserver starts,
    which run `python -c ...` and would otherwise import a `struct.py` lying in the current
    directory before the child is even set up. (A spawned child then takes its parent's
    sys.path, which holds the current directory only if the parent was started with
    `python -m` from there.)"""
    before = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONSAFEPATH", None)
        else:
            os.environ["PYTHONSAFEPATH"] = before
