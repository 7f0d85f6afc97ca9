"""Where the pipeline's files live: the one seam between the stages and the disk.

Every stage reads and writes shards, journals and outputs through these functions, never
through `open()`, `os.replace` or `shutil` directly, so a second kind of store (s3://) plugs
in here and nowhere else. A location is a `pathlib.Path` on local disk; the guarantees are
the ones every caller relies on:

- a file appears at its final name whole or not at all (`AtomicFile`, `write_bytes_atomic`):
  it is written under a hidden temporary name in the same folder, fsynced and renamed;
- a reader never lists a temporary file as a finished one (`remove_stale_temps` sweeps what
  a killed writer left);
- one writer at a time (`RunLock`), a lock the OS drops when its process dies.

This module must not import torch.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import IO, Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from imatdata.errors import UserError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def location(text: str | os.PathLike[str], what: str = "--root") -> Path:
    """A location given by a user (`--root`, `--data`, `--out`...). Local paths only so far:
    a URL is refused in one line rather than read as a folder named 's3:'."""
    if _URL.match(str(text)):
        raise UserError(f"{what} {text}: only local folders are supported; copy the data to a local "
                        "folder and pass that")
    return Path(text)


# --- checks -------------------------------------------------------------------------------------


def check_root(path: Path, *, writable: bool = True) -> None:
    """A root must be a folder or not exist yet, and (with `writable`) be writable: the
    nearest part of the path that exists is checked, so nothing is created to find out."""
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise UserError(f"root {path}: {existing} is a broken link; pass --root (or set IMAT_ROOT) "
                            "to a folder")
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise UserError(f"root {path} {what}, not a folder; pass --root (or set IMAT_ROOT) to a folder")
    if writable and not can_write(existing):
        where = "" if existing == path else f" (it would be made in {existing})"
        raise UserError(f"root {path}: cannot write there{where}: permission denied or a read-only file "
                        "system; pass --root (or set IMAT_ROOT) to a folder you can write")


def can_write(folder: Path) -> bool:
    """Whether files can be made in `folder` (write and search permission, writable mount)."""
    return os.access(folder, os.W_OK | os.X_OK)


def exists(path: Path) -> bool:
    return path.exists()


def is_file(path: Path) -> bool:
    return path.is_file()


def is_dir(path: Path) -> bool:
    return path.is_dir()


def children(folder: Path) -> list[Path]:
    """What lies directly in `folder`, sorted by name; [] when it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(folder.iterdir())


def size(path: Path) -> int:
    return path.stat().st_size


# --- reading ------------------------------------------------------------------------------------


def open_read(path: Path) -> IO[bytes]:
    return open(path, "rb")


def read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def parquet_file(path: Path) -> pq.ParquetFile:
    """An open Parquet file (use it as a context manager to close it)."""
    return pq.ParquetFile(str(path))


def parquet_dataset(paths: list[Path]) -> ds.Dataset:
    """A pyarrow dataset over explicit Parquet files (in the order given)."""
    return ds.dataset([str(p) for p in paths], format="parquet")


# --- writing ------------------------------------------------------------------------------------


def make_dirs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)


def temp_path_for(final: Path) -> Path:
    """The hidden temporary name a file is written under before it is renamed to `final`."""
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


class AtomicFile:
    """A file that appears at `final` whole or not at all.

    Write to `target` (what `open()` and pyarrow's writers accept) or to the stream `open()`
    returns, then `commit()`; `abort()` (or an exception inside the `with`) leaves nothing.
    """

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        make_dirs(self.final.parent)
        self._tmp = temp_path_for(self.final)
        self.target = str(self._tmp)

    def open(self) -> IO[bytes]:
        return open(self._tmp, "wb")

    def commit(self) -> Path:
        with open(self._tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self._tmp, self.final)
        fsync_dir(self.final.parent)
        return self.final

    def abort(self) -> None:
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_bytes_atomic(data: bytes, final: Path) -> None:
    with AtomicFile(final) as f, f.open() as fh:
        fh.write(data)


def fsync_dir(path: Path) -> None:
    # Directory fsync makes a rename durable; Windows has none, and there the rename itself
    # is what we can rely on.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace(src: Path, dst: Path) -> None:
    """Rename `src` (a file or a folder) to `dst` in one step; a file at `dst` is replaced."""
    os.replace(src, dst)
    fsync_dir(dst.parent)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def remove_tree(folder: Path, *, strict: bool = False) -> None:
    """Remove a folder and all it holds (nothing when it is missing). With `strict`, a folder
    that survives is an OSError rather than ignored."""
    shutil.rmtree(folder, ignore_errors=True)
    if strict and folder.exists():
        raise OSError(f"cannot remove {folder}; remove it and run again")


def remove_stale_temps(folder: Path) -> None:
    """Remove temporary files a killed writer left behind (never a finished file)."""
    for p in children(folder):
        if is_temp(p):
            remove(p)


# --- one writer at a time -----------------------------------------------------------------------


class RunLock:
    """One run at a time on `path`, for as long as the `with` lasts.

    `path` is a folder (locked in place: nothing is created) or a lock file (created if
    needed). The lock is an flock, so the OS drops it when the process dies (kill -9 too) and
    no stale lock is ever left behind. A second run gets a UserError saying `busy`.
    """

    def __init__(self, path: Path, busy: str) -> None:
        self.path = Path(path)
        self.busy = busy
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        if sys.platform == "win32":
            return self._enter_windows()
        import fcntl

        if self.path.is_dir():
            fd = os.open(self.path, os.O_RDONLY)
        else:
            make_dirs(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(self.busy) from None
        except OSError:
            # A file system without flock (some network mounts): run unlocked rather than not at all.
            os.close(fd)
            return self
        self._fd = fd
        return self

    def _enter_windows(self) -> RunLock:
        """msvcrt locks a byte of a file; a folder cannot be locked there, so it runs unlocked."""
        if self.path.is_dir():
            return self
        import msvcrt

        make_dirs(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            os.close(fd)
            raise UserError(self.busy) from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock / msvcrt lock
            self._fd = None
