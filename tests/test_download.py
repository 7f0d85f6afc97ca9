"""The downloader against the real sample server on 127.0.0.1: faults, retries, caps, SSRF."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from email.utils import formatdate

import pytest

from imatdata.fetch.download import (AddressPolicy, ByteBudget, Fetcher, GuardedResolver, NetConfig, _rfc6052_ipv4,
                               backoff_delay, canonical_host, embedded_ipv4, literal_ip, parse_retry_after,
                               robots_opt_out)
from imatdata.errors import UserError
from imatsample import Catalogue, Item, SampleServer, build_catalogue, encode, render_product

LOOPBACK = ("127.0.0.0/8", "::1/128")


def cfg(**kw) -> NetConfig:
    base = dict(timeout=2.0, retries=2, allow_nets=LOOPBACK, backoff_base=0.05, backoff_cap=0.2)
    base.update(kw)
    return NetConfig(**base)


@pytest.fixture(scope="module")
def faults() -> Catalogue:
    return build_catalogue("faults", seed=0)


def jpeg(seed: int = 0) -> bytes:
    import random

    return encode(render_product(3, random.Random(seed), 48), "jpeg")


# --- pure helpers ---------------------------------------------------------------------------


def test_robots_opt_out_rules() -> None:
    assert robots_opt_out(["noai"], "imat") == "noai"
    assert robots_opt_out(["noindex, nofollow"], "imat") == "noindex"
    assert robots_opt_out(["NoImageAI"], "imat") == "noimageai"
    assert robots_opt_out(["imat: noimageindex"], "imat") == "noimageindex"
    assert robots_opt_out(["otherbot: noai"], "imat") is None
    assert robots_opt_out(["otherbot: noai", "imat: noai"], "imat") == "noai"
    assert robots_opt_out(["nofollow", "max-image-preview: large"], "imat") is None
    assert robots_opt_out(["unavailable_after: 25 Jun 2010 15:00:00 PST"], "imat") is None
    assert robots_opt_out([], "imat") is None


def test_retry_after_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    assert 9 <= parse_retry_after(formatdate(now + 10, usegmt=True), now=now) <= 10.5
    assert parse_retry_after(formatdate(now - 100, usegmt=True), now=now) == 0.0


def test_backoff_is_full_jitter_and_capped() -> None:
    import random

    rng = random.Random(1)
    delays = [backoff_delay(3, 1.0, 30.0, rng) for _ in range(500)]
    assert 0 <= min(delays) < 0.5 and 3.0 < max(delays) <= 4.0
    assert max(backoff_delay(20, 1.0, 30.0, rng) for _ in range(100)) <= 30.0


def test_address_policy() -> None:
    deny = AddressPolicy()
    for addr in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "224.0.0.1",
                 "::1", "fe80::1", "::ffff:10.0.0.1", "100.64.0.1", "0.0.0.0"):
        assert not deny.permits(addr), addr
    for addr in ("93.184.216.34", "2606:4700::1111"):
        assert deny.permits(addr), addr
    loop_only = AddressPolicy.from_config(cfg())
    assert loop_only.permits("127.0.0.1") and loop_only.permits("127.5.5.5") and loop_only.permits("::1")
    assert not loop_only.permits("10.255.255.1") and not loop_only.permits("169.254.169.254")
    assert AddressPolicy(allow_private=True).permits("10.0.0.1")
    assert literal_ip("[::1]") == "::1" and literal_ip("127.0.0.1") == "127.0.0.1" and literal_ip("a.com") is None
    with pytest.raises(UserError, match="--allow-net"):
        NetConfig(allow_nets=("not-a-net",))


# --- against the server -----------------------------------------------------------------------


async def fetch_one(catalogue: Catalogue, kind: str, config: NetConfig) -> tuple:
    async with SampleServer(catalogue) as srv:
        item = catalogue.one(kind=kind)
        async with Fetcher(config) as f:
            d = await f.fetch(srv.item_url(item))
        return d, srv.counter[item.path], srv.request_times[item.path]


@pytest.mark.parametrize("kind, status, attempts", [
    ("http_404", "http_error", 1),
    ("http_403", "http_error", 1),
    ("http_500", "http_error", 3),
    ("flaky_503", "ok", 3),
    ("reset", "connection_error", 3),
    ("html", "ok", 1),  # the downloader moves bytes; judging them is the image work's job
    ("oversize", "too_large", 1),
    ("oversize_chunked", "too_large", 1),
    ("gzip_bomb", "too_large", 1),
    ("noai", "opted_out", 1),
    ("redirect", "ok", 1),
    ("empty", "ok", 1),
])
async def test_fault_outcomes(faults: Catalogue, kind: str, status: str, attempts: int) -> None:
    d, requests, _ = await fetch_one(faults, kind, cfg())
    assert (d.status, d.attempts) == (status, attempts), d.error
    if kind not in ("redirect",):
        assert requests == attempts  # server-side count: every attempt was one request


async def test_gzip_body_is_decoded(faults: Catalogue) -> None:
    d, _, _ = await fetch_one(faults, "gzip", cfg())
    item = faults.one(kind="gzip")
    assert d.status == "ok" and len(d.body) == item.params["decoded_length"]
    assert d.body.startswith(b"\xff\xd8")


async def test_retry_after_is_honoured(faults: Catalogue) -> None:
    # 429 with Retry-After: 1, then 200: the retry waits at least a second, not the jitter.
    d, requests, times = await fetch_one(faults, "rate_429", cfg(backoff_base=0.01))
    assert d.status == "ok" and d.attempts == 2 and requests == 2
    assert times[1] - times[0] >= 0.95


async def test_no_retries_when_retries_zero(faults: Catalogue) -> None:
    d, requests, _ = await fetch_one(faults, "flaky_503", cfg(retries=0))
    assert (d.status, d.http_status, d.attempts, requests) == ("http_error", 503, 1, 1)


async def test_trickle_hits_the_whole_attempt_deadline(faults: Catalogue) -> None:
    t = time.monotonic()
    d, requests, _ = await fetch_one(faults, "trickle", cfg(timeout=0.6, retries=1))
    elapsed = time.monotonic() - t
    assert d.status == "timeout" and d.attempts == 2 and requests == 2
    assert 1.1 < elapsed < 4.0  # two attempts of 0.6 s each, bytes kept arriving all along


async def test_loopback_refused_without_any_request(faults: Catalogue) -> None:
    item = faults.one(kind="jpeg")
    async with SampleServer(faults) as srv:
        async with Fetcher(NetConfig(timeout=2.0)) as f:
            by_ip = await f.fetch(srv.url(item.url_path, "127.0.0.1"))
            by_name = await f.fetch(srv.url(item.url_path, "localhost"))  # refused at DNS time
            v6 = await f.fetch(f"http://[::1]:{srv.port}{item.path}")
        assert [d.status for d in (by_ip, by_name, v6)] == ["blocked"] * 3
        assert [d.attempts for d in (by_ip, by_name, v6)] == [0, 0, 0]
        assert srv.total_requests == 0


async def test_private_redirect_refused_before_connecting(faults: Catalogue) -> None:
    d, requests, _ = await fetch_one(faults, "redirect_private", cfg())
    assert d.status == "blocked" and d.http_status == 302 and "10.255.255.1" in d.error
    assert requests == 1 and d.attempts == 1  # only the redirect itself; never retried


async def test_redirect_loop_and_bad_scheme() -> None:
    cat = Catalogue(kind="t", seed=0)
    cat.add(Item(id="loop", path="/loop", split="train", label=1, body=None, fault="redirect",
                 status=302, params={"target": "/loop"}))
    cat.add(Item(id="ftp", path="/ftp", split="train", label=1, body=None, fault="redirect_private",
                 status=301, params={"location": "ftp://127.0.0.1/x.jpg"}))
    async with SampleServer(cat) as srv:
        async with Fetcher(cfg(max_redirects=4)) as f:
            loop = await f.fetch(srv.url("/loop"))
            ftp = await f.fetch(srv.url("/ftp"))
        assert loop.status == "http_error" and "redirects" in loop.error and srv.counter["/loop"] == 5
        assert ftp.status == "blocked" and srv.counter["/ftp"] == 1


async def test_opt_out_variants_and_ignore() -> None:
    cat = Catalogue(kind="t", seed=0)
    body = jpeg()
    for name, header in (("all", "noimageai"), ("us", "imat: noindex"), ("other", "googlebot: noai")):
        cat.add(Item(id=name, path=f"/{name}", split="train", label=1, body=body, headers={"X-Robots-Tag": header}))
    async with SampleServer(cat) as srv:
        async with Fetcher(cfg()) as f:
            got = {n: (await f.fetch(srv.url(f"/{n}"))).status for n in ("all", "us", "other")}
        async with Fetcher(cfg(ignore_optout=True)) as f:
            ignored = (await f.fetch(srv.url("/all"))).status
        async with Fetcher(cfg(user_agent="otherbot/2.0")) as f:
            renamed = (await f.fetch(srv.url("/us"))).status
    assert got == {"all": "opted_out", "us": "opted_out", "other": "ok"}
    assert ignored == "ok" and renamed == "ok"


async def test_max_bytes_streaming_cap() -> None:
    cat = Catalogue(kind="t", seed=0)
    cat.add(Item(id="big", path="/big", split="train", label=1, body=None, fault="oversize_chunked",
                 params={"total_bytes": 300_000, "chunked": True}))
    cat.add(Item(id="fits", path="/fits", split="train", label=1, body=b"\xff\xd8\xff" + bytes(1000)))
    async with SampleServer(cat) as srv:
        async with Fetcher(cfg(max_bytes=100_000)) as f:
            big, fits = await f.fetch(srv.url("/big")), await f.fetch(srv.url("/fits"))
    assert big.status == "too_large" and "100000" in big.error
    assert fits.status == "ok" and len(fits.body) == 1003


async def test_per_host_and_global_caps_hold() -> None:
    cat = Catalogue(kind="t", seed=0)
    for i in range(24):
        # Each response trickles 4 bytes 0.08 s apart, so requests overlap.
        cat.add(Item(id=f"s{i}", path=f"/slow/{i}", split="train", label=1, body=b"abcd", fault="trickle",
                     host="127.0.0.1" if i % 2 else "localhost", params={"interval": 0.08, "max_seconds": 5}))
    async with SampleServer(cat) as srv:
        async with Fetcher(cfg(per_host=3, concurrency=5)) as f:
            results = await asyncio.gather(*(f.fetch(srv.item_url(it)) for it in cat.listed()))
        assert all(r.status == "ok" for r in results)
        assert srv.max_concurrency("127.0.0.1") == 3 and srv.max_concurrency("localhost") == 3
        assert srv.max_concurrency() == 5


async def test_dead_host_is_given_up_not_retried_forever() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: connections are refused
    config = cfg(retries=3, host_fail_threshold=3, host_pause_base=0.05, host_max_pauses=2, per_host=2)
    async with Fetcher(config) as f:
        t = time.monotonic()
        results = await asyncio.gather(*(f.fetch(f"http://127.0.0.1:{port}/{i}.jpg") for i in range(60)))
        elapsed = time.monotonic() - t
        stats = f.stats
    assert all(r.status == "connection_error" for r in results)
    assert stats.hosts_given_up == 1 and stats.host_pauses == 2
    # 60 rows x 4 attempts would be 240 requests; giving up on the host stops far earlier.
    assert stats.requests < 40, stats.requests
    assert any("given up" in (r.error or "") for r in results)
    assert elapsed < 5


async def test_certificate_failure_is_connection_error_not_retried(tmp_path) -> None:
    import ssl
    import subprocess

    from aiohttp import web

    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                           "-out", str(crt), "-days", "1", "-subj", "/CN=localhost"], capture_output=True)
    if made.returncode != 0:
        pytest.skip("openssl is not available to make a self-signed certificate")
    hits = []

    async def handle(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=jpeg(), content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, key)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with Fetcher(cfg()) as f:
            bad = await f.fetch(f"https://127.0.0.1:{port}/a.jpg")
        async with Fetcher(cfg(insecure=True)) as f:
            good = await f.fetch(f"https://127.0.0.1:{port}/a.jpg")
    finally:
        await runner.cleanup()
    assert bad.status == "connection_error" and bad.attempts == 1 and "certificate" in bad.error.lower()
    assert good.status == "ok" and hits == ["/a.jpg"]


# --- IPv6 forms that embed an IPv4 address (issue #14) ------------------------------------------

# (address, the IPv4 inside it is private): each form once with a private and a public IPv4.
EMBEDDED = [
    ("64:ff9b::10.0.0.1", True), ("64:ff9b::127.0.0.1", True), ("64:ff9b::8.8.8.8", False),  # NAT64
    ("64:ff9b:1::10.0.0.1", True),  # NAT64 local use: the /48../96 readings include 0.0.0.0
    ("64:ff9b:1:808:8:808:808:808", False),  # ... unless every reading is public (8.8.8.8 each)
    ("2002:a00:1::", True), ("2002:7f00:1::1", True), ("2002:808:808::1", False),  # 6to4
    ("::10.0.0.1", True), ("::127.0.0.1", True), ("::8.8.8.8", False),  # IPv4-compatible
    ("::ffff:0:10.0.0.1", True), ("::ffff:0:8.8.8.8", False),  # IPv4-translated
    ("::ffff:192.168.0.1", True), ("::ffff:8.8.8.8", False),  # IPv4-mapped
    # Teredo 2001:0:<server>:<flags>:<port>:<client XOR ffffffff>
    ("2001:0:808:808::f5ff:fffe", True),  # client 10.0.0.1
    ("2001:0:a00:1::f7f7:fbfb", True),  # server 10.0.0.1
    ("2001:0:808:808::f7f7:fbfb", False),  # server 8.8.8.8, client 8.8.4.4
]


def test_rfc6052_readings_match_the_rfc_examples() -> None:
    # RFC 6052 section 2.4: 192.0.2.33 under 2001:db8:122:344::/32../96
    for prefix_len, address in ((32, "2001:db8:c000:221::"), (40, "2001:db8:1c0:2:21::"),
                                (48, "2001:db8:122:c000:2:2100::"), (56, "2001:db8:122:3c0:0:221::"),
                                (64, "2001:db8:122:344:c0:2:2100:0"), (96, "2001:db8:122:344::192.0.2.33")):
        assert str(_rfc6052_ipv4(ipaddress.IPv6Address(address), prefix_len)) == "192.0.2.33", prefix_len
    teredo = embedded_ipv4(ipaddress.IPv6Address("2001:0:4136:e378:8000:63bf:3fff:fdd2"))
    assert [str(a) for a in teredo] == ["65.54.227.120", "192.0.2.45"]
    assert embedded_ipv4(ipaddress.IPv6Address("2606:4700::1111")) == []


@pytest.mark.parametrize("address, private", EMBEDDED)
def test_ipv6_forms_are_judged_by_the_ipv4_inside(address: str, private: bool) -> None:
    assert AddressPolicy().permits(address) is not private
    assert AddressPolicy(allow_private=True).permits(address)


def test_site_local_and_allow_net_with_embedded_ipv4() -> None:
    deny = AddressPolicy()
    assert not deny.permits("fec0::1") and not deny.permits("fec0:1:2::3")
    assert AddressPolicy(allow_private=True).permits("fec0::1")
    assert AddressPolicy.from_config(cfg(allow_nets=("fec0::/10",))).permits("fec0::1")
    # --allow-net names the IPv4 network: its embedded forms are allowed, others are not.
    loop = AddressPolicy.from_config(cfg(allow_nets=("127.0.0.0/8",)))
    for address in ("127.0.0.1", "::ffff:127.0.0.1", "64:ff9b::127.0.0.1", "2002:7f00:1::", "::127.0.0.1"):
        assert loop.permits(address), address
    for address in ("64:ff9b::10.0.0.1", "2002:a00:1::", "::ffff:10.0.0.1", "::1", "fec0::1"):
        assert not loop.permits(address), address
    # ... or the IPv6 network itself, whatever it carries.
    nat64 = AddressPolicy.from_config(cfg(allow_nets=("64:ff9b::/96",)))
    assert nat64.permits("64:ff9b::10.0.0.1") and not nat64.permits("2002:a00:1::")


class _FixedResolver:
    """An inner resolver answering every name with the given addresses."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict]:
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                 "proto": 0, "flags": 0} for a in self.addresses]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("address, private", EMBEDDED + [("fec0::1", True)])
async def test_resolver_drops_embedded_private_addresses(address: str, private: bool) -> None:
    from imatdata.fetch.download import BlockedAddress

    resolver = GuardedResolver(AddressPolicy(), _FixedResolver(address))
    if private:
        with pytest.raises(BlockedAddress):
            await resolver.resolve("sneaky.example", 80)
        # A public answer next to it is kept; the embedded private one is dropped.
        mixed = GuardedResolver(AddressPolicy(), _FixedResolver(address, "93.184.216.34"))
        assert [r["host"] for r in await mixed.resolve("sneaky.example", 80)] == ["93.184.216.34"]
    else:
        assert [r["host"] for r in await resolver.resolve("fine.example", 80)] == [address]


