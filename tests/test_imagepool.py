"""The fetch image workers: real child processes, real image bytes, real kills."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from imatdata.fetch.imagepool import ImagePool
from imatdata.fetch.images import process_image
from imatsample import encode, render_product


def bodies() -> list[bytes]:
    photos = [encode(render_product(i, random.Random(i), 800).resize((800, 560 + 10 * i)), "jpeg") for i in range(5)]
    png = encode(render_product(9, random.Random(9), 300).convert("RGBA"), "png")
    return photos + [png, photos[0][: len(photos[0]) // 2], b"<html>no</html>", b""]


def test_results_match_the_in_process_image_work() -> None:
    data = bodies()

    async def run() -> list:
        pool = ImagePool(2, 512, 10**9, batch=3)
        await pool.start()
        try:
            return await asyncio.gather(*(pool.process(b) for b in data))
        finally:
            await pool.close()

    assert asyncio.run(run()) == [process_image(b, 512, 10**9) for b in data]


async def kill_worker_holding(pool: ImagePool, body: bytes) -> None:
    """SIGKILL the worker as soon as `body` is on its way to it (long before it can finish)."""
    while not any(item.body is body for w in pool._workers for batch in w.in_flight for item in batch):
        await asyncio.sleep(0.001)
    os.kill(next(w.proc.pid for w in pool._workers
                 if any(item.body is body for batch in w.in_flight for item in batch)), signal.SIGKILL)


def test_a_killed_worker_is_replaced_and_its_bodies_retried() -> None:
    big = encode(Image.new("RGB", (1800, 1400), (120, 30, 60)), "png")

    async def run() -> tuple[list, int]:
        pool = ImagePool(1, 512, 10**9, batch=4)
        await pool.start()
        try:
            tasks = [asyncio.ensure_future(pool.process(big)) for _ in range(5)]
            await kill_worker_holding(pool, big)
            return await asyncio.wait_for(asyncio.gather(*tasks), 120), pool.restarts
        finally:
            await pool.close()

    results, restarts = asyncio.run(run())
    assert restarts == 1
    assert [(r.status, r.width, r.height) for r in results] == [("ok", 512, 398)] * 5


def test_a_body_that_kills_its_worker_twice_is_a_decode_error() -> None:
    big = encode(Image.new("RGB", (2400, 1800), (10, 200, 60)), "png")
    small = encode(Image.new("RGB", (64, 48), (0, 0, 255)), "jpeg")

    async def run() -> tuple[list, int]:
        pool = ImagePool(1, 512, 10**9, batch=4)
        await pool.start()
        try:
            culprit = asyncio.ensure_future(pool.process(big))
            others = [asyncio.ensure_future(pool.process(small)) for _ in range(3)]
            for n in (1, 2):
                await kill_worker_holding(pool, big)
                while pool.restarts < n:
                    await asyncio.sleep(0.001)
            return await asyncio.wait_for(asyncio.gather(culprit, *others), 120), pool.restarts
        finally:
            await pool.close()

    (bad, *good), restarts = asyncio.run(run())
    assert restarts == 2
    assert bad.status == "decode_error" and "crashed" in bad.error
    assert all(r.status == "ok" and r.image == small for r in good)  # retried alone, unharmed


def test_workers_exit_when_the_pool_closes() -> None:
    async def run() -> list[int]:
        pool = ImagePool(2, 512, 10**9)
        await pool.start()
        pids = pool.pids()
        await pool.close()
        return pids

    pids = asyncio.run(run())
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.05)
    assert not alive


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_worker_that_fails_as_a_program_stops_the_run_with_a_clear_error() -> None:
    import pytest

    from imatdata.errors import UserError

    async def run() -> None:
        pool = ImagePool(1, 512, "many")  # type: ignore[arg-type]  # the worker cannot start: exit 1
        await pool.start()
        try:
            await asyncio.wait_for(pool.process(encode(Image.new("RGB", (900, 700)), "png")), 60)
        finally:
            await pool.close()

    with pytest.raises(UserError, match="exited with code 1 before its first answer"):
        asyncio.run(run())


def test_heavy_images_wait_for_the_pool_s_heavy_slot() -> None:
    """A large image is decoded only while its worker holds the slot; a small one needs none."""
    import fcntl

    heavy = encode(Image.new("RGBA", (2100, 2100), (1, 2, 3, 200)), "png")  # 17 MiB of pixels
    light = encode(Image.new("RGB", (900, 600), (40, 50, 60)), "jpeg")

    async def run() -> tuple[bool, str, str]:
        pool = ImagePool(2, 512, 10**9)
        await pool.start()
        try:
            fd = pool._lock_file.fileno()
            fcntl.lockf(fd, fcntl.LOCK_EX)  # this process holds the slot: workers must wait
            try:
                small = await asyncio.wait_for(pool.process(light), 60)
                big = asyncio.ensure_future(pool.process(heavy))
                await asyncio.sleep(1.5)
                waited = not big.done()
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
            return waited, small.status, (await asyncio.wait_for(big, 60)).status
        finally:
            await pool.close()

    assert asyncio.run(run()) == (True, "ok", "ok")


SHADOW = """
import pathlib
pathlib.Path({marker!r}).write_text("a struct.py in the current directory was imported")
raise ImportError("shadowing module")
"""


def shadowing_cwd(tmp_path: Path) -> tuple[Path, Path]:
    """A folder holding a struct.py that leaves a marker file when imported."""
    cwd, marker = tmp_path / "cwd", tmp_path / "marker"
    cwd.mkdir()
    (cwd / "struct.py").write_text(SHADOW.format(marker=str(marker)))
    # The trap works: a Python started with -m from there imports it.
    subprocess.run([sys.executable, "-m", "imatdata.fetch.imagepool"], cwd=cwd, capture_output=True, timeout=60)
    assert marker.exists()
    marker.unlink()
    return cwd, marker


def test_workers_do_not_import_modules_from_the_current_directory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cwd, marker = shadowing_cwd(tmp_path)
    monkeypatch.chdir(cwd)
    data = bodies()

    async def run() -> list:
        pool = ImagePool(2, 512, 10**9)
        await pool.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*(pool.process(b) for b in data)), 120)
        finally:
            await pool.close()

    results = asyncio.run(run())
    assert not marker.exists()
    assert [r.status for r in results][:6] == ["ok"] * 6


def test_fetch_run_from_a_folder_with_a_shadowing_module_ignores_it(tmp_path: Path, sample_server_thread) -> None:
    from imatsample import write_lists

    cwd, marker = shadowing_cwd(tmp_path)
    lists = write_lists(sample_server_thread.catalogue, sample_server_thread, tmp_path / "lists")
    # The installed console script, as a user runs it (`python -m` would put the folder on
    # the parent's own path: that is the user's choice, not fetch's).
    script = Path(sys.executable).with_name("imatdata")
    proc = subprocess.run([str(script), "fetch", str(lists["val"]), "--root", str(tmp_path / "root"),
                           "--allow-private", "--quiet", "--workers", "2", "--retries", "0", "--timeout", "5"],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
