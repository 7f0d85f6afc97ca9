"""What one `imatdata fetch` run is told: `FetchOptions` and its network half, `NetConfig`.

Dataclasses with their defaults and checks, and the flag-value parser `parse_size`. A field
declared with `opt(default, help)` is an `imatdata fetch` flag (the CLI generates it through
`imatdata.options`); a plain field is an internal knob that tests shrink.
This module imports only the standard library, `imatdata.errors` and `imatdata.options`
(which loads typer only when the CLI asks it for parameters): the CLI builds its flags from
it, and the image workers (`images`) take their defaults from it, so neither pays for
aiohttp, Pillow or pyarrow.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imatdata import __version__
from imatdata.errors import UserError
from imatdata.options import opt

DEFAULT_USER_AGENT = f"imat/{__version__} (+image dataset downloader; honours X-Robots-Tag noai)"
MIB = 1024 * 1024
# Default --memory: response bodies held at once by a whole fetch (all loops together).
# A body also has copies on its way to an image worker and inside it, so the process tree
# peaks near 4x this plus ~200 MiB of code: about 700 MiB for 128 bodies of 19 MiB at once
# (bench/memory.py; README promises under 1 GiB).
DEFAULT_MEMORY = 128 * MIB
MIN_MEMORY = 1 * MIB

# Pillow's own limit warns at this many pixels and raises at twice it; fetch checks the
# header against its own limit first, so a bomb is refused before any pixel is decoded.
DEFAULT_MAX_PIXELS = 89_478_485
# Downscaling filters (`--resize-filter`), all antialiased: Pillow widens the kernel with the
# scale factor. The resize is most of the image work (a 900 px photo going to 512 px: decode
# ~3 ms, resize ~3 ms area / 5 bilinear / 8 bicubic / 11 lanczos, encode ~1 ms), so the filter
# sets the download rate on a small machine. "area" averages the source pixels under each
# output pixel, as OpenCV's INTER_AREA (img2dataset's default for downscaling) does.
# `images.RESIZE_FILTERS` maps each name to its Pillow filter.
RESIZE_FILTER_NAMES = ("area", "bilinear", "bicubic", "lanczos")
DEFAULT_RESIZE_FILTER = "area"


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(text: str | int, flag: str = "--max-bytes") -> int:
    """'20MiB', '512KB', '1.5GB', '1048576' -> bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise UserError(f"{flag} {text!r}: use a number of bytes with an optional unit, e.g. 20MiB, 512KB, 1000000")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_memory(text: str | int) -> int:
    return parse_size(text, "--memory")


@dataclass(frozen=True)
class NetConfig:
    """Network settings of one fetch run (the CLI flags, plus internal knobs tests shrink)."""

    concurrency: int = opt(256, "Requests in flight at most, all hosts together.")
    per_host: int = opt(16, "Requests in flight at most per host.")
    retries: int = opt(3, "Extra attempts on timeouts, connection errors, 5xx, 408, 429.")
    timeout: float = opt(30.0, "Deadline in seconds for each whole attempt (connect to last byte, "
                               "redirects included).")
    max_bytes: int = opt(20 * MIB, "Largest body accepted, decoded (e.g. 20MiB, 512KB).",
                         parse=parse_size, metavar="SIZE")
    max_redirects: int = 10
    allow_private: bool = opt(False, "Allow loopback/private/link-local addresses.", negatable=False)
    allow_nets: tuple[str, ...] = opt((), "Allow this otherwise refused network (CIDR, repeatable), "
                                          "e.g. 127.0.0.0/8.", flag="allow-net")
    insecure: bool = opt(False, "Do not verify HTTPS certificates.", negatable=False)
    ignore_optout: bool = opt(False, "Fetch images whose X-Robots-Tag says "
                                     "noai/noimageai/noindex/noimageindex.", negatable=False)
    # None (or empty): DEFAULT_USER_AGENT, filled in by __post_init__.
    user_agent: str | None = opt(None, "User-Agent header (its first token is the name X-Robots-Tag "
                                       "rules are matched against).")
    # Backoff between attempts of one row: full jitter over base * 2**n, at most cap.
    backoff_base: float = 1.0
    backoff_cap: float = 30.0
    retry_after_cap: float = 120.0
    # A host whose last `host_fail_threshold` attempts all failed transiently is paused
    # (2, 4, 8 ... x host_pause_base seconds); after `host_max_pauses` pauses without a
    # success in between it is given up for this run (rows fail fast, --retry-failed retries).
    host_fail_threshold: int = 10
    host_pause_base: float = 2.0
    host_pause_cap: float = 120.0
    host_max_pauses: int = 6
    dns_ttl: int = 300
    # Fetch gives each loop its share of --memory as a `ByteBudget`. A Fetcher without a
    # budget does not count.
    memory: int = opt(DEFAULT_MEMORY, "Bytes of response bodies held at once, all loops together "
                      "(downloading, queued for or in the image workers); with their copies the "
                      "process tree stays near 4x this plus ~200MiB. A body over it still gets "
                      "through, one at a time. Waiting for it does not count against --timeout.",
                      parse=parse_memory, metavar="SIZE")

    def __post_init__(self) -> None:
        if not self.user_agent:
            object.__setattr__(self, "user_agent", DEFAULT_USER_AGENT)
        if self.concurrency < 1:
            raise UserError("--concurrency must be at least 1")
        if self.per_host < 1:
            raise UserError("--per-host must be at least 1")
        if self.retries < 0:
            raise UserError("--retries must be 0 or more")
        if self.retries > 100:
            raise UserError("--retries must be at most 100")
        if self.timeout <= 0:
            raise UserError("--timeout must be a positive number of seconds")
        if self.max_bytes < 1:
            raise UserError("--max-bytes must be at least 1 byte")
        if self.memory < MIN_MEMORY:
            raise UserError("--memory must be at least 1MiB (a body larger than it still gets through, "
                            "one at a time)")
        parse_networks(self.allow_nets)  # fail early on a bad CIDR

    @property
    def ua_token(self) -> str:
        """The product token robots rules name us by: 'imat' for 'imat/0.1 (...)'."""
        agent = (self.user_agent or "").strip()
        token = agent.split("/")[0].split()[0] if agent else "imat"
        return token.lower()