async def test_embedded_private_addresses_blocked_before_any_request(faults: Catalogue, monkeypatch) -> None:
    import imatdata.fetch.download as download

    private = [a for a, is_private in EMBEDDED if is_private] + ["fec0::1"]
    item = faults.one(kind="jpeg")
    async with SampleServer(faults) as srv:
        async with Fetcher(NetConfig(timeout=2.0)) as f:  # literal IPv6 URLs
            literal = [await f.fetch(f"http://[{a}]:{srv.port}{item.path}") for a in private]
        # Names whose DNS answer is such an address (the resolver path).
        answers = iter(private)
        monkeypatch.setattr(download, "DefaultResolver", lambda: _FixedResolver(next(answers)))
        named = []
        for _ in private:
            async with Fetcher(NetConfig(timeout=2.0)) as f:
                named.append(await f.fetch(f"http://host.example:{srv.port}{item.path}"))
        assert srv.total_requests == 0
    for address, d in zip(private + private, literal + named):
        assert (d.status, d.attempts) == ("blocked", 0), (address, d.status, d.error)


# --- numeric hosts, read as browsers read them (issue #18) ----------------------------------------


def test_canonical_host_reads_ipv4_as_whatwg_does() -> None:
    for host in ("127.1", "2130706433", "0x7f.1", "0x7F000001", "0177.0.0.1", "0177.0.0.01", "127.0.1", "127.0.0.1.",
                 "%31%32%37.1", "0x7f.0.0.0x1", "017700000001"):
        assert canonical_host(host) == "127.0.0.1", host
    assert canonical_host("1.2.3.4") == "1.2.3.4" and canonical_host("0x.0.0.0") == "0.0.0.0"
    assert canonical_host("Example.COM") == "example.com" and canonical_host("0xg.example") == "0xg.example"
    assert canonical_host("::ffff:7f00:1") == "::ffff:7f00:1"
    for host in ("256.0.0.1", "1.2.3.4.5", "4294967296", "0x100000000", "1.2.65536", "08.1", "1..2", "example.123",
                 "a b", "a%20b", "x<y", "a%zz"):
        with pytest.raises(ValueError):
            canonical_host(host)
    assert canonical_host("1.2.3.0x") == "1.2.3.0" == canonical_host("1.2.3.0x0")  # a bare 0x is 0


