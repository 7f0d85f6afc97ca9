"""The network half of fetch: one aiohttp session that moves bytes and records outcomes.

What it guarantees, per URL:
- at most `concurrency` requests in flight overall and `per_host` per host name, counted
  per attempt, so rows sleeping in a backoff hold no slot;
- every attempt, redirects included, ends within `timeout` seconds, connect to last byte;
- every hop's resolved address is checked before connecting: loopback, private,
  link-local, multicast and other non-global addresses are refused (`blocked`) unless
  allowed, and redirects are followed by hand so no hop escapes the check;
- bodies are capped at `max_bytes` of decoded bytes while they stream, and, given a
  `ByteBudget`, the bytes of all bodies held at once are bounded too (`--memory`);
- URL hosts are read as browsers read them (WHATWG: `127.1`, `0x7f.1`, `2130706433` are IPv4
  addresses); a URL that cannot be parsed is `invalid`, never retried;
- retries with exponential backoff and full jitter on timeouts, connection errors, 5xx,
  408 and 429, honouring Retry-After; a host that keeps failing is paused as a whole and
  finally given up on, so one dead CDN cannot eat the run;
- given a `window` (a semaphore), a URL takes one of its units before each attempt and
  keeps it on the final outcome (`Download.saving`) for the caller to give back once the
  result is safe on disk: URLs answered but not yet saved stay within the window, which is
  what a killed run repeats. A URL waiting for a retry holds none.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import random
import re
import socket
import ssl
import time
import urllib.parse
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

# NetConfig lives with the other options, where no aiohttp is imported.
from imatdata.fetch.config import MIB, NetConfig, parse_networks

OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
RETRYABLE_CODES = frozenset({408, 429})
# X-Robots-Tag directives that carry a value after a colon; anything else before a colon
# is a user-agent token ("imat: noai").
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_READ_CHUNK = 64 * 1024
# How the error of an `invalid` row made here (not by input validation) starts; fetch's store
# tells the two apart by it.
INVALID_URL = "invalid URL: "
# Budget a request takes before it is sent: what aiohttp may buffer of an open response
# before we read it (its high-water mark of 2 x 64 KiB, plus one socket read of up to 256 KiB).
_OPEN_RESPONSE_BYTES = 384 * 1024
# A body without Content-Length takes budget in steps of this once it outgrows what it took
# before its request (most images never do).
_GROW_STEP = 1 * MIB


@dataclass
class Download:
    """What the network made of one URL. status 'ok' means a body arrived (not yet judged).

    With a budget, an ok body keeps its bytes of it (`hold`) until `release()`: call it once
    the body is no longer needed (fetch: when its row is built)."""

    status: str
    body: bytes | None = None
    http_status: int | None = None
    attempts: int = 0
    error: str | None = None
    url: str | None = None  # the last hop's URL
    hold: BodyHold | None = None
    # The Fetcher's window unit this outcome holds until the caller saves it (None: none held).
    saving: asyncio.Semaphore | None = None

    def release(self) -> None:
        """Drop the body and give its bytes back to the budget (idempotent)."""
        self.body = None
        if self.hold is not None:
            self.hold.release()
            self.hold = None


# --- the body budget ---------------------------------------------------------------------------


class BodyHold:
    """The bytes one request holds of a `ByteBudget`."""

    __slots__ = ("budget", "n")

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.n = 0

    def try_resize(self, n: int) -> bool:
        """Hold `n` bytes now if the budget allows it without waiting (shrinking always does)."""
        return self.budget._resize_now(self, n)

    async def resize(self, n: int) -> None:
        """Hold `n` bytes, waiting for others to give theirs back if need be."""
        if not self.budget._resize_now(self, n):
            await self.budget._wait(self, n - self.n)

    def release(self) -> None:
        self.budget._give_back(self, self.n)


@dataclass
class _Waiter:
    hold: BodyHold
    extra: int
    future: asyncio.Future[None]


class ByteBudget:
    """A cap on the bytes of response bodies held at once by one event loop (`--memory`).

    A request takes a little before it is sent (what aiohttp buffers of an open response),
    its Content-Length when the headers come (or more step by step while a body without one
    grows), and gives it all back when its body is no longer held: after the image worker's
    answer, when the row is built. Requests that must wait do so in arrival order, so a large
    body is not starved by a stream of small ones.

    It never deadlocks: bodies that have started and need more (which cannot finish without
    it) may go over the limit, one at a time (the "overdraft", up to --max-bytes for that body),
    and anything asked for when nothing else is held is granted. So the bytes held stay
    under limit + max_bytes, and a body larger than the whole budget still gets through.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._waiters: deque[_Waiter] = deque()
        self._overdraft: BodyHold | None = None

    def hold(self) -> BodyHold:
        return BodyHold(self)

    def _fits(self, hold: BodyHold, extra: int) -> bool:
        return self.held + extra <= self.limit or self.held == hold.n  # within the limit, or alone

    def _may_overdraw(self, hold: BodyHold) -> bool:
        return hold.n > 0 and self._overdraft in (None, hold)

    def _take(self, hold: BodyHold, extra: int) -> None:
        hold.n += extra
        self.held += extra
        self.peak = max(self.peak, self.held)

    def _resize_now(self, hold: BodyHold, n: int) -> bool:
        extra = n - hold.n
        if extra <= 0:
            self._give_back(hold, -extra)
            return True
        if not self._waiters and self._fits(hold, extra):
            self._take(hold, extra)
            return True
        if self._may_overdraw(hold):  # a started body jumps the queue rather than deadlock
            self._overdraft = hold
            self._take(hold, extra)
            return True
        return False

    async def _wait(self, hold: BodyHold, extra: int) -> None:
        waiter = _Waiter(hold, extra, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            # Granted just before the cancel: the hold has the bytes and its release returns them.
            if waiter.future.cancelled() and waiter in self._waiters:
                self._waiters.remove(waiter)
            self._wake()  # it may have been first in line
            raise

    def _give_back(self, hold: BodyHold, n: int) -> None:
        if n <= 0:
            return
        hold.n -= n
        self.held -= n
        if hold.n == 0 and self._overdraft is hold:
            self._overdraft = None
        self._wake()

    def _wake(self) -> None:
        while self._waiters:  # first come, first served
            w = self._waiters[0]
            if w.future.done():  # cancelled
                self._waiters.popleft()
                continue
            if not self._fits(w.hold, w.extra):
                break
            self._waiters.popleft()
            self._take(w.hold, w.extra)
            w.future.set_result(None)
        if self._overdraft is None:
            for w in self._waiters:
                if not w.future.done() and w.hold.n > 0:
                    self._waiters.remove(w)
                    self._overdraft = w.hold
                    self._take(w.hold, w.extra)
                    w.future.set_result(None)
                    break


# --- address policy ------------------------------------------------------------------------


_IPv4, _IPv6 = ipaddress.IPv4Address, ipaddress.IPv6Address
# IPv6 forms that carry an IPv4 address which the packets end up going to (or come from):
# checking only the IPv6 address would let [64:ff9b::10.0.0.1] reach 10.0.0.1 via NAT64.
_V4_IN_LAST_32 = tuple(ipaddress.ip_network(n) for n in (
    "::ffff:0:0/96",  # IPv4-mapped
    "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
    "64:ff9b::/96",  # NAT64, well-known prefix (always /96)
    "::/96",  # IPv4-compatible (deprecated); :: and ::1 come out as 0.0.0.0 and 0.0.0.1
))
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: any RFC 6052 prefix length >= 48
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")  # deprecated, but still a private network


def _rfc6052_ipv4(ip: _IPv6, prefix_len: int) -> _IPv4:
    """The IPv4 address inside an RFC 6052 IPv4-embedded address with a /prefix_len prefix:
    the 32 bits after the prefix, skipping bits 64-71 (the reserved "u" octet)."""
    n = int(ip)
    without_u = (n >> 64) << 56 | (n & (2**56 - 1))  # 120 bits: bits 0-63, then 72-127
    start = prefix_len if prefix_len <= 64 else prefix_len - 8
    return _IPv4((without_u >> (120 - start - 32)) & 0xFFFFFFFF)


def embedded_ipv4(ip: _IPv6) -> list[_IPv4]:
    """The IPv4 addresses an IPv6 address stands for (mapped, translated, compatible, NAT64,
    6to4, Teredo server and client); empty when it is a plain IPv6 address."""
    if any(ip in net for net in _V4_IN_LAST_32):
        return [_IPv4(int(ip) & 0xFFFFFFFF)]
    if ip in _SIX_TO_FOUR:
        return [_IPv4((int(ip) >> 80) & 0xFFFFFFFF)]
    if ip in _TEREDO:
        server, client = ip.teredo or (None, None)
        return [a for a in (server, client) if a is not None]
    if ip in _NAT64_LOCAL:
        # The operator picks the prefix length and nothing in the address says which: every
        # reading must be acceptable.
        return [_rfc6052_ipv4(ip, n) for n in (48, 56, 64, 96)]
    return []


@dataclass(frozen=True)
class AddressPolicy:
    """Which resolved addresses may be contacted: global unicast always; the rest (loopback,
    private, link-local, multicast, reserved, CGNAT, site-local ...) only with allow_private or
    when inside one of `allowed` networks. An IPv6 address that embeds IPv4 addresses (NAT64,
    6to4, Teredo, mapped ...) is judged by those: allowed when each is public or allowed."""

    allow_private: bool = False
    allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_config(cls, cfg: NetConfig) -> AddressPolicy:
        return cls(cfg.allow_private, tuple(parse_networks(cfg.allow_nets)))

    def permits(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if self.allow_private or self._allowed(ip):
            return True
        if isinstance(ip, _IPv6):
            if ip in _SITE_LOCAL:
                return False
            inner = embedded_ipv4(ip)
            if inner:
                return all(self._allowed(v4) or _public(v4) for v4 in inner)
        return _public(ip)

    def _allowed(self, ip: _IPv4 | _IPv6) -> bool:
        return any(ip.version == net.version and ip in net for net in self.allowed)


def _public(ip: _IPv4 | _IPv6) -> bool:
    return ip.is_global and not ip.is_multicast


class BlockedAddress(OSError):
    """Raised by the resolver so that aiohttp never connects to a refused address."""

    def __init__(self, host: str, addresses: Sequence[str]) -> None:
        shown = ", ".join(addresses[:3]) or "no address"
        super().__init__(f"{host} resolves to {shown}: a non-public address (--allow-private allows it)")
        self.host = host


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that drops refused addresses and raises when none is left.

    The check runs on the addresses the connection will actually use (no second lookup an
    attacker's DNS could answer differently). aiohttp skips the resolver for IP literals;
    `Fetcher` checks those itself before each request.
    """

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = _localhost(host, port, family) or await self._inner.resolve(host, port, family)
        allowed = [r for r in results if self._policy.permits(r["host"])]
        if not allowed:
            raise BlockedAddress(host, [r["host"] for r in results])
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def _localhost(host: str, port: int, family: int) -> list[ResolveResult]:
    """Loopback for `localhost`, `localhost.` and names under `.localhost` (RFC 6761, as
    browsers do), without asking DNS, which may not know the trailing-dot form or may answer
    otherwise; [] for every other name."""
    name = host.rstrip(".").lower()
    if name != "localhost" and not name.endswith(".localhost"):
        return []
    found: list[ResolveResult] = []
    for fam, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        if family in (socket.AF_UNSPEC, fam):
            found.append({"hostname": host, "host": address, "port": port, "family": fam, "proto": 0,
                          "flags": socket.AI_NUMERICHOST})
    return found


# --- URL hosts as browsers read them (WHATWG URL standard, host parsing) -------------------------

# Forbidden domain code points: the forbidden host code points, C0 controls, % and DEL.
_FORBIDDEN_HOST_CHARS = frozenset("\x00\t\n\r #/:<>?@[\\]^|%\x7f") | frozenset(map(chr, range(0x20)))


def _ipv4_number(part: str) -> int | None:
    """WHATWG IPv4 number parser: decimal, octal (leading 0) or hex (0x); None if not a number."""
    radix = 10
    if part[:2] in ("0x", "0X"):
        radix, part = 16, part[2:]
    elif len(part) >= 2 and part[0] == "0":
        radix, part = 8, part[1:]
    if not part:
        return 0
    digits = "0123456789abcdef"[:radix]
    if not all(c in digits for c in part.lower()):
        return None
    return int(part, radix)


def _ends_in_number(host: str) -> bool:
    parts = host.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    last = parts[-1]
    return bool(last) and (last.isascii() and last.isdigit() or _ipv4_number(last) is not None)


def parse_ipv4_host(host: str) -> str:
    """WHATWG IPv4 parser: 1-4 dot-separated numbers, each decimal, octal or hex, the last
    filling the remaining bytes ('127.1' -> 127.0.0.1, '2130706433' -> 127.0.0.1).
    Raises ValueError when the host is no IPv4 address."""
    parts = host.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    if len(parts) > 4 or any(not p for p in parts):
        raise ValueError(f"{host!r} is not an IPv4 address")
    numbers = [_ipv4_number(p) for p in parts]
    if any(n is None for n in numbers):
        raise ValueError(f"{host!r} is not an IPv4 address")
    head, last = numbers[:-1], numbers[-1]
    assert last is not None
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):  # type: ignore[operator]
        raise ValueError(f"{host!r} is not an IPv4 address (a part is out of range)")
    value = last + sum(n * 256 ** (3 - i) for i, n in enumerate(head))  # type: ignore[operator]
    return str(_IPv4(value))


def canonical_host(raw_host: str) -> str:
    """The host a browser would contact for a URL's (IDNA-encoded) host: IPv6 literals as
    they are, hosts ending in a number read as IPv4, names lower-cased. ValueError when a
    browser would refuse the URL."""
    if ":" in raw_host:  # an IPv6 literal; yarl has validated it
        return raw_host.lower()
    host = urllib.parse.unquote(raw_host, errors="strict").lower()
    if not host or any(c in _FORBIDDEN_HOST_CHARS for c in host):
        raise ValueError(f"host {raw_host[:100]!r} has characters a host name cannot have")
    if _ends_in_number(host):
        return parse_ipv4_host(host)
    return host


def canonical_url(url: str | URL) -> URL:
    """`url` parsed, its host as browsers read it (so `http://127.1/` is http://127.0.0.1/).
    ValueError when it cannot be parsed."""
    target = url if isinstance(url, URL) else URL(url)
    raw = target.raw_host
    if not raw:
        return target  # no host: refused as non-http(s) or host-less by the caller
    host = canonical_host(raw)
    return target if host == raw else target.with_host(host)


def literal_ip(host: str | None) -> str | None:
    """The address when `host` is an IP literal ('[::1]' too), else None."""
    if not host:
        return None
    candidate = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(candidate.split("%", 1)[0]))
    except ValueError:
        return None


# --- header helpers -------------------------------------------------------------------------


def robots_opt_out(values: Iterable[str], ua_token: str) -> str | None:
    """The opt-out directive an X-Robots-Tag names for all agents or for `ua_token`, if any.

    Each header value is `[agent:] directive[, directive...]`, e.g. "noai, noimageai" or
    "imat: noindex" or "otherbot: noai" (which does not concern us).
    """
    for value in values:
        text = value.strip()
        agent = None
        m = re.match(r"^\s*([A-Za-z0-9_.\-*]+)\s*:\s*(.*)$", text)
        if m and m.group(1).lower() not in _VALUED_DIRECTIVES:
            agent, text = m.group(1).lower(), m.group(2)
        if agent not in (None, "*", ua_token.lower()):
            continue
        for directive in text.split(","):
            d = directive.strip().lower()
            if d in OPT_OUT_DIRECTIVES:
                return d
    return None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter (AWS architecture blog): uniform over [0, min(cap, base * 2**attempt))."""
    return rng.uniform(0.0, min(cap, base * (2 ** max(0, attempt - 1))))


# --- per-host state ---------------------------------------------------------------------------


@dataclass
class HostState:
    """Slots and the circuit breaker of one host name."""

    slots: asyncio.Semaphore
    consecutive_failures: int = 0
    paused_until: float = 0.0
    pauses: int = 0
    given_up: Download | None = None  # set once the host is abandoned for this run
    users: int = 0


@dataclass
class _Attempt:
    """One attempt's outcome, with whether another attempt may help."""

    result: Download
    retry: bool = False
    retry_after: float | None = None
    host_failure: bool = False  # counts towards pausing the host
    sent: bool = True  # False when refused before any request left (blocked first hop)


@dataclass
class _Hops:
    """Where an attempt has got to; read after a timeout to say where it stopped."""

    current: str
    responses: int = 0
    http_status: int | None = None
    hold: BodyHold | None = None  # this attempt's share of the body budget
    deadline: asyncio.Timeout | None = None


@dataclass
class FetcherStats:
    requests: int = 0
    retries: int = 0
    host_pauses: int = 0
    hosts_given_up: int = 0
    bytes_in: int = 0


class Fetcher:
    """One aiohttp session for a whole run. Use as `async with Fetcher(cfg) as f: await f.fetch(url)`."""

    def __init__(self, cfg: NetConfig, *, seed: int | None = None, budget: ByteBudget | None = None,
                 window: asyncio.Semaphore | None = None) -> None:
        self.cfg = cfg
        # URLs with a request out or an answer not yet saved by the caller (see the module doc).
        self._window = window
        self.policy = AddressPolicy.from_config(cfg)
        self.stats = FetcherStats()
        # With a budget, ok bodies come with a hold the caller must `release()`.
        self._budget = budget
        self._rng = random.Random(seed)
        self._global = asyncio.Semaphore(cfg.concurrency)
        self._hosts: dict[str, HostState] = {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Fetcher:
        ssl_ctx: ssl.SSLContext | bool
        if self.cfg.insecure:
            ssl_ctx = False
        else:
            # Python's default context loads the system store and honours SSL_CERT_FILE/DIR.
            ssl_ctx = ssl.create_default_context()
        connector = aiohttp.TCPConnector(
            limit=self.cfg.concurrency,
            limit_per_host=self.cfg.per_host,
            ttl_dns_cache=self.cfg.dns_ttl,
            use_dns_cache=True,
            resolver=GuardedResolver(self.policy),
            ssl=ssl_ctx,
        )
        # No sock_read: each attempt's own deadline (`_attempt_within_deadline`) bounds stalls
        # and trickles alike. aiohttp's read timer would only add a bug: it restarts when a
        # paused body is read after its end, then fires while the connection idles in the pool
        # (as after a wait for the body budget), and the next request on it fails at once.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, self.cfg.timeout), sock_read=None)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers={"User-Agent": self.cfg.user_agent,
                     "Accept": "image/webp,image/jpeg,image/png,image/*;q=0.8,*/*;q=0.5"},
            trust_env=False,  # a proxy from the environment would bypass the address check
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- public --------------------------------------------------------------------------------

    async def fetch(self, url: str) -> Download:
        """Fetch `url` with retries. Never raises for network trouble: the outcome says it."""
        host_name = _host_key(url)
        host = self._host(host_name)
        host.users += 1
        try:
            return await self._fetch(url, host_name, host)
        finally:
            host.users -= 1
            if host.users == 0 and host.given_up is None and host.consecutive_failures == 0 \
                    and host.paused_until <= time.monotonic():
                # Forget idle healthy hosts so a list of a million hosts keeps a small table.
                self._hosts.pop(host_name, None)

    # -- internals -----------------------------------------------------------------------------

    def _host(self, name: str) -> HostState:
        state = self._hosts.get(name)
        if state is None:
            state = self._hosts[name] = HostState(asyncio.Semaphore(self.cfg.per_host))
        return state

    async def _fetch(self, url: str, host_name: str, host: HostState) -> Download:
        attempts = 0
        last: Download | None = None
        while True:
            wait = host.paused_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if host.given_up is not None:
                gone = host.given_up
                if last is not None:
                    return last
                return Download(gone.status, None, gone.http_status, attempts,
                                f"host {host_name} given up after repeated failures ({gone.error}); "
                                "rerun with --retry-failed", url)
            async with host.slots:
                # The pause may have started while this row queued for a slot.
                if host.paused_until > time.monotonic() or host.given_up is not None:
                    continue
                # Taken inside the host slot: rows queued behind a busy host hold none.
                if self._window is not None:
                    await self._window.acquire()
                try:
                    async with self._global:
                        outcome = await self._attempt(url)
                except BaseException:
                    if self._window is not None:
                        self._window.release()
                    raise
            if outcome.sent:
                attempts += 1
                self.stats.requests += 1
            outcome.result.attempts = attempts
            last = outcome.result
            self._after_attempt(host_name, host, outcome)
            if not outcome.retry or attempts > self.cfg.retries:
                last.saving = self._window  # the caller gives it back once the row is saved
                return last
            if self._window is not None:
                self._window.release()  # a row sleeping before its retry holds no unit
            self.stats.retries += 1
            if outcome.retry_after is not None:
                delay = min(outcome.retry_after, self.cfg.retry_after_cap)
            else:
                delay = backoff_delay(attempts, self.cfg.backoff_base, self.cfg.backoff_cap, self._rng)
            await asyncio.sleep(delay)

    def _after_attempt(self, host_name: str, host: HostState, outcome: _Attempt) -> None:
        if not outcome.host_failure:
            host.consecutive_failures = 0
            host.pauses = 0
            return
        host.consecutive_failures += 1
        if host.consecutive_failures < self.cfg.host_fail_threshold or host.paused_until > time.monotonic():
            return
        host.consecutive_failures = 0
        host.pauses += 1
        if host.pauses > self.cfg.host_max_pauses:
            host.given_up = outcome.result
            self.stats.hosts_given_up += 1
            return
        pause = min(self.cfg.host_pause_cap, self.cfg.host_pause_base * 2 ** (host.pauses - 1))
        host.paused_until = time.monotonic() + pause * self._rng.uniform(0.75, 1.25)
        self.stats.host_pauses += 1

    async def _attempt(self, url: str) -> _Attempt:
        """One attempt, with its share of the body budget when there is one.

        The attempt first takes what aiohttp may buffer of an open response, before its
        deadline starts: while the budget is spent, requests wait unsent rather than time
        out. Later waits, for a body's bytes once its headers came, stop the deadline (see
        `_reserve`). So a full budget slows rows down but never fails them, and --timeout still
        measures the server alone. An ok body leaves with its hold; any other outcome gives it
        back here."""
        hold = self._budget.hold() if self._budget is not None else None
        outcome: _Attempt | None = None
        try:
            if hold is not None:
                await hold.resize(_OPEN_RESPONSE_BYTES)
            outcome = await self._attempt_within_deadline(url, hold)
            return outcome
        finally:
            if hold is not None:
                if outcome is not None and outcome.result.body is not None:
                    outcome.result.hold = hold
                else:
                    hold.release()

    async def _attempt_within_deadline(self, url: str, hold: BodyHold | None) -> _Attempt:
        """Every hop of one attempt within one deadline; outcomes instead of exceptions."""
        hops = _Hops(url, hold=hold)
        try:
            async with asyncio.timeout(self.cfg.timeout) as deadline:  # no extra task, unlike wait_for
                hops.deadline = deadline
                return await self._follow(hops)
        except asyncio.TimeoutError:
            return _Attempt(Download("timeout", None, hops.http_status, 0,
                                     f"no complete response within {self.cfg.timeout:g}s", hops.current),
                            retry=True, host_failure=True)
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, BlockedAddress) or isinstance(exc.__cause__, BlockedAddress):
                return _Attempt(Download("blocked", None, hops.http_status, 0, str(exc.os_error), hops.current),
                                sent=hops.responses > 0)
            return _Attempt(Download("connection_error", None, hops.http_status, 0,
                                     f"DNS lookup failed: {_brief(exc.os_error)}", hops.current),
                            retry=True, host_failure=True)
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError,
                ssl.SSLCertVerificationError) as exc:
            # A bad certificate will be bad next time too; not retried.
            return _Attempt(Download("connection_error", None, hops.http_status, 0,
                                     f"TLS certificate rejected: {_brief(exc)} (--insecure skips the check)",
                                     hops.current))
        except (aiohttp.InvalidURL, ValueError) as exc:
            # A URL no request can be made of: the same next time, so not transient.
            return _invalid_url(hops, _brief(exc))
        except (aiohttp.ClientError, OSError) as exc:
            return _Attempt(Download("connection_error", None, hops.http_status, 0, _brief(exc), hops.current),
                            retry=True, host_failure=True)

    async def _follow(self, hops: _Hops) -> _Attempt:
        """Request, and follow redirects by hand so that every hop's address is checked."""
        assert self._session is not None, "use Fetcher as an async context manager"
        for _hop in range(self.cfg.max_redirects + 1):
            try:
                target = canonical_url(hops.current)  # http://127.1/ is http://127.0.0.1/
            except ValueError as exc:
                return _invalid_url(hops, str(exc))
            if target.scheme not in ("http", "https") or not target.host:
                return _Attempt(Download("blocked", None, hops.http_status, 0,
                                         f"refused non-http(s) URL {hops.current[:200]}", hops.current),
                                sent=hops.responses > 0)
            ip = literal_ip(target.host)
            if ip is not None and not self.policy.permits(ip):
                return _Attempt(Download("blocked", None, hops.http_status, 0,
                                         f"{ip} is a non-public address (--allow-private allows it)", hops.current),
                                sent=hops.responses > 0)
            async with self._session.get(target, allow_redirects=False) as resp:
                hops.responses += 1
                hops.http_status = resp.status
                location = resp.headers.get("Location")
                if resp.status in REDIRECT_CODES and location:
                    try:
                        hops.current = str(resp.url.join(URL(location)))
                    except ValueError:
                        return _Attempt(Download("http_error", None, resp.status, 0,
                                                 f"bad redirect Location {location[:200]!r}", hops.current))
                    continue
                return await self._final_response(resp, hops)
        return _Attempt(Download("http_error", None, hops.http_status, 0,
                                 f"more than {self.cfg.max_redirects} redirects", hops.current))

    async def _reserve(self, hops: _Hops, n: int) -> None:
        """Hold `n` bytes of the budget for this attempt's body, waiting if need be. The
        deadline stops while waiting: the wait measures the other rows, not this server (whose
        data meanwhile waits in the socket buffers)."""
        hold, deadline = hops.hold, hops.deadline
        if hold is None or hold.try_resize(n):
            return
        assert deadline is not None and deadline.when() is not None
        loop = asyncio.get_running_loop()
        left = deadline.when() - loop.time()  # type: ignore[operator]
        deadline.reschedule(None)
        try:
            await hold.resize(n)
        finally:
            deadline.reschedule(loop.time() + left)

    async def _final_response(self, resp: aiohttp.ClientResponse, hops: _Hops) -> _Attempt:
        url = hops.current
        status = resp.status
        if status >= 500 or status in RETRYABLE_CODES:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            return _Attempt(Download("http_error", None, status, 0, f"HTTP {status} {resp.reason or ''}".strip(), url),
                            retry=True, retry_after=retry_after, host_failure=True)
        if not 200 <= status < 300:
            return _Attempt(Download("http_error", None, status, 0, f"HTTP {status} {resp.reason or ''}".strip(), url))
        if not self.cfg.ignore_optout:
            directive = robots_opt_out(resp.headers.getall("X-Robots-Tag", []), self.cfg.ua_token)
            if directive:
                return _Attempt(Download("opted_out", None, status, 0,
                                         f"X-Robots-Tag: {directive} (--ignore-optout fetches it anyway)", url))
        limit = self.cfg.max_bytes
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("", "identity") and resp.content_length is not None:
            if resp.content_length > limit:
                return _Attempt(Download("too_large", None, status, 0,
                                         f"Content-Length {resp.content_length} exceeds --max-bytes {limit}", url))
            await self._reserve(hops, resp.content_length)  # all of it up front: no half-read body waits
            body = await _read_into(resp, resp.content_length)
        else:
            buffer = bytearray()
            # Counted after Content-Encoding is undone, so a gzip bomb stops at the limit too.
            async for chunk in resp.content.iter_chunked(_READ_CHUNK):
                buffer += chunk
                if len(buffer) > limit:
                    resp.close()  # drop the connection rather than drain the rest
                    return _Attempt(Download("too_large", None, status, 0,
                                             f"body exceeds --max-bytes {limit}", url))
                if hops.hold is not None and len(buffer) + _READ_CHUNK > hops.hold.n:
                    # The body outgrows its budget: more, a step at a time (aiohttp's buffer is
                    # small while we read; while we wait, under _OPEN_RESPONSE_BYTES more).
                    await self._reserve(hops, hops.hold.n + _GROW_STEP)
            body = bytes(buffer)
            del buffer
        if hops.hold is not None:
            hops.hold.try_resize(len(body))  # the response is done: the body is all it holds now
        self.stats.bytes_in += len(body)
        return _Attempt(Download("ok", body, status, 0, None, url))


async def _read_into(resp: aiohttp.ClientResponse, length: int) -> bytearray:
    """A body of known length read straight into one buffer of that size: `resp.read()`
    gathers the chunks and joins them, so a large body is briefly held twice."""
    body = bytearray(length)
    view, got = memoryview(body), 0
    async for chunk in resp.content.iter_chunked(_READ_CHUNK):
        end = got + len(chunk)
        if end > length:  # the parser stops at Content-Length; never write past the buffer
            raise aiohttp.ClientPayloadError(f"body longer than its Content-Length {length}")
        view[got:end] = chunk
        got = end
    del view
    if got < length:
        raise aiohttp.ClientPayloadError(f"body ended after {got} of its Content-Length {length} bytes")
    return body


def _host_key(url: str) -> str:
    """The host a URL's per-host slots are counted under ('' when it cannot be parsed)."""
    try:
        return canonical_url(url).raw_host or ""
    except (ValueError, TypeError):
        return ""


def _invalid_url(hops: _Hops, why: str) -> _Attempt:
    """A URL no request can be made of: `invalid` when the list gave it, a non-transient
    http_error when a redirect did (the server's fault, not the list's); never retried."""
    if hops.responses:
        return _Attempt(Download("http_error", None, hops.http_status, 0,
                                 f"bad redirect Location {hops.current[:200]!r}: {why}", hops.current))
    return _Attempt(Download("invalid", None, None, 0, INVALID_URL + why, hops.current), sent=False)


def _brief(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    name = type(exc).__name__
    return f"{name}: {msg}"[:300] if msg else name
