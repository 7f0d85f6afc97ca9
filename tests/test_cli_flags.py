"""imatdata's flags are generated from its config dataclasses (`imatdata.options`).

For fetch (FetchOptions + NetConfig), clean (CleanConfig) and stats (StatsOptions): every flag
field is in `--help` with its help sentence and its default, the default shown reads back as
the dataclass default, a command run without flags builds the dataclass defaults, a typed
flag of each kind (int, float, size, repeatable, plain switch, choice, optional) reaches the
config, and a bad value is one line naming the flag, exit 2. The library calls are replaced,
so nothing is fetched, cleaned or computed.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, Field
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from imatdata import clean as clean_pkg
from imatdata import fetch as fetch_pkg
from imatdata import stats as stats_pkg
from imatdata.cli import app
from imatdata.clean.config import CleanConfig
from imatdata.fetch.config import DEFAULT_USER_AGENT, FetchOptions, NetConfig
from imatdata.options import field_flag, option_fields, parse_given, parse_value
from imatdata.stats.config import StatsOptions

CONFIGS: dict[str, tuple[type, ...]] = {
    "fetch": (FetchOptions, NetConfig),
    "clean": (CleanConfig,),
    "stats": (StatsOptions,),
}
# Flags no config field holds, written by hand in the CLI.
HAND_WRITTEN = {
    "fetch": {"--root"},
    "clean": {"--root", "--quiet"},
    "stats": {"--root", "--stage", "--tree", "--json"},
}


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})


def help_text(command: str) -> str:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    # rich wraps a long help sentence over several lines of its table: join them back up.
    return " ".join(result.stdout.replace("│", " ").split())


def shows_default(f: Field[Any]) -> bool:
    """Whether --help shows `[default: ...]` for the field (switches and None say it in words)."""
    return f.default not in (None, "", (), MISSING) and not isinstance(f.default, bool)


def all_fields(command: str) -> list[tuple[type, Field[Any]]]:
    return [(cls, f) for cls in CONFIGS[command] for f in option_fields(cls)]


@pytest.mark.parametrize("command", CONFIGS)
def test_every_flag_field_is_in_help_with_its_default(command: str) -> None:
    text = help_text(command)
    for cls, f in all_fields(command):
        flag = f"--{field_flag(f)}"
        sentence = " ".join(f.metadata["help"].split())
        assert re.search(rf"{re.escape(flag)}(?![\w-])", text), f"{flag} missing from {command} --help"
        assert sentence in text, f"{flag}: help sentence missing from {command} --help"
        shown = re.search(rf"{re.escape(sentence)} \[default: ([^\]]+)\]", text)
        if shows_default(f):
            assert shown, f"{flag}: no [default: ...] after its help sentence"
            # What the user reads is what they get: the shown text parses to the field's default.
            assert parse_value(cls, f.name, shown.group(1)) == f.default, (flag, shown.group(1))
        else:
            assert shown is None, f"{flag}: shows a default although it has none to show"


@pytest.mark.parametrize("command", CONFIGS)
def test_the_options_are_the_fields_and_the_hand_written_ones(command: str) -> None:
    """No flag written twice, none forgotten: the command's options are its config fields'."""
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    names = [o for p in click_command.params if p.param_type_name == "option" for o in p.opts]
    expected = {f"--{field_flag(f)}" for _cls, f in all_fields(command)} | HAND_WRITTEN[command]
    assert sorted(names) == sorted(expected)
    assert len(names) == len(set(names))


def test_parse_given_of_nothing_is_the_dataclass_default() -> None:
    assert NetConfig(**parse_given(NetConfig, {})) == NetConfig()
    assert CleanConfig(**parse_given(CleanConfig, {})) == CleanConfig()
    assert StatsOptions(**parse_given(StatsOptions, {})) == StatsOptions()
    assert FetchOptions(["a.json"], **parse_given(FetchOptions, {})) == FetchOptions(["a.json"])
    # --user-agent is shown without a default and stands for imat's own.
    assert NetConfig().user_agent == DEFAULT_USER_AGENT
    assert NetConfig(**parse_given(NetConfig, {"user_agent": ""})).user_agent == DEFAULT_USER_AGENT


# --- the commands, with the library calls replaced --------------------------------------------


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What each command handed the library."""
    seen: dict[str, Any] = {}

    def run_fetch(opts: FetchOptions) -> str:
        seen["fetch"] = opts
        return "summary"

    def clean(root: Path, config: CleanConfig, **kw: Any) -> None:
        seen["clean"] = config

    def write_stats(root: Path, stage: Any, tree: Any, quiet: bool = True, *,
                    options: StatsOptions) -> dict:
        seen["stats"] = options
        return {}

    monkeypatch.setattr(fetch_pkg, "run_fetch", run_fetch)
    monkeypatch.setattr(fetch_pkg, "render_summary", lambda summary, console: seen.setdefault("summary", summary))
    monkeypatch.setattr(clean_pkg, "clean", clean)
    monkeypatch.setattr(stats_pkg, "write_stats", write_stats)
    return seen


