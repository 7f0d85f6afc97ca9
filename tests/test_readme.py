"""Every command the README shows uses a real subcommand and real options of the CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> list[tuple[str, list[str]]]:
    """(tool, argv) for each imatdata/imattrain line inside the README's code blocks."""
    found = []
    text = README.read_text()
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip().lstrip("$ ").strip()
            if not line.startswith(("imatdata", "imattrain", "torchrun")):
                continue
            argv = shlex.split(line)
            # `torchrun ... -m imattrain run ...` counts as imattrain
            if argv[0] == "torchrun" and "-m" in argv:
                i = argv.index("-m")
                argv = argv[i + 1:]
            if argv and argv[0] in ("imatdata", "imattrain"):
                found.append((argv[0], argv[1:]))
    return found


def _app(tool: str):
    if tool == "imatdata":
        from imatdata.cli import app
    else:
        from imattrain.cli import app
    return typer.main.get_command(app)


def test_readme_shows_the_main_commands() -> None:
    tools = {(t, a[0]) for t, a in _commands() if a}
    for expected in [("imatdata", "fetch"), ("imatdata", "clean"), ("imatdata", "stats"),
                     ("imattrain", "run"), ("imattrain", "eval"), ("imattrain", "predict"),
                     ("imattrain", "lr-find")]:
        assert expected in tools, f"README never shows `{' '.join(expected)}`"


@pytest.mark.parametrize("tool,argv", _commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_readme_command_uses_real_options(tool: str, argv: list[str]) -> None:
    group = _app(tool)
    if not argv or argv[0] in ("--help", "-h"):
        return
    command = group.commands.get(argv[0])
    assert command is not None, f"`{tool} {argv[0]}` is not a command"
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    for arg in argv[1:]:
        if arg.startswith("--"):
            name = arg.split("=")[0]
            assert name in known, f"`{tool} {argv[0]}` has no option {name}"