async def test_numeric_hosts_are_blocked_or_fetched_like_their_address(faults: Catalogue) -> None:
    item = faults.one(kind="jpeg")
    hosts = ["127.1", "2130706433", "0x7f.1", "0177.0.0.1", "[::ffff:127.0.0.1]"]
    async with SampleServer(faults) as srv:
        urls = [f"http://{h}:{srv.port}{item.path}" for h in hosts]
        async with Fetcher(NetConfig(timeout=2.0, retries=3)) as f:
            refused = [await f.fetch(u) for u in urls]
        assert srv.total_requests == 0
        async with Fetcher(cfg(allow_nets=("127.0.0.0/8",))) as f:
            fetched = [await f.fetch(u) for u in urls]
    assert [(d.status, d.attempts) for d in refused] == [("blocked", 0)] * len(hosts), [d.error for d in refused]
    assert all("127.0.0.1" in d.error or "7f00:1" in d.error for d in refused)
    assert [(d.status, d.attempts) for d in fetched] == [("ok", 1)] * len(hosts), [d.error for d in fetched]
    assert all(d.body == item.body for d in fetched) and srv.counter[item.path] == len(hosts)


async def test_trailing_dot_names_are_checked_like_the_name(faults: Catalogue) -> None:
    """`localhost.` (the fully qualified form), names under `.localhost` (RFC 6761: always
    loopback, never asked of DNS) and `127.0.0.1.` reach loopback as the bare names do:
    refused without an allowance, fetched with one."""
    item = faults.one(kind="jpeg")
    hosts = ["localhost.", "LocalHost.", "img.localhost.", "127.0.0.1.", "127.1."]
    assert canonical_host("127.1.") == "127.0.0.1" and canonical_host("LocalHost.") == "localhost."
    async with SampleServer(faults) as srv:
        urls = [f"http://{h}:{srv.port}{item.path}" for h in hosts]
        async with Fetcher(NetConfig(timeout=2.0, retries=3)) as f:
            refused = [await f.fetch(u) for u in urls]
        assert srv.total_requests == 0
        async with Fetcher(cfg(allow_nets=LOOPBACK)) as f:
            fetched = [await f.fetch(u) for u in urls]
    assert [(d.status, d.attempts) for d in refused] == [("blocked", 0)] * len(hosts), [d.error for d in refused]
    assert [(d.status, d.attempts) for d in fetched] == [("ok", 1)] * len(hosts), [d.error for d in fetched]
    assert srv.counter[item.path] == len(hosts)


