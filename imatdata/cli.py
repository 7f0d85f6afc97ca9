"""`imatdata`: the thin command-line layer. Parses flags, calls the library, renders with rich.

This is the only place that maps errors to exit codes and messages: a UserError becomes one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import typer

from imatdata.errors import user_errors as _user_errors

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


# Commands are registered by their modules' CLI sections below; each keeps its own flags.
# fetch --------------------------------------------------------------------------------------
@app.command()
def fetch(
    sources: list[str] = typer.Argument(..., help="URL lists: iMaterialist .json, .jsonl, .csv or .parquet "
                                        "(columns id,url[,class]); the split is the file's stem."),
    root: str = typer.Option(None, "--root", help="Manifest root (default: $IMAT_ROOT, else ./manifests)."),
    split: str = typer.Option(None, "--split", help="Split name for all sources (default: each file's stem)."),
    concurrency: int = typer.Option(256, "--concurrency", help="Requests in flight at most, all hosts together."),
    per_host: int = typer.Option(16, "--per-host", help="Requests in flight at most per host."),
    retries: int = typer.Option(3, "--retries", help="Extra attempts on timeouts, connection errors, 5xx, 408, 429."),
    timeout: float = typer.Option(30.0, "--timeout", help="Deadline in seconds for each whole attempt "
                                  "(connect to last byte, redirects included)."),
    max_bytes: str = typer.Option("20MiB", "--max-bytes", help="Largest body accepted, decoded (e.g. 20MiB, 512KB)."),
    memory: str = typer.Option("128MiB", "--memory", help="Bytes of response bodies held at once, all loops "
                               "together (downloading, queued for or in the image workers); with their copies "
                               "the process tree stays near 4x this plus ~200MiB. A body over it still gets "
                               "through, one at a time. Waiting for it does not count against --timeout."),
    max_side: int = typer.Option(512, "--max-side", help="Shrink the longer side to this many pixels (0: keep size)."),
    resize_filter: str = typer.Option("area", "--resize-filter", help="Downscaling filter: area, bilinear, "
                                      "bicubic or lanczos (all antialiased; sharper and slower in that order)."),
    limit: int = typer.Option(None, "--limit", help="Take only the first N records of each source."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Re-attempt rows whose failure was transient "
                                      "(timeout, connection_error, HTTP 5xx/408/429)."),
    prune: bool = typer.Option(False, "--prune", help="Delete stored rows (images included) of records these "
                               "lists do not hold, e.g. after a smaller --limit; without it such a run stops "
                               "(exit 2) before changing anything, saying what would go."),
    allow_private: bool = typer.Option(False, "--allow-private", help="Allow loopback/private/link-local addresses."),
    allow_net: list[str] = typer.Option(None, "--allow-net", help="Allow this otherwise refused network "
                                        "(CIDR, repeatable), e.g. 127.0.0.0/8."),
    insecure: bool = typer.Option(False, "--insecure", help="Do not verify HTTPS certificates."),
    ignore_optout: bool = typer.Option(False, "--ignore-optout", help="Fetch images whose X-Robots-Tag says "
                                       "noai/noimageai/noindex/noimageindex."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Record bad input records as status=invalid "
                                      "instead of stopping."),
    user_agent: str = typer.Option(None, "--user-agent", help="User-Agent header (its first token is the name "
                                   "X-Robots-Tag rules are matched against)."),
    workers: int = typer.Option(None, "--workers", help="Processes for image decoding (default: all cores)."),
    loops: int = typer.Option(None, "--loops", help="Network event loops, one process each, sharing out "
                              "the records and caps (default: 1 up to 4 cores, then one per 4 cores)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar and no summary table."),
) -> None:
    """Download URL lists into raw Parquet shards (<root>/raw/<split>/), one row per record, resumable."""

    def _run() -> None:
        from rich.console import Console

        from imatdata import fetch as fetch_mod
        from imatdata.fetch.config import DEFAULT_USER_AGENT, NetConfig

        net = NetConfig(concurrency=concurrency, per_host=per_host, retries=retries, timeout=timeout,
                        max_bytes=fetch_mod.parse_size(max_bytes), memory=fetch_mod.parse_size(memory, "--memory"),
                        allow_private=allow_private,
                        allow_nets=tuple(allow_net or ()), insecure=insecure, ignore_optout=ignore_optout,
                        user_agent=user_agent or DEFAULT_USER_AGENT)
        opts = fetch_mod.FetchOptions(sources=sources, root=root, split=split, net=net, max_side=max_side,
                                      resize_filter=resize_filter, limit=limit, retry_failed=retry_failed,
                                      prune=prune, skip_invalid=skip_invalid,
                                      quiet=quiet, workers=workers, loops=loops)
        summary = fetch_mod.run_fetch(opts)
        if not quiet:
            fetch_mod.render_summary(summary, Console())

    run_command(_run)


# clean --------------------------------------------------------------------------------------


@app.command()
def clean(
    root: str = typer.Option(None, "--root", help="Manifest root (default: $IMAT_ROOT, else ./manifests)."),
    min_size: int = typer.Option(64, "--min-size", help="Drop images whose shorter original side is below this."),
    max_aspect: float = typer.Option(0.0, "--max-aspect", help="Drop images whose long/short side ratio exceeds "
                                     "this (0: off)."),
    dedup: str = typer.Option("near", "--dedup", help="near (exact + perceptual-hash duplicates), exact "
                              "(identical bytes as served) or off (no duplicate, placeholder, leak or "
                              "label-conflict checks)."),
    hash_distance: int = typer.Option(4, "--hash-distance", help="Near duplicates: phash Hamming distance "
                                      "at most this many bits."),
    placeholder_min_urls: int = typer.Option(10, "--placeholder-min-urls", help="A duplicate group with at "
                                             "least this many URLs..."),
    placeholder_min_classes: int = typer.Option(3, "--placeholder-min-classes", help="...over at least this "
                                                "many classes is a placeholder: all of it is dropped."),
    workers: int = typer.Option(None, "--workers", help="Hashing processes (default: all cores)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar and no table."),
) -> None:
    """Drop broken, undersized, duplicate, placeholder and leaked images: raw/ -> clean/ + dropped.parquet."""

    def _run() -> None:
        from rich.console import Console

        from imatdata import clean as clean_mod
        from imatdata.manifest import resolve_root

        config = clean_mod.CleanConfig(min_size=min_size, max_aspect=max_aspect, dedup=dedup,
                                       hash_distance=hash_distance, placeholder_min_urls=placeholder_min_urls,
                                       placeholder_min_classes=placeholder_min_classes, workers=workers)
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

    with user_errors(STATS_HINT):
        _run()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