def parse_networks(cidrs: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for c in cidrs:
        try:
            nets.append(ipaddress.ip_network(c.strip(), strict=False))
        except ValueError:
            raise UserError(f"--allow-net {c!r}: not a network; use CIDR like 127.0.0.0/8 or 10.1.2.3/32") from None
    return nets


@dataclass
class FetchOptions:
    """Everything one `imatdata fetch` run needs; the CLI fills it from flags."""

    sources: Sequence[str | Path]
    root: Path | None = None
    split: str | None = opt(None, "Split name for all sources (default: each file's stem).")
    net: NetConfig = field(default_factory=NetConfig)
    max_side: int = opt(512, "Shrink the longer side to this many pixels (0: keep size).")
    limit: int | None = opt(None, "Take only the first N records of each source.")
    retry_failed: bool = opt(False, "Re-attempt rows whose failure was transient (timeout, "
                                    "connection_error, HTTP 5xx/408/429).", negatable=False)
    prune: bool = opt(False, "Delete stored rows (images included) of records these lists do not "
                             "hold, e.g. after a smaller --limit; without it such a run stops "
                             "(exit 2) before changing anything, saying what would go.",
                      negatable=False)
    skip_invalid: bool = opt(False, "Record bad input records as status=invalid instead of "
                                    "stopping.", negatable=False)
    quiet: bool = opt(False, "No progress bar and no summary table.", negatable=False)
    workers: int | None = opt(None, "Processes for image decoding (default: all cores).")
    # Each loop is a process with its own share of the records, caps and image workers
    # (None: `loops.default_loops()`). One loop's own work caps it near 700 images/s.
    loops: int | None = opt(None, "Network event loops, one process each, sharing out the records "
                                  "and caps (default: 1 up to 4 cores, then one per 4 cores).")
    ray: str | None = opt(None, "Spread the fetch over a Ray cluster: its ADDRESS (host:port), auto "
                                "(the one this machine runs) or local (start one here). Every node "
                                "must see the lists and the root at the same path (or an s3:// root). "
                                "Needs Ray on every node (imat's ray extra).", metavar="ADDRESS")
    max_pixels: int = DEFAULT_MAX_PIXELS
    resize_filter: str = opt(DEFAULT_RESIZE_FILTER, "Downscaling filter: area, bilinear, bicubic or "
                             "lanczos (all antialiased; sharper and slower in that order).",
                             metavar="FILTER")
    journal_rows: int = 512
    journal_seconds: float = 1.0
    # A kill -9 repeats at most --concurrency + this many requests whose answer had come (or
    # was coming): requests out, bodies waiting for the image workers and rows waiting for
    # the journal together never pass it (`store.Journal`'s window). Shared out between loops.
    resume_slack: int = 64
    # Rows waiting for the journal hold their stored images: flush before they pass this
    # (with --max-side 0 an image may be as large as its body).
    journal_bytes: int = 64 * 1024 * 1024
    shard_rows: int = 50_000
    seal_seconds: float = 5.0  # how often journal rows are checked for a full shard to seal
    # Records being worked on at once (waiting for a host slot, downloading, decoding).
    # More than --concurrency so one busy host cannot idle the others.
    pending: int | None = None
    # Most bodies sent to a worker in one round trip when a backlog builds up.
    image_batch: int = 8
    stats: bool = True

    def __post_init__(self) -> None:
        if self.max_side < 0:
            raise UserError("--max-side must be 0 (no limit) or a positive number of pixels")
        self.resize_filter = self.resize_filter.strip().lower()  # "Lanczos" is lanczos too
        if self.resize_filter not in RESIZE_FILTER_NAMES:
            raise UserError(f"--resize-filter {self.resize_filter!r}: use one of " + ", ".join(RESIZE_FILTER_NAMES))
        if self.workers is not None and self.workers < 1:
            raise UserError("--workers must be at least 1")
        if self.loops is not None and self.loops < 1:
            raise UserError("--loops must be at least 1")
        if self.ray is not None and self.ray not in ("auto", "local"):
            host, _, port = self.ray.rpartition(":")
            if not host or not port.isdigit() or "/" in host:
                raise UserError(f"--ray {self.ray!r}: expected the host:port of the cluster's head "
                                "(`ray start --head` prints it), auto or local")