@pytest.mark.parametrize("url", ["http://8.8.8.8.8/x.jpg", "http://256.1.1.1/x.jpg", "http://1.2.3.08/x.jpg",
                                 "http://a b/x.jpg", "http://[zz]/x.jpg", "http://:80/x.jpg",
                                 "http://images.example.99/x.jpg"])
async def test_unparsable_urls_are_invalid_not_transient(url: str) -> None:
    from imatdata.fetch import is_transient

    async with Fetcher(cfg(retries=3)) as f:
        d = await f.fetch(url)
        assert f.stats.requests == 0 and f.stats.retries == 0
    assert (d.status, d.attempts) == ("invalid", 0), d.error
    assert d.error.startswith("invalid URL") and not is_transient(d.status, d.http_status)


async def test_redirect_to_an_unparsable_url_is_a_plain_http_error() -> None:
    cat = Catalogue(kind="t", seed=0)
    cat.add(Item(id="r", path="/r", split="train", label=1, body=None, fault="redirect_private",
                 status=302, params={"location": "http://999.1.1.1/x.jpg"}))
    async with SampleServer(cat) as srv:
        async with Fetcher(cfg()) as f:
            d = await f.fetch(srv.url("/r"))
    assert (d.status, d.http_status, d.attempts) == ("http_error", 302, 1) and "redirect" in d.error


