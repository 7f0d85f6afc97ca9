"""Package names imported on first use (PEP 562), so that a light import stays light.

The CLI imports `imatdata.fetch.config`, `imatdata.clean.config` and `imatdata.stats.config`
on every start for their flags, and image workers import `imatdata.fetch.images`; each runs
its package's `__init__`, which must not pull in aiohttp, pyarrow, numpy or PIL for them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def exports(namespace: dict[str, Any], table: Mapping[str, str]
            ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for a package whose `table` maps each public name to
    "module:attribute" (or "module", the module itself). A name is imported on first use and
    then bound in `namespace`, so it is found directly from then on (and a caller may
    replace it there, as a test does to fail a write)."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, _, attr = target.partition(":")
        value = importlib.import_module(module_name)
        if attr:
            value = getattr(value, attr)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *table})

    return __getattr__, __dir__
