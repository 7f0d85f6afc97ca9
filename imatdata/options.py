"""Config dataclasses that generate their command-line flags.

A field declared with `opt(default, help)` is a flag `--field-name`; a field without `help`
is an internal knob (tests shrink it, users never see it). The flag's default is the
field's, shown in `--help` and never written a second time: every generated option defaults
to None, and only the flags a user typed are passed on, so the dataclass fills in the rest.
`imatdata` (fetch, clean, stats) and `imattrain` (run, lr-find) build their commands this way.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import Field, field, fields
from typing import Any, Optional

from imatdata.errors import UserError

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
        group: str | None = None, parse: Callable[[str], Any] | None = None,
        metavar: str | None = None, flag: str | None = None, negatable: bool = True) -> Any:
    """A dataclass field that is also a flag. `parse` reads the flag's text (e.g. '20MiB')
    when the field's own type cannot; `group` names its panel in --help; `flag` is the flag's
    name when it is not the field's (a repeatable `--allow-net` filling `allow_nets`). A bool
    is `--x/--no-x` unless `negatable` is false: then it is a plain switch (`--force`)."""
    meta = {"help": help, "choices": choices, "group": group, "parse": parse, "metavar": metavar,
            "flag": flag, "negatable": negatable}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(field_name: str) -> str:
    return field_name.replace("_", "-")


def field_flag(f: Field[Any]) -> str:
    """The flag of a field, without its dashes."""
    return f.metadata.get("flag") or flag_name(f.name)


def option_fields(cls: type) -> list[Field[Any]]:
    """The fields of `cls` that are flags, in declaration order."""
    return [f for f in fields(cls) if "help" in f.metadata]


def field_kind(cls: type, f: Field[Any]) -> tuple[type, bool]:
    """(base type, optional?) of a field: int, float, str, bool or tuple (of str)."""
    tp = typing.get_type_hints(cls)[f.name]
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    origin = typing.get_origin(tp)
    return (tuple if origin in (tuple, list) else tp), optional


def parse_value(cls: type, name: str, raw: Any, *, source: str = "flag") -> Any:
    """A flag's text (or a TOML value) as the field's type, with a one-line error."""
    f = {f.name: f for f in fields(cls)}[name]
    tp, optional = field_kind(cls, f)
    where = f"--{field_flag(f)}" if source == "flag" else f"{source}: {name}"
    if raw is None or (optional and isinstance(raw, str) and raw.strip().lower() in ("", "none")):
        if optional:
            return None
        raise UserError(f"{where} needs a value")
    parse = f.metadata.get("parse")
    if parse is not None and isinstance(raw, str):
        return parse(raw)
    if tp is tuple:
        return tuple(str(v) for v in (raw if isinstance(raw, (list, tuple)) else [raw]))
    try:
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw) if not isinstance(raw, str) else int(raw.strip())
        if tp is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
            return value
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise ValueError
        return str(raw)
    except (TypeError, ValueError):
        raise UserError(f"{where} must be {_KINDS.get(tp, 'a value')} (got {raw!r})") from None


def parse_given(cls: type, given: Mapping[str, Any]) -> dict[str, Any]:
    """The flags a user typed (not None), parsed for `cls`'s fields; others are skipped."""
    names = {f.name for f in option_fields(cls)}
    return {name: parse_value(cls, name, raw) for name, raw in given.items()
            if name in names and raw is not None}


def typer_parameters(cls: type, panels: Mapping[str | None, str] | None = None,
                     skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One keyword-only typer option per flag field of `cls` (default None: "not typed")."""
    import typer  # here, not at the top: config modules import this one in worker processes

    params = []
    for f in option_fields(cls):
        if f.name in skip:
            continue
        tp, _optional = field_kind(cls, f)
        name = field_flag(f)
        help_text = f.metadata["help"]
        choices = f.metadata.get("choices")
        if choices:
            help_text += f" One of: {', '.join(choices)}."
        panel = (panels or {}).get(f.metadata.get("group"))
        default = f.default if f.default is not dataclasses.MISSING else None
        if tp is bool and not f.metadata.get("negatable", True):
            option = typer.Option(None, f"--{name}", show_default=False, help=help_text,
                                  rich_help_panel=panel)
            annotation: Any = Optional[bool]
        elif tp is bool:
            option = typer.Option(None, f"--{name}/--no-{name}", show_default=False,
                                  help=f"{help_text} \\[default: {'on' if default else 'off'}]",
                                  rich_help_panel=panel)
            annotation = Optional[bool]
        elif tp is tuple:
            option = typer.Option(None, f"--{name}", show_default=False, help=help_text,
                                  rich_help_panel=panel)
            annotation = Optional[list[str]]
        else:
            # None and empty defaults are explained in the help sentence itself.
            suffix = "" if default in (None, "", ()) else f" \\[default: {_shown(f, default)}]"
            metavar = f.metadata.get("metavar") or {int: "INT", float: "FLOAT", str: "TEXT"}.get(tp, "TEXT")
            if choices:
                metavar = "|".join(choices).upper() if len(choices) <= 4 else "CHOICE"
            option = typer.Option(None, f"--{name}", metavar=metavar, show_default=False,
                                  help=help_text + suffix, rich_help_panel=panel)
            annotation = Optional[str]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=annotation, default=option))
    return params


def _shown(f: Field[Any], value: Any) -> str:
    """A default as the user would type it (sizes in MiB rather than bytes)."""
    parse = f.metadata.get("parse")
    if parse is not None and isinstance(value, int) and value % (1024 * 1024) == 0:
        return f"{value // (1024 * 1024)}MiB"
    return str(value)


def command(fn: Callable[..., Any], params: list[inspect.Parameter], doc: str) -> Callable[..., Any]:
    """`fn(**kwargs)` with the signature typer reads: the given parameters."""
    def wrapper(**kwargs: Any) -> Any:
        return fn(**kwargs)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    wrapper.__doc__ = doc
    wrapper.__name__ = fn.__name__
    return wrapper