def test_commands_without_flags_use_the_dataclass_defaults(calls: dict[str, Any], tmp_path: Path) -> None:
    root = str(tmp_path)
    for args in (["fetch", "list.json", "--root", root], ["clean", "--root", root, "--quiet"],
                 ["stats", "--root", root]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    opts = calls["fetch"]
    assert opts.sources == ["list.json"] and opts.root == root
    assert opts.net == NetConfig()
    for f in option_fields(FetchOptions):
        assert getattr(opts, f.name) == f.default, f.name
    assert calls["summary"] == "summary"  # not --quiet: the summary is shown
    assert calls["clean"] == CleanConfig()
    assert calls["stats"] == StatsOptions()


def test_typed_flags_reach_the_config(calls: dict[str, Any], tmp_path: Path) -> None:
    root = str(tmp_path)
    result = invoke("fetch", "list.json", "--root", root, "--concurrency", "7", "--timeout", "2.5",
                    "--max-bytes", "1KB", "--memory", "2MiB", "--allow-net", "10.0.0.0/8",
                    "--allow-net", "127.0.0.0/8", "--retry-failed", "--allow-private",
                    "--resize-filter", "Lanczos", "--split", "x", "--limit", "3",
                    "--user-agent", "otherbot/2.0", "--quiet")
    assert result.exit_code == 0, result.output
    opts = calls["fetch"]
    net = opts.net
    assert (net.concurrency, net.timeout, net.max_bytes, net.memory) == (7, 2.5, 1000, 2 * 1024 * 1024)
    assert net.allow_nets == ("10.0.0.0/8", "127.0.0.0/8")
    assert net.allow_private and not net.insecure and net.user_agent == "otherbot/2.0"
    assert opts.retry_failed and not opts.prune and opts.quiet
    assert (opts.resize_filter, opts.split, opts.limit) == ("lanczos", "x", 3)
    assert "summary" not in calls  # --quiet: no summary table

    result = invoke("clean", "--root", root, "--quiet", "--dedup", "exact", "--max-aspect", "2.5",
                    "--min-size", "0", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert calls["clean"] == CleanConfig(dedup="exact", max_aspect=2.5, min_size=0, workers=1)

    result = invoke("stats", "--root", root, "--min-count", "5", "--top", "0")
    assert result.exit_code == 0, result.output
    assert calls["stats"] == StatsOptions(min_count=5, top=0)


@pytest.mark.parametrize("args, flag", [
    (["fetch", "list.json", "--concurrency", "abc"], "--concurrency"),
    (["fetch", "list.json", "--concurrency", "0"], "--concurrency"),
    (["fetch", "list.json", "--timeout", "soon"], "--timeout"),
    (["fetch", "list.json", "--max-bytes", "12XB"], "--max-bytes"),
    (["fetch", "list.json", "--memory", "12XB"], "--memory"),
    (["fetch", "list.json", "--allow-net", "bogus"], "--allow-net"),
    (["fetch", "list.json", "--resize-filter", "bogus"], "--resize-filter"),
    (["fetch", "list.json", "--limit", "many"], "--limit"),
    (["clean", "--min-size", "-1"], "--min-size"),
    (["clean", "--max-aspect", "wide"], "--max-aspect"),
    (["clean", "--dedup", "bogus"], "--dedup"),
    (["stats", "--top", "x"], "--top"),
    (["stats", "--min-count", "-1"], "--min-count"),
])
def test_a_bad_value_is_one_line_naming_the_flag(calls: dict[str, Any], tmp_path: Path,
                                                 args: list[str], flag: str) -> None:
    result = invoke(*args, "--root", str(tmp_path))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"imatdata: error: {flag} "), result.stderr
    assert not calls  # refused before the library was called


def test_plain_switches_have_no_negative_form(calls: dict[str, Any]) -> None:
    for flag in ("--no-retry-failed", "--no-prune", "--no-allow-private", "--no-insecure",
                 "--no-ignore-optout", "--no-skip-invalid", "--no-quiet"):
        result = invoke("fetch", "list.json", flag)
        assert result.exit_code == 2 and "No such option" in result.output, (flag, result.output)
    assert not calls
