"""The image workers of `imatdata fetch`: child processes fed straight from the event loop.

Each worker is a child process (`python -m imatdata.imagepool`) joined to the parent by a
Unix socket pair. The loop writes a batch of bodies as raw bytes in one framed message and
reads the results back, pickled, on the same socket. There is nothing in between: no feeder
or result threads fighting the loop for the GIL and no pickling of the bodies (driving
`concurrent.futures`' process pool took 0.33 ms of the parent's CPU per 100 KB photo; this
takes 0.25, most of it the asyncio bookkeeping both share).

Bodies queue here and travel in small batches when a backlog builds up; at most two
batches per worker are in flight, so a worker never waits for its next batch. A decoder
that kills its worker (a hostile file can) costs only that worker's batches: the worker is
restarted, those bodies are retried one by one, and a body that kills a worker again is
recorded as decode_error. A worker exits when its socket closes, which is also what
happens when the parent dies (`kill -9` included), so no worker outlives a fetch.

Wire format, parent to worker: count (u32), count lengths (u32 each), the bodies back to
back. Worker to parent: length (u64), then a pickled list of `ImageResult`.
"""

from __future__ import annotations

import asyncio
import pickle
import signal
import socket
import struct
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field

from PIL import ImageFile

from imatdata import images as imagework
from imatdata.errors import UserError
from imatdata.images import ImageResult

_COUNT = struct.Struct("<I")
_RESULT = struct.Struct("<Q")


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
    task: asyncio.Task[None] | None = None
    answered: int = 0  # batches answered so far


class ImagePool:
    """`await pool.process(body)` runs `images.process_image` on one of `workers` processes."""

    def __init__(self, workers: int, max_side: int, max_pixels: int,
                 resize_filter: str = imagework.DEFAULT_RESIZE_FILTER, batch: int = 8) -> None:
        self.size = workers
        self.args = [str(max_side), str(max_pixels), resize_filter]
        self.batch = batch
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
            if w.task is not None:
                w.task.cancel()
            w.writer.close()  # the worker reads EOF and exits
        for w in self._workers:
            await _reap(w.proc)
        for item in self._queue:
            item.future.cancel()
        self._workers.clear()

    # -- internals ----------------------------------------------------------------------------

    async def _spawn(self) -> _Worker:
        parent, child = socket.socketpair()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "imatdata.imagepool", str(child.fileno()), *self.args],
                                    pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
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
                w.writer.write(_COUNT.pack(len(batch)) + struct.pack(f"<{len(batch)}I", *(len(i.body) for i in batch)))
                for item in batch:
                    w.writer.write(item.body)

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


def serve(fd: int, max_side: int, max_pixels: int, resize_filter: str) -> None:
    """A worker's life: read a batch, process it, answer; exit when the parent hangs up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a decode_error
    sock = socket.socket(fileno=fd)
    while True:
        head = _recv_exactly(sock, _COUNT.size)
        if head is None:
            return
        (count,) = _COUNT.unpack(head)
        lengths = struct.unpack(f"<{count}I", _recv_exactly(sock, 4 * count) or b"")
        data = _recv_exactly(sock, sum(lengths))
        if data is None:
            return
        view, bodies, at = memoryview(data), [], 0
        for n in lengths:
            bodies.append(bytes(view[at:at + n]))
            at += n
        payload = pickle.dumps(imagework.process_images(bodies, max_side, max_pixels, resize_filter),
                               protocol=pickle.HIGHEST_PROTOCOL)
        sock.sendall(_RESULT.pack(len(payload)))
        sock.sendall(payload)


if __name__ == "__main__":
    try:
        serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent went away mid-answer
