"""A local fault-injecting image server over a catalogue, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from imatsample.catalogue import HOSTS, MIB, Catalogue, Item
# --------------------------------------------------------------------------------------------
# server


def _running_in(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _host_name(host_header: str | None) -> str:
    """'127.0.0.1:8080' -> '127.0.0.1', '[::1]:80' -> '::1', 'localhost' -> 'localhost'."""
    if not host_header:
        return ""
    return urlsplit("//" + host_header).hostname or host_header


class SampleServer:
    """An aiohttp server on 127.0.0.1 (and ::1 when available) at an ephemeral port.

    Instrumentation: `counter[path]` requests per path (query excluded), `request_times[path]`
    their time.monotonic() arrival times, `max_concurrency(host)` peak in-flight requests per
    Host header name. Stateful faults (503/429 then success) count from `reset_counters()`.
    `track_paths=False` keeps per-path records for catalogue items only, so a million
    /tiny/{i}.jpg requests do not grow the server's memory (they count under "/tiny/*").
    """

    def __init__(self, catalogue: Catalogue, *, shutdown_timeout: float = 0.5,
                 track_paths: bool = True) -> None:
        self.catalogue = catalogue
        self.track_paths = track_paths
        self.port: int = 0
        self.counter: Counter[str] = Counter()
        self.request_times: dict[str, list[float]] = defaultdict(list)
        self._inflight: Counter[str] = Counter()
        self._peak: Counter[str] = Counter()
        self._peak_all = 0
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ipv6 = False

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> SampleServer:
        self._closing = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=self._shutdown_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # aiohttp has no public accessor for the bound port
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        # Where localhost resolves to ::1 first, clients must find us there too.
        try:
            site6 = web.TCPSite(self._runner, "::1", self.port)
            await site6.start()
            self.ipv6 = True
        except OSError:
            self.ipv6 = False
        return self

    async def close(self) -> None:
        if self._closing is not None:
            self._closing.set()  # lets trickles stop at once
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SampleServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- addresses and instrumentation -----------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str, host: str = HOSTS[0]) -> str:
        if not path.startswith("/"):
            path = "/" + path
        if ":" in host:  # an IPv6 literal such as ::1
            host = f"[{host}]"
        return f"http://{host}:{self.port}{path}"

    def item_url(self, item: Item) -> str:
        return self.url(item.url_path, item.host)

    def max_concurrency(self, host: str | None = None) -> int:
        """Peak in-flight requests whose Host header names `host` (all hosts when None)."""
        return self._peak_all if host is None else self._peak[host]

    @property
    def total_requests(self) -> int:
        return sum(self.counter.values())

    def reset_counters(self) -> None:
        """Forget requests seen so far (503/429 sequences start over). Safe from any thread."""
        loop = self._loop
        if loop is not None and loop.is_running() and not _running_in(loop):
            # serve_in_thread: clear on the server's own loop, between two requests.
            asyncio.run_coroutine_threadsafe(self._clear_counters_async(), loop).result(timeout=10)
            return
        self._clear_counters()

    async def _clear_counters_async(self) -> None:
        self._clear_counters()

    def _clear_counters(self) -> None:
        self.counter.clear()
        self.request_times.clear()
        self._peak.clear()
        self._peak_all = 0

    # -- handling ---------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        host = _host_name(request.host)
        key = path if self.track_paths or path in self.catalogue.by_path else self._bucket(path)
        self.counter[key] += 1
        nth = self.counter[key]
        if self.track_paths:
            self.request_times[key].append(time.monotonic())
        self._inflight[host] += 1
        self._peak[host] = max(self._peak[host], self._inflight[host])
        self._peak_all = max(self._peak_all, sum(self._inflight.values()))
        try:
            item = self.catalogue.resolve(path)
            if item is None:
                return web.Response(status=404, text="no such sample\n")
            return await self._respond(request, item, nth)
        finally:
            self._inflight[host] -= 1

    def _bucket(self, path: str) -> str:
        for rng in self.catalogue.ranges:
            if path.startswith(rng.prefix):
                return rng.prefix + "*"
        return "*"

    async def _respond(self, request: web.Request, item: Item, nth: int) -> web.StreamResponse:
        p = item.params
        fault = item.fault
        if fault in ("flaky_503", "rate_429") and nth <= int(p.get("fail_first", 1)):
            headers = {}
            if "retry_after" in p:
                headers["Retry-After"] = str(p["retry_after"])
            return web.Response(status=int(p.get("fail_status", 503)), text="try again later\n",
                                headers=headers)
        if fault == "redirect":
            return web.Response(status=item.status or 302, headers={"Location": f"http://{request.host}{p['target']}"})
        if fault == "redirect_private":
            return web.Response(status=item.status or 302, headers={"Location": p["location"]})
        if fault == "reset":
            return await self._reset_connection(request, item)
        if fault == "trickle":
            return await self._trickle(request, item)
        if fault == "stall":
            await self._idle(float(p.get("max_seconds", 60.0)))
        if fault in ("oversize", "oversize_chunked"):
            return await self._oversize(request, item)
        headers = {"Content-Type": item.content_type, **item.headers}
        return web.Response(status=item.status, body=item.body or b"", headers=headers)

    async def _reset_connection(self, request: web.Request, item: Item) -> web.StreamResponse:
        body = item.body or b""
        resp = web.StreamResponse(status=200, headers={"Content-Type": item.content_type})
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: int(len(body) * float(item.params.get("cut_at", 0.5)))])
        await asyncio.sleep(0.05)  # let the first half reach the client before the RST
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER 0 turns close into a TCP RST: a real "connection reset by peer".
                # (Windows wants two u_shorts; an abort there resets the connection anyway.)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            transport.abort()
        return resp

    async def _idle(self, seconds: float) -> None:
        """Sleep, but wake at once when the server closes."""
        assert self._closing is not None
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _trickle(self, request: web.Request, item: Item) -> web.StreamResponse:
        body = item.body or b""
        interval = float(item.params.get("interval", 0.2))
        deadline = time.monotonic() + float(item.params.get("max_seconds", 60.0))
        resp = web.StreamResponse(status=200, headers={"Content-Type": item.content_type})
        resp.content_length = len(body)
        await resp.prepare(request)
        assert self._closing is not None
        try:
            for i in range(len(body)):
                if time.monotonic() > deadline or self._closing.is_set():
                    break
                await resp.write(body[i:i + 1])
                if i == len(body) - 1:
                    break  # no pause after the last byte: in-flight ends when the client has it all
                await self._idle(interval)
        except (ConnectionError, RuntimeError):
            pass  # the client gave up, as it should
        return resp

    async def _oversize(self, request: web.Request, item: Item) -> web.StreamResponse:
        total = int(item.params.get("total_bytes", 25 * MIB))
        resp = web.StreamResponse(status=200, headers={"Content-Type": item.content_type})
        if not item.params.get("chunked", False):
            resp.content_length = total
        await resp.prepare(request)
        # A JPEG header then filler, generated chunk by chunk rather than held whole.
        head = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
        chunk = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        try:
            await resp.write(head)
            sent = len(head)
            while sent < total:
                piece = chunk[: min(len(chunk), total - sent)]
                await resp.write(piece)
                sent += len(piece)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return resp


@contextmanager
def serve_in_thread(catalogue: Catalogue, *, start_timeout: float = 15.0,
                    **server_kw: Any) -> Iterator[SampleServer]:
    """A started SampleServer running on its own event loop in a daemon thread.

    For sync tests, benchmarks and CLI subprocess tests; `server_kw` go to SampleServer
    (e.g. track_paths=False). The counters may be read from the calling thread: they are
    only written by the server's loop, and a test reads them after its requests are done.
    """
    loop = asyncio.new_event_loop()
    srv = SampleServer(catalogue, **server_kw)
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(srv.start())
        except BaseException as exc:  # surfaced to the caller below
            failure.append(exc)
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="imat-sample-server", daemon=True)
    thread.start()
    if not ready.wait(start_timeout):
        raise RuntimeError("sample server did not start in time")
    if failure:
        raise RuntimeError("sample server failed to start") from failure[0]
    try:
        yield srv
    finally:
        asyncio.run_coroutine_threadsafe(srv.close(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
