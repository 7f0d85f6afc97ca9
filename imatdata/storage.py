"""Where the pipeline's files live: the one seam between the stages and the disk.

Every stage reads and writes shards, journals and outputs through these functions, never
through `open()`, `os.replace` or `shutil` directly. A location is either a `pathlib.Path`
on local disk (today's behaviour and speed: every function below tries the local case
first) or an `S3Path` (`s3://bucket/prefix/...`, see `imatdata.s3`), a pure path whose
`__fspath__` raises, so an `open()` that bypasses this module fails loudly instead of
creating a folder named `s3:`. The guarantees every caller relies on hold on both:

- a file appears at its final name whole or not at all (`AtomicFile`, `write_bytes_atomic`).
  Local: written under a hidden temporary name in the same folder, fsynced and renamed.
  S3: a file that stays under 4 MiB is one PUT of the final key when committed (a PUT is
  atomic); a bigger one streams to a hidden temporary key `.<name>.<pid>.tmp` in the same
  prefix (a multipart upload: a killed writer never completes it, so no object appears),
  and the commit copies it to the final key server-side (CopyObject: atomic too) and
  deletes the temporary. A stream is never written at the final key directly because
  pyarrow completes a multipart upload when the stream is destroyed, even after an error;
- a reader never lists a temporary file as a finished one (`remove_stale_temps` sweeps what
  a killed writer left; on S3, incomplete multipart uploads are invisible to listings and
  a bucket lifecycle rule `AbortIncompleteMultipartUpload` reclaims their space);
- a folder is replaced whole (`new_generation`, `recover_generations`). Local: built beside
  it and swapped in by renames (`imatdata.clean.resolve`). S3, which has no rename: the
  folder `F` (clean/) holds generations `F/.g-<time>-<pid>/...` and a pointer object
  `F/.current` naming the live one; every path under `F` is read through the pointer, so
  readers see `F/train/part-00000.parquet` whichever generation it lives in. A new
  generation is built under its own prefix, the pointer is replaced (one PUT: the switch is
  atomic), then the old generation is deleted. A killed writer leaves an unreferenced
  generation that no reader sees and the next run deletes. A process resolves the pointer
  once and again whenever it lists the folder;
- one writer at a time (`RunLock`). Local: an flock the OS drops when its process dies.
  S3: an flock on a local file named after the URL (one run per machine) plus a lock object
  holding its owner (host, pid) and refreshed every 20 s: a second machine sees a fresh
  lock and refuses; a lock not refreshed for 90 s (its owner died) is taken over, and so is
  one a dead process of this machine left. S3 has no create-if-absent that pyarrow exposes,
  so two machines starting within the same second could both win: the lock object is read
  back after writing it and the loser refuses, which narrows that window but cannot close it.

This module must not import torch.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from imatdata import s3
from imatdata.errors import UserError
from imatdata.s3 import S3Path, StorageError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

Location = Path | S3Path

__all__ = ["S3Path", "StorageError", "Location"]


def location(text: str | os.PathLike[str] | S3Path, what: str = "--root") -> Location:
    """A location given by a user (`--root`, `--data`, `--out`...): a local folder or
    `s3://bucket/prefix`; any other URL is refused in one line rather than read as a
    folder named 'gs:'."""
    if isinstance(text, S3Path):
        return text
    text = str(text)
    if text.startswith(s3.SCHEME):
        return S3Path.parse(text)
    if _URL.match(text):
        raise UserError(f"{what} {text}: only local folders and s3://bucket/prefix are supported")
    return Path(text)


def as_location(path: str | os.PathLike[str] | S3Path) -> Location:
    """`Path(path)`, except that an S3 location (or its URL) stays one."""
    if isinstance(path, (Path, S3Path)):
        return path
    text = str(path) if isinstance(path, str) else os.fspath(path)
    return S3Path.parse(text) if text.startswith(s3.SCHEME) else Path(text)


def is_remote(path: object) -> bool:
    """Whether `path` lies in an object store (no rename, no flock, no fsync)."""
    return isinstance(path, S3Path)


def same_location(a: Location, b: Location) -> bool:
    """Whether `a` and `b` name the same file (os.path.samefile for local files)."""
    if isinstance(a, S3Path) or isinstance(b, S3Path):
        return a == b
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


# --- checks -------------------------------------------------------------------------------------


def check_root(path: Location, *, writable: bool = True) -> None:
    """A root must be a folder or not exist yet, and (with `writable`) be writable: the
    nearest part of the path that exists is checked, so nothing is created to find out.
    An S3 root: its bucket must exist and be listable with these credentials."""
    if isinstance(path, S3Path):
        s3.check_root(path)
        return
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


def _info(path: S3Path) -> Any:
    with s3.errors(path):
        return s3.filesystem().get_file_info(path.physical)


def exists(path: Location) -> bool:
    if isinstance(path, S3Path):
        return _info(path).type != _pafs().FileType.NotFound
    return path.exists()


def is_file(path: Location) -> bool:
    if isinstance(path, S3Path):
        return _info(path).type == _pafs().FileType.File
    return path.is_file()


def is_dir(path: Location) -> bool:
    if isinstance(path, S3Path):
        return _info(path).type == _pafs().FileType.Directory
    return path.is_dir()


def children(folder: Location) -> list[Location]:
    """What lies directly in `folder`, sorted by name; [] when it does not exist."""
    if isinstance(folder, S3Path):
        return _s3_children(folder)  # type: ignore[return-value]
    if not folder.is_dir():
        return []
    return sorted(folder.iterdir())


def _s3_children(folder: S3Path) -> list[S3Path]:
    if folder.name in s3.GENERATIONAL:
        s3.current_generation(folder, refresh=True)  # a listing sees the live generation
    generational = folder.name in s3.GENERATIONAL  # its pointer and generations are never children
    sel = _pafs().FileSelector(folder.physical, recursive=False, allow_not_found=True)
    with s3.errors(folder):
        infos = s3.filesystem().get_file_info(sel)
    out = []
    for info in infos:
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if not name or (generational and (name == s3.CURRENT or name.startswith(s3.GEN_PREFIX))):
            continue
        out.append(folder / name)
    return sorted(out, key=lambda p: p.name)


def size(path: Location) -> int:
    if isinstance(path, S3Path):
        return int(_info(path).size or 0)
    return path.stat().st_size


def _pafs() -> Any:
    from pyarrow import fs

    return fs


# --- reading ------------------------------------------------------------------------------------


def open_read(path: Location) -> IO[bytes]:
    """A seekable binary stream (on S3, ranged GETs as it is read)."""
    if isinstance(path, S3Path):
        return s3.open_input(path)
    return open(path, "rb")


def read_bytes(path: Location) -> bytes:
    if isinstance(path, S3Path):
        # One ranged GET of the whole object: several times faster than reading a stream.
        with s3.errors(path), s3.filesystem().open_input_file(path.physical) as fh:
            return fh.read_at(fh.size(), 0)  # type: ignore[no-any-return]
    return path.read_bytes()


def parquet_file(path: Location) -> pq.ParquetFile:
    """An open Parquet file (use it as a context manager to close it)."""
    if isinstance(path, S3Path):
        with s3.errors(path):
            return pq.ParquetFile(path.physical, filesystem=s3.filesystem())
    return pq.ParquetFile(str(path))


_footers: dict[str, Any] = {}  # S3 shards' Parquet footers, read once per process


def read_row_group(path: S3Path, index: int, columns: Sequence[str] | None) -> Any:
    """One row group of a shard in an object store, its footer read only the first time:
    one ranged GET for the column chunks (pre-buffered), nothing else."""
    key = path.physical
    with s3.errors(path):
        f = pq.ParquetFile(key, filesystem=s3.filesystem(), metadata=_footers.get(key), pre_buffer=True)
        with f:
            if key not in _footers:
                if len(_footers) > 4096:
                    _footers.clear()
                _footers[key] = f.metadata
            return f.read_row_group(index, columns=list(columns) if columns else None)


def parquet_dataset(paths: list[Location]) -> ds.Dataset:
    """A pyarrow dataset over explicit Parquet files (in the order given)."""
    if paths and isinstance(paths[0], S3Path):
        with s3.errors(paths[0]):
            return ds.dataset([p.physical for p in paths], format="parquet",  # type: ignore[union-attr]
                              filesystem=s3.filesystem())
    return ds.dataset([str(p) for p in paths], format="parquet")


# --- writing ------------------------------------------------------------------------------------


def make_dirs(folder: Location) -> None:
    if isinstance(folder, S3Path):
        return  # prefixes need no making
    folder.mkdir(parents=True, exist_ok=True)


def temp_path_for(final: Location) -> Location:
    """The hidden temporary name a file is written under before it is renamed to `final`."""
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


class AtomicFile:
    """A file that appears at `final` whole or not at all.

    Write to `target` (what `open()` and pyarrow's writers accept) or to the stream `open()`
    returns, then `commit()`; `abort()` (or an exception inside the `with`) leaves nothing.
    """

    def __new__(cls, final: Location, size_hint: int | None = None) -> Any:
        if isinstance(final, S3Path):
            return s3.S3AtomicFile(final, size_hint)
        return super().__new__(cls)

    def __init__(self, final: Path, size_hint: int | None = None) -> None:
        """`size_hint`: about how many bytes will be written (an object store keeps a small
        file in memory and sends it in one request); a local file ignores it."""
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


def write_bytes_atomic(data: bytes, final: Location) -> None:
    if isinstance(final, S3Path):
        s3.put_bytes(data, final)
        return
    with AtomicFile(final) as f, f.open() as fh:
        fh.write(data)


def fsync_dir(path: Location) -> None:
    if isinstance(path, S3Path):
        return  # an object is durable once its PUT returns
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


def replace(src: Location, dst: Location) -> None:
    """Rename `src` (a file or a folder) to `dst` in one step; a file at `dst` is replaced.
    On S3 (files only) it is a server-side copy, then a delete: a crash between the two
    leaves both, never neither (fetch's settling reads duplicates back as one row)."""
    if isinstance(src, S3Path) or isinstance(dst, S3Path):
        assert isinstance(src, S3Path) and isinstance(dst, S3Path), (src, dst)
        with s3.errors(src):
            s3.filesystem().copy_file(src.physical, dst.physical)
            s3.filesystem().delete_file(src.physical)
        return
    os.replace(src, dst)
    fsync_dir(dst.parent)


def remove(path: Location) -> None:
    if isinstance(path, S3Path):
        with s3.errors(path):
            try:
                s3.filesystem().delete_file(path.physical)
            except FileNotFoundError:
                pass
        return
    path.unlink(missing_ok=True)


def remove_all(paths: Sequence[Location]) -> None:
    """`remove` each path, in order. (One at a time on S3 too: parallel deletes in one prefix
    measured 20x slower than sequential ones on SeaweedFS.)"""
    for path in paths:
        remove(path)


def remove_tree(folder: Location, *, strict: bool = False) -> None:
    """Remove a folder and all it holds (nothing when it is missing). With `strict`, a folder
    that survives is an OSError rather than ignored."""
    if isinstance(folder, S3Path):
        try:
            with s3.errors(folder):
                if exists(folder):
                    s3.delete_tree(folder.physical)
        except StorageError:
            if strict:
                raise
        return
    shutil.rmtree(folder, ignore_errors=True)
    if strict and folder.exists():
        raise OSError(f"cannot remove {folder}; remove it and run again")


def remove_stale_temps(folder: Location) -> None:
    """Remove temporary files a killed writer left behind (never a finished file)."""
    for p in children(folder):
        if is_temp(p):
            remove(p)


# --- replacing a folder whole on S3 (local folders: two renames, see imatdata.clean.resolve) ---


@contextmanager
def new_generation(folder: S3Path) -> Iterator[S3Path]:
    """Where to build the next `folder` (an S3 generational folder, clean/): it becomes
    the live one when the block completes (one PUT of the pointer), the old generation is
    then deleted; when the block fails, what it wrote goes and `folder` is as it was."""
    gen = s3.new_generation_name()
    staging = folder / f".{gen}"
    try:
        yield staging
    except BaseException:
        remove_tree(staging)
        raise
    s3.set_generation(folder, gen)
    s3.sweep_generations(folder, keep=gen)


def recover_generations(folder: S3Path) -> None:
    """Delete the generations a killed run left (never the live one). Under the run's lock."""
    s3.sweep_generations(folder, keep=s3.current_generation(folder, refresh=True))


# --- one writer at a time -----------------------------------------------------------------------


class RunLock:
    """One run at a time on `path`, for as long as the `with` lasts.

    `path` is a folder (locked in place: nothing is created) or a lock file (created if
    needed). The lock is an flock, so the OS drops it when the process dies (kill -9 too) and
    no stale lock is ever left behind. A second run gets a UserError saying `busy`.
    """

    def __new__(cls, path: Location, busy: str) -> Any:
        if isinstance(path, S3Path):
            return s3.S3Lock(path, busy)
        return super().__new__(cls)

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