# --- the body budget (issue #14) --------------------------------------------------------------------

MIB = 1024 * 1024


async def test_budget_never_deadlocks_and_stays_within_limit_plus_one_body() -> None:
    budget = ByteBudget(8 * MIB)
    order: list[int] = []

    async def body(i: int, size: int) -> None:
        hold = budget.hold()
        await hold.resize(384 * 1024)
        while hold.n < size:  # a body without Content-Length, growing step by step
            await hold.resize(hold.n + MIB)
            await asyncio.sleep(0)
        await asyncio.sleep(0.005)  # the image work
        order.append(i)
        hold.release()

    # 30 bodies of 5 MiB each against 8 MiB: without the overdraft they would all stall half-read.
    await asyncio.wait_for(asyncio.gather(*(body(i, 5 * MIB) for i in range(30))), 20)
    assert sorted(order) == list(range(30)) and budget.held == 0
    assert 8 * MIB < budget.peak <= 8 * MIB + 5 * MIB + 384 * 1024
    # A body larger than the whole budget gets through on its own.
    await asyncio.wait_for(body(99, 12 * MIB), 5)
    assert budget.held == 0


async def test_budget_serves_in_order_and_survives_cancelled_waiters() -> None:
    budget = ByteBudget(4 * MIB)
    first = budget.hold()
    await first.resize(3 * MIB)
    big, small = budget.hold(), budget.hold()
    big_task = asyncio.create_task(big.resize(2 * MIB))
    await asyncio.sleep(0)
    small_task = asyncio.create_task(small.resize(MIB // 2))  # fits, but must not jump the queue
    cancelled = asyncio.create_task(budget.hold().resize(MIB))
    await asyncio.sleep(0.01)
    assert not big_task.done() and not small_task.done()
    cancelled.cancel()
    first.release()
    await asyncio.wait_for(asyncio.gather(big_task, small_task), 2)
    assert budget.held == 2 * MIB + MIB // 2
    big.release(), small.release()
    assert budget.held == 0 and not budget._waiters


async def test_waiting_for_the_budget_does_not_count_against_the_timeout() -> None:
    cat = Catalogue(kind="t", seed=0)
    body = b"\xff\xd8\xff" + bytes(700_000)
    for i in range(3):
        cat.add(Item(id=f"b{i}", path=f"/b{i}", split="train", label=1, body=body))  # with Content-Length
        cat.add(Item(id=f"c{i}", path=f"/c{i}", split="train", label=1, body=None, fault="oversize_chunked",
                     params={"total_bytes": 700_000, "chunked": True}))
    budget = ByteBudget(MIB)  # one body and a bit: the rows queue for it

    async def row(f: Fetcher, path: str):
        d = await f.fetch(srv.url(path))
        await asyncio.sleep(0.7)  # the body stays held (the image work) for longer than --timeout
        size = len(d.body or b"")
        d.release()
        return d, size

    async with SampleServer(cat) as srv:
        async with Fetcher(cfg(timeout=0.5, retries=0), budget=budget) as f:
            t = time.monotonic()
            results = await asyncio.gather(*(row(f, it.path) for it in cat.listed()))
            elapsed = time.monotonic() - t
    # Rows that got their headers, then waited for the budget longer than --timeout, are ok.
    assert [(d.status, d.attempts) for d, _ in results] == [("ok", 1)] * 6, [d.error for d, _ in results]
    assert all(size >= 700_000 for _, size in results)
    assert elapsed > 6 * 0.7 / 2, "bodies were held one or two at a time"
    assert budget.held == 0 and budget.peak <= MIB + 20 * MIB


# --- the save window (resume bound, issue #18) ------------------------------------------------------


async def test_window_unit_held_by_final_outcome_only(faults: Catalogue) -> None:
    window = asyncio.Semaphore(3)
    async with SampleServer(faults) as srv:
        async with Fetcher(cfg(), window=window) as f:
            flaky = await f.fetch(srv.item_url(faults.one(kind="flaky_503")))  # two retries first
            missing = await f.fetch(srv.item_url(faults.one(kind="http_404")))
    assert (flaky.status, flaky.attempts, missing.status) == ("ok", 3, "http_error")
    # Each final outcome keeps one unit for its caller; the retried attempts gave theirs back.
    assert flaky.saving is window and missing.saving is window and window._value == 1
    flaky.saving.release()
    missing.saving.release()
    async with Fetcher(cfg()) as f:
        assert (await f.fetch("http://[zz]/x.jpg")).saving is None  # no window, nothing held
