"""The network half of fetch: one aiohttp session that moves bytes and records outcomes.

What it guarantees, per URL:
- at most `concurrency` requests in flight overall and `per_host` per host name, counted
  per attempt, so rows sleeping in a backoff hold no slot;
- every attempt, redirects included, ends within `timeout` seconds, connect to last byte;
- every hop's resolved address is checked before connecting: loopback, private,
  link-local, multicast and other non-global addresses are refused (`blocked`) unless
  allowed, and redirects are followed by hand so no hop escapes the check;
- bodies are capped at `max_bytes` of decoded bytes while they stream;
- retries with exponential backoff and full jitter on timeouts, connection errors, 5xx,
  408 and 429, honouring Retry-After; a host that keeps failing is paused as a whole and
  finally given up on, so one dead CDN cannot eat the run.
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from imatdata import __version__
from imatdata.errors import UserError

DEFAULT_USER_AGENT = f"imat/{__version__} (+image dataset downloader; honours X-Robots-Tag noai)"
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
RETRYABLE_CODES = frozenset({408, 429})
# X-Robots-Tag directives that carry a value after a colon; anything else before a colon
# is a user-agent token ("imat: noai").
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class NetConfig:
    """Network settings of one fetch run (the CLI flags, plus internal knobs tests shrink)."""

    concurrency: int = 256
    per_host: int = 16
    retries: int = 3
    timeout: float = 30.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 10
    allow_private: bool = False
    allow_nets: tuple[str, ...] = ()
    insecure: bool = False
    ignore_optout: bool = False
    user_agent: str = DEFAULT_USER_AGENT
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

    def __post_init__(self) -> None:
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
        parse_networks(self.allow_nets)  # fail early on a bad CIDR

    @property
    def ua_token(self) -> str:
        """The product token robots rules name us by: 'imat' for 'imat/0.1 (...)'."""
        token = self.user_agent.strip().split("/")[0].split()[0] if self.user_agent.strip() else "imat"
        return token.lower()


@dataclass
class Download:
    """What the network made of one URL. status 'ok' means a body arrived (not yet judged)."""

    status: str
    body: bytes | None = None
    http_status: int | None = None
    attempts: int = 0
    error: str | None = None
    url: str | None = None  # the last hop's URL


# --- address policy ------------------------------------------------------------------------


def parse_networks(cidrs: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for c in cidrs:
        try:
            nets.append(ipaddress.ip_network(c.strip(), strict=False))
        except ValueError:
            raise UserError(f"--allow-net {c!r}: not a network; use CIDR like 127.0.0.0/8 or 10.1.2.3/32") from None
    return nets


@dataclass(frozen=True)
class AddressPolicy:
    """Which resolved addresses may be contacted: global unicast always; the rest (loopback,
    private, link-local, multicast, reserved, CGNAT ...) only with allow_private or when
    inside one of `allowed` networks."""

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
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
        if self.allow_private:
            return True
        if any(ip.version == net.version and ip in net for net in self.allowed):
            return True
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
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if self._policy.permits(r["host"])]
        if not allowed:
            raise BlockedAddress(host, [r["host"] for r in results])
        return allowed

    async def close(self) -> None:
        await self._inner.close()


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


@dataclass
class FetcherStats:
    requests: int = 0
    retries: int = 0
    host_pauses: int = 0
    hosts_given_up: int = 0
    bytes_in: int = 0


class Fetcher:
    """One aiohttp session for a whole run. Use as `async with Fetcher(cfg) as f: await f.fetch(url)`."""

    def __init__(self, cfg: NetConfig, *, seed: int | None = None) -> None:
        self.cfg = cfg
        self.policy = AddressPolicy.from_config(cfg)
        self.stats = FetcherStats()
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
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, self.cfg.timeout),
                                        sock_read=self.cfg.timeout)
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
        host_name = (URL(url).host or "").lower() if _parsable(url) else ""
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
                async with self._global:
                    outcome = await self._attempt(url)
            if outcome.sent:
                attempts += 1
                self.stats.requests += 1
            outcome.result.attempts = attempts
            last = outcome.result
            self._after_attempt(host_name, host, outcome)
            if not outcome.retry or attempts > self.cfg.retries:
                return last
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
        """One attempt: every hop of it within one deadline, outcomes instead of exceptions."""
        hops = _Hops(url)
        try:
            async with asyncio.timeout(self.cfg.timeout):  # no extra task, unlike wait_for
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
            return _Attempt(Download("connection_error", None, hops.http_status, 0, f"invalid URL: {_brief(exc)}",
                                     hops.current))
        except (aiohttp.ClientError, OSError) as exc:
            return _Attempt(Download("connection_error", None, hops.http_status, 0, _brief(exc), hops.current),
                            retry=True, host_failure=True)

    async def _follow(self, hops: _Hops) -> _Attempt:
        """Request, and follow redirects by hand so that every hop's address is checked."""
        assert self._session is not None, "use Fetcher as an async context manager"
        for _hop in range(self.cfg.max_redirects + 1):
            target = URL(hops.current)
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
                return await self._final_response(resp, hops.current)
        return _Attempt(Download("http_error", None, hops.http_status, 0,
                                 f"more than {self.cfg.max_redirects} redirects", hops.current))

    async def _final_response(self, resp: aiohttp.ClientResponse, url: str) -> _Attempt:
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
            body = await resp.read()  # the parser stops at Content-Length: one read, no chunk loop
        else:
            buffer = bytearray()
            # Counted after Content-Encoding is undone, so a gzip bomb stops at the limit too.
            async for chunk in resp.content.iter_chunked(_READ_CHUNK):
                buffer += chunk
                if len(buffer) > limit:
                    resp.close()  # drop the connection rather than drain the rest
                    return _Attempt(Download("too_large", None, status, 0,
                                             f"body exceeds --max-bytes {limit}", url))
            body = bytes(buffer)
        self.stats.bytes_in += len(body)
        return _Attempt(Download("ok", body, status, 0, None, url))


def _parsable(url: str) -> bool:
    try:
        URL(url)
    except (ValueError, TypeError):
        return False
    return True


def _brief(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    name = type(exc).__name__
    return f"{name}: {msg}"[:300] if msg else name
