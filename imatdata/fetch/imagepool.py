"""The image workers of `imatdata fetch`: child processes fed straight from the event loop.

Each worker is a child process running `imatdata.fetch.imagepool.main` (`worker_command`)
joined to the parent by a Unix socket pair. The loop writes a batch of bodies as raw bytes in
one framed message and reads the results back, pickled, on the same socket. There is nothing
in between: no feeder or result threads fighting the loop for the GIL and no pickling of the
bodies (driving `concurrent.futures`' process pool took 0.33 ms of the parent's CPU per
100 KB photo; this takes 0.25, most of it the asyncio bookkeeping both share).

Bodies queue here and travel in small batches when a backlog builds up; at most two
batches per worker are in flight, so a worker never waits for its next batch. A decoder
that kills its worker (a hostile file can) costs only that worker's batches: the worker is
restarted, those bodies are retried one by one, and a body that kills a worker again is
recorded as decode_error. A worker exits when its socket closes, which is also what
happens when the parent dies (`kill -9` included), so no worker outlives a fetch.

Memory: `images.process_image` refuses an image whose decoding would cost more than
`max_decode_bytes` and decodes one costing over `images.HEAVY_DECODE_BYTES` only while
holding the pool's heavy slot: a POSIX record lock on one file shared by the pool's workers
(or by several pools, given the same `heavy_lock` path). So however many workers there are,
at most one decodes a large image (up to 128 MiB by default); each of the others decodes at
most 16 MiB. The OS drops the lock of a worker that dies. After a large image or batch a
worker hands the freed memory back to the OS, so an idle worker stays near 30 MiB.

Workers start with `python -P`: the current directory is never on their `sys.path`, so a
`struct.py` (or any module named like one of the standard library's) in the directory a
fetch runs from is never imported.

Wire format, parent to worker: count (u32), count lengths (u32 each), the bodies back to
back. Worker to parent: length (u64), then a pickled list of `ImageResult`.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import ImageFile

from imatdata.fetch import images as imagework
from imatdata.errors import UserError
from imatdata.fetch.images import ImageResult

_COUNT = struct.Struct("<I")
_RESULT = struct.Struct("<Q")
# Bodies go to a worker a slice at a time, each slice written only when the socket has taken
# the last: the transport copies whatever the socket does not take at once, so a large body
# written whole would be held twice in the event loop's process.
_SEND_SLICE = 256 * 1024


@dataclass
class _Item:
    body: bytes
    future: asyncio.Future[ImageResult]
    tries: int = 0  # times a worker died while this body was in flight


@dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    in_flight: deque[list[_Item]] = field(default_factory=deque)
    outbox: deque[list[_Item]] = field(default_factory=deque)  # in flight, not yet written
    task: asyncio.Task[None] | None = None
    sender: asyncio.Task[None] | None = None
    answered: int = 0  # batches answered so far


class ImagePool:
    """`await pool.process(body)` runs `images.process_image` on one of `workers` processes."""

    def __init__(self, workers: int, max_side: int, max_pixels: int,
                 resize_filter: str = imagework.DEFAULT_RESIZE_FILTER, batch: int = 8,
                 max_decode_bytes: int = imagework.DEFAULT_MAX_DECODE_BYTES,
                 heavy_lock: str | os.PathLike[str] | None = None) -> None:
        self.size = workers
        self.args = [str(max_side), str(max_pixels), resize_filter, str(max_decode_bytes)]
        self.batch = batch
        # The file whose lock is the heavy slot: private to this pool (an unnamed temporary
        # file) unless a path shares it with other pools, e.g. those of other fetch loops.
        self._lock_file: IO[bytes] = tempfile.TemporaryFile() if heavy_lock is None else open(heavy_lock, "a+b")
        self.restarts = 0
        self._queue: deque[_Item] = deque()
        self._workers: list[_Worker] = []
        self._closed = False

    async def start(self) -> None:
        """Start the workers now (they import Pillow while the input is read)."""
        while len(self._workers) < self.size:
            self._workers.append(await self._spawn())

    async def process(self, body: bytes) -> ImageResult:
        item = _Item(body, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._pump()
        return await item.future

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    async def close(self) -> None:
        self._closed = True
        for w in self._workers:
            for task in (w.task, w.sender):
                if task is not None:
                    task.cancel()
            w.writer.close()  # the worker reads EOF and exits
        for w in self._workers:
            await _reap(w.proc)
        for item in self._queue:
            item.future.cancel()
        self._workers.clear()
        self._lock_file.close()

    # -- internals ----------------------------------------------------------------------------

    async def _spawn(self) -> _Worker:
        parent, child = socket.socketpair()
        lock_fd = self._lock_file.fileno()
        try:
            proc = subprocess.Popen(worker_command(str(child.fileno()), str(lock_fd), *self.args),
                                    pass_fds=(child.fileno(), lock_fd), stdin=subprocess.DEVNULL)
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=2**20)
        worker = _Worker(proc, reader, writer)
        worker.task = asyncio.create_task(self._read(worker))
        return worker

    def _pump(self) -> None:
        """Send what waits to workers with room, spread over them; batch only a backlog."""
        for w in self._workers:
            while self._queue and len(w.in_flight) < 2 and not w.writer.is_closing():
                if any(item.tries for batch in w.in_flight for item in batch):
                    break  # a suspect body has its worker to itself
                free = sum(2 - len(x.in_flight) for x in self._workers) or 1
                size = max(1, min(self.batch, -(-len(self._queue) // free)))
                if self._queue[0].tries:
                    if w.in_flight:
                        break
                    size = 1  # a body whose worker died travels alone, so a crash names it
                batch = []
                while self._queue and len(batch) < size:
                    item = self._queue.popleft()
                    if not item.future.done():  # its row may have been cancelled
                        batch.append(item)
                if not batch:
                    continue
                w.in_flight.append(batch)
                w.outbox.append(batch)
                if w.sender is None or w.sender.done():
                    w.sender = asyncio.create_task(self._send(w))

    async def _send(self, w: _Worker) -> None:
        """Write `w.outbox`'s batches in order, a slice at a time (`_SEND_SLICE`)."""
        try:
            while w.outbox:
                batch = w.outbox.popleft()
                w.writer.write(_COUNT.pack(len(batch)) + struct.pack(f"<{len(batch)}I", *(len(i.body) for i in batch)))
                for item in batch:
                    view = memoryview(item.body)
                    for start in range(0, len(view), _SEND_SLICE):
                        w.writer.write(view[start:start + _SEND_SLICE])
                        await w.writer.drain()
                    del view
        except ConnectionError:
            return  # the worker died: `_read` sees it and retries what was in flight

    async def _read(self, w: _Worker) -> None:
        try:
            while True:
                (length,) = _RESULT.unpack(await w.reader.readexactly(_RESULT.size))
                results: list[ImageResult] = pickle.loads(await w.reader.readexactly(length))
                for item, result in zip(w.in_flight.popleft(), results):
                    if not item.future.done():
                        item.future.set_result(result)
                w.answered += 1
                self._pump()
        except (asyncio.IncompleteReadError, ConnectionError):
            if self._closed:
                return
            try:
                await self._replace(w)
            except Exception as exc:
                self._fail(w, exc)
        except Exception as exc:  # a bug, not a hostile file: fail the rows, the run stops
            self._fail(w, exc)

    def _fail(self, w: _Worker, exc: Exception) -> None:
        for batch in w.in_flight:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)

    async def _replace(self, w: _Worker) -> None:
        """The worker died mid-batch: start another and retry its bodies one by one."""
        if w.sender is not None:
            w.sender.cancel()
        w.outbox.clear()
        w.writer.close()
        await _reap(w.proc)
        code = w.proc.returncode
        if code is not None and code > 0 and not w.answered:
            # Python itself failed (a broken install, say), not a decoder killed by a file.
            raise UserError(f"an image worker exited with code {code} before its first answer "
                            "(its error is printed above); check the installation and rerun to resume")
        self.restarts += 1
        lost = [item for batch in w.in_flight for item in batch if not item.future.done()]
        w.in_flight.clear()
        for item in reversed(lost):
            if item.tries >= 1:
                item.future.set_result(ImageResult("decode_error", "the decoder crashed on this file",
                                                   orig_bytes=len(item.body)))
            else:
                item.tries += 1
                self._queue.appendleft(item)
        self._workers[self._workers.index(w)] = await self._spawn()
        self._pump()


# The folder that holds the imatdata package (this file is imatdata/fetch/imagepool.py),
# appended (not prepended) to a worker's sys.path: the standard library and site-packages
# come first, so it matters only when imatdata runs from a checkout that is not installed,
# and shadows nothing.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_BOOT = ("import sys; p = sys.argv.pop(1); p in sys.path or sys.path.append(p); "
         "from imatdata.fetch.imagepool import main; main()")


def worker_command(*args: str) -> list[str]:
    """The argv of an image worker. `-P` (not `-m`, which puts the current directory first on
    sys.path) keeps the directory fetch runs from out of the import path; unlike `-I` it keeps
    PYTHONPATH and the user's site-packages, so the worker imports what its parent does."""
    return [sys.executable, "-P", "-c", _BOOT, _PACKAGE_PARENT, *args]


async def _reap(proc: subprocess.Popen[bytes]) -> None:
    for _ in range(50):  # up to 5 s for the worker to finish its batch and see EOF
        if proc.poll() is not None:
            return
        await asyncio.sleep(0.1)
    proc.kill()
    proc.wait()


# --- the worker side ------------------------------------------------------------------------------


def _recv_exactly(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf


@contextmanager
def heavy_slot(lock_fd: int) -> Iterator[None]:
    """Hold the pool's heavy slot (see the module's docstring) while decoding a large image.
    lockf locks belong to the process, so workers sharing one open file still exclude each
    other, and a worker killed mid-decode releases the slot."""
    import fcntl

    fcntl.lockf(lock_fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        _give_back_memory()
        fcntl.lockf(lock_fd, fcntl.LOCK_UN)


def _give_back_memory() -> None:
    """Return freed heap pages to the OS (glibc's malloc_trim): after a large image the
    allocator would otherwise keep up to ~100 MiB of it, in every worker that had one, and
    the heavy slot would bound the decoding but not the resident memory."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None
_TRIM_AFTER_BYTES = 8 * 1024 * 1024


def serve(fd: int, max_side: int, max_pixels: int, resize_filter: str,
          max_decode_bytes: int = imagework.DEFAULT_MAX_DECODE_BYTES, lock_fd: int | None = None) -> None:
    """A worker's life: read a batch, process it, answer; exit when the parent hangs up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a decode_error
    heavy = (lambda: heavy_slot(lock_fd)) if lock_fd is not None else nullcontext
    sock = socket.socket(fileno=fd)
    while True:
        head = _recv_exactly(sock, _COUNT.size)
        if head is None:
            return
        (count,) = _COUNT.unpack(head)
        lengths = struct.unpack(f"<{count}I", _recv_exactly(sock, 4 * count) or b"")
        bodies = []
        for n in lengths:  # one body at a time: a batch is never held twice
            buf = _recv_exactly(sock, n)
            if buf is None:
                return
            bodies.append(buf)  # processed as received: a bytes() copy would hold it twice
            del buf  # or it outlives the batch, and the next body is received beside it
        payload = pickle.dumps(imagework.process_images(bodies, max_side, max_pixels, resize_filter,
                                                        max_decode_bytes, heavy), protocol=pickle.HIGHEST_PROTOCOL)
        sock.sendall(_RESULT.pack(len(payload)))
        sock.sendall(payload)
        if sum(lengths) > _TRIM_AFTER_BYTES:
            del bodies, payload
            _give_back_memory()  # an idle worker should not keep a large batch's pages


def main() -> None:
    """Entry point of `worker_command`: socket fd, lock fd, max_side, max_pixels, filter, bytes."""
    sock_fd, lock_fd, max_side, max_pixels, resize_filter, max_decode_bytes = sys.argv[1:7]
    try:
        serve(int(sock_fd), int(max_side), int(max_pixels), resize_filter, int(max_decode_bytes), int(lock_fd))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent went away mid-answer


if __name__ == "__main__":
    main()
