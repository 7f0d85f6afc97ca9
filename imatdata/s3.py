"""S3 locations for `imatdata.storage`: the path type, the filesystem, and what S3 lacks.

Only `imatdata.storage` uses this module; stages never do. The design (atomic objects,
generations instead of folder renames, the lock object) is described in storage's
docstring.

Why pyarrow's `S3FileSystem` and not fsspec/s3fs: measured on the same SeaweedFS server
(`bench/s3.py --clients`, best of 3, 20 operations each): a 1 MiB PUT 20.7 ms vs 20.6 ms,
a 1 MiB GET 2.6 ms vs 9.2 ms, one 8 MiB row group of a shard 30.6 ms vs 162.5 ms. Reads,
which training is made of, are 3.5-5x faster through pyarrow (its Parquet reader issues
coalesced ranged GETs from C++), writes are even; and pyarrow is already a dependency,
while s3fs would add aiobotocore/botocore.

Configuration comes the way AWS tools take it: credentials from `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`) or a profile (`AWS_PROFILE`, the shared
credentials files), read by the AWS SDK itself; the region from `AWS_REGION` (or
`AWS_DEFAULT_REGION`); the endpoint from `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`
(pyarrow does not read those, so they are passed on here). No credential is ever printed,
logged or written anywhere.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any
from urllib.parse import urlsplit

from imatdata.errors import UserError

SCHEME = "s3://"
CURRENT = ".current"  # a generational folder's pointer object
GEN_PREFIX = ".g-"  # a generation's folder name starts with this
GENERATIONAL = frozenset({"clean"})  # folders replaced whole (their readers go through CURRENT)
SMALL = 4 * 1024 * 1024  # a file under this is one PUT from memory
LOCK_REFRESH_S = 20.0
LOCK_STALE_S = 90.0


class StorageError(UserError, OSError):
    """An object store refused or could not be reached: one line, exit 2 (and an OSError,
    so code that treats a failing disk as an OSError treats a failing bucket the same)."""


class S3Path:
    """`s3://bucket/key`: the parts of `pathlib.PurePosixPath` the pipeline uses.

    Not os.PathLike in practice: `__fspath__` raises, so `open()`, `Path()` or `os.*` on it
    fail loudly rather than touching a local folder named `s3:`."""

    __slots__ = ("bucket", "key")

    def __init__(self, bucket: str, key: str = "") -> None:
        self.bucket = bucket
        self.key = "/".join(p for p in key.split("/") if p and p != ".")

    @classmethod
    def parse(cls, text: str) -> S3Path:
        rest = text[len(SCHEME):]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise UserError(f"{text}: no bucket; write s3://bucket/prefix")
        return cls(bucket, key)

    def __reduce__(self) -> tuple[Any, ...]:
        return (S3Path, (self.bucket, self.key))

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Path({str(self)!r})"

    def __fspath__(self) -> str:
        raise TypeError(f"{self} is an object-store location: read and write it through imatdata.storage")

    def __truediv__(self, other: str | os.PathLike[str]) -> S3Path:
        part = str(other)
        return S3Path(self.bucket, f"{self.key}/{part}" if self.key else part)

    def joinpath(self, *others: str) -> S3Path:
        out = self
        for o in others:
            out = out / o
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Path) and (self.bucket, self.key) == (other.bucket, other.key)

    def __hash__(self) -> int:
        return hash((S3Path, self.bucket, self.key))

    def __lt__(self, other: S3Path) -> bool:
        return (self.bucket, self.key.split("/")) < (other.bucket, other.key.split("/"))

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in self.key.split("/") if p)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1] if self.key else ""

    @property
    def parent(self) -> S3Path:
        return S3Path(self.bucket, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    @property
    def suffix(self) -> str:
        name = self.name
        i = name.rfind(".")
        return name[i:] if 0 < i < len(name) - 1 else ""

    @property
    def stem(self) -> str:
        name, suffix = self.name, self.suffix
        return name[: len(name) - len(suffix)] if suffix else name

    def with_name(self, name: str) -> S3Path:
        return self.parent / name

    def with_suffix(self, suffix: str) -> S3Path:
        return self.parent / (self.stem + suffix)

    @property
    def physical(self) -> str:
        """`bucket/key` as stored: through the live generation of a generational folder."""
        parts = self.key.split("/") if self.key else []
        for i, part in enumerate(parts):
            after = parts[i + 1] if i + 1 < len(parts) else ""
            if part in GENERATIONAL and not after.startswith(GEN_PREFIX) and after != CURRENT:
                gen = current_generation(S3Path(self.bucket, "/".join(parts[: i + 1])))
                if gen:
                    parts = parts[: i + 1] + ["." + gen] + parts[i + 1:]
                break
        return "/".join([self.bucket, *parts])


def is_s3(text: object) -> bool:
    return isinstance(text, S3Path) or (isinstance(text, str) and text.startswith(SCHEME))


# --- the filesystem --------------------------------------------------------------------------

_fs: Any = None
_fs_pid = -1
_fs_lock = threading.Lock()


def endpoint() -> tuple[str | None, str]:
    """(host:port, scheme) from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, or (None, https)."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        return None, "https"
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if not parts.netloc:
        raise UserError(f"AWS_ENDPOINT_URL {url!r} has no host; write it as http://host:port")
    return parts.netloc, parts.scheme or "https"


def filesystem() -> Any:
    """This process's `pyarrow.fs.S3FileSystem` (made on first use, again after a fork)."""
    global _fs, _fs_pid
    with _fs_lock:
        if _fs is None or _fs_pid != os.getpid():
            from pyarrow import fs as pafs

            host, scheme = endpoint()
            kwargs: dict[str, Any] = {
                "scheme": scheme,
                "connect_timeout": float(os.environ.get("IMAT_S3_CONNECT_TIMEOUT", "5")),
                "request_timeout": float(os.environ.get("IMAT_S3_REQUEST_TIMEOUT", "60")),
                "retry_strategy": pafs.AwsStandardS3RetryStrategy(
                    max_attempts=int(os.environ.get("IMAT_S3_ATTEMPTS", "3"))),
                "allow_bucket_creation": False,
                "allow_bucket_deletion": False,
            }
            if host:
                kwargs["endpoint_override"] = host
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region:
                kwargs["region"] = region
            try:
                _fs = pafs.S3FileSystem(**kwargs)
            except Exception as exc:  # a malformed profile, say
                raise StorageError(f"cannot set up S3 access: {_first_line(exc)}") from None
            _fs_pid = os.getpid()
        return _fs


def reset() -> None:
    """Forget the filesystem and the generations seen (tests change the environment)."""
    global _fs
    with _fs_lock:
        _fs = None
    _generations.clear()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def explain(exc: BaseException, where: S3Path | str) -> StorageError:
    """One line a user can act on, for an error of the S3 client."""
    text = str(exc)
    host, scheme = endpoint()
    at = f"{scheme}://{host}" if host else "the default AWS endpoint"
    if re.search(r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|Forbidden|HTTP status 403|"
                 r"InvalidToken|ExpiredToken|No response body", text) and "NoSuchBucket" not in text:
        return StorageError(f"{where}: access denied by {at}; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                            "(or AWS_PROFILE) and the bucket's permissions")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        bucket = where.bucket if isinstance(where, S3Path) else str(where)
        return StorageError(f"{where}: bucket {bucket!r} does not exist at {at}; create it first "
                            "(imat never creates buckets)")
    if re.search(r"connect|resolve host|timed out|timeout|curlCode|Network|unreachable", text, re.I):
        return StorageError(f"{where}: cannot reach the S3 endpoint {at}; check AWS_ENDPOINT_URL "
                            "(or AWS_ENDPOINT_URL_S3) and the network")
    return StorageError(f"{where}: {_first_line(exc)}")


@contextmanager
def errors(where: S3Path | str) -> Iterator[None]:
    """Turn the S3 client's OSErrors into StorageError (one line, exit 2)."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise explain(exc, where) from None


def check_root(root: S3Path) -> None:
    """The bucket exists and these credentials may list it: found out with one listing, so a
    wrong key, a missing bucket or an unreachable endpoint is one line before any work."""
    from pyarrow import fs as pafs

    with errors(root):
        info = filesystem().get_file_info(root.bucket)
        if info.type == pafs.FileType.NotFound:
            raise explain(OSError("NoSuchBucket"), root)
        sel = pafs.FileSelector(root.physical, recursive=False, allow_not_found=True)
        filesystem().get_file_info(sel)
        if root.key:
            info = filesystem().get_file_info(root.physical)
            if info.type == pafs.FileType.File:
                raise UserError(f"root {root} is an object, not a prefix; pass --root (or set IMAT_ROOT) "
                                "to s3://bucket/prefix")


# --- generations ---------------------------------------------------------------------------------

_generations: dict[tuple[str, str], str | None] = {}


def current_generation(folder: S3Path, refresh: bool = False) -> str | None:
    """The live generation of a generational folder (`g-...`), or None when it has none
    (never cleaned on S3, or copied there from a local clean/)."""
    key = (folder.bucket, folder.key)
    if refresh or key not in _generations:
        _generations[key] = _read_pointer(folder)
    return _generations[key]


def _read_pointer(folder: S3Path) -> str | None:
    from pyarrow import fs as pafs

    fs = filesystem()
    path = f"{folder.bucket}/{folder.key}/{CURRENT}"
    with errors(folder):
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as fh:
            text = fh.read().decode("utf-8", "replace").strip()
    return text if re.fullmatch(r"g-[0-9A-Za-z-]+", text) else None


def new_generation_name() -> str:
    return f"g-{int(time.time() * 1000):013d}-{os.getpid()}"


def set_generation(folder: S3Path, gen: str) -> None:
    fs = filesystem()
    with errors(folder), fs.open_output_stream(f"{folder.bucket}/{folder.key}/{CURRENT}") as fh:
        fh.write(gen.encode() + b"\n")  # small: one PUT, atomic
    _generations[(folder.bucket, folder.key)] = gen


def sweep_generations(folder: S3Path, keep: str | None) -> None:
    """Delete every generation of `folder` but `keep` and, once it has one, what lies there
    outside any generation (a clean/ copied from disk before the first S3 clean)."""
    from pyarrow import fs as pafs

    fs = filesystem()
    base = f"{folder.bucket}/{folder.key}"
    with errors(folder):
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
        for info in infos:
            name = info.path.rsplit("/", 1)[-1]
            if name == CURRENT or (keep is not None and name == "." + keep):
                continue
            if not name.startswith(GEN_PREFIX) and keep is None:
                continue  # no generation yet: what lies here is the live folder
            if info.type == pafs.FileType.Directory:
                delete_tree(info.path)
            else:
                fs.delete_file(info.path)


def delete_tree(physical: str) -> None:
    """Delete every object under a prefix, then its directory marker if there is one (some
    stores answer 404 to deleting a marker that was never made: that is not an error)."""
    fs = filesystem()
    fs.delete_dir_contents(physical, missing_dir_ok=True)
    try:
        fs.delete_dir(physical)
    except FileNotFoundError:
        pass


# --- atomic objects --------------------------------------------------------------------------------


class S3AtomicFile:
    """`storage.AtomicFile` for an S3 key: an object that appears whole or not at all.

    Up to SMALL bytes are kept in memory and PUT at commit; past that the bytes stream to a
    hidden temporary key, copied to the final key at commit. `open()` is a write-only binary
    stream over this object; `target` (what pyarrow's writers take) is that same buffering
    object when `size_hint` says the file stays small, else pyarrow's own stream to the
    temporary key, so a shard streams out with no Python in the write path."""

    def __init__(self, final: S3Path, size_hint: int | None = None) -> None:
        self.final = final
        self._small = size_hint is not None and size_hint <= SMALL
        self._buf: list[bytes] = []
        self._held = 0
        self._pos = 0
        self._tmp: S3Path | None = None
        self._stream: Any = None
        self.closed = False

    @property
    def target(self) -> Any:
        if self._small:
            return self
        if self._stream is None:
            self._spill()
        return self._stream

    def _spill(self) -> None:
        """Go on writing to a stream to the temporary key (what is buffered goes first)."""
        from imatdata.storage import temp_path_for

        self._tmp = temp_path_for(self.final)  # type: ignore[assignment]
        assert self._tmp is not None
        with errors(self.final):
            self._stream = filesystem().open_output_stream(self._tmp.physical)
            for part in self._buf:
                self._stream.write(part)
        self._buf, self._held = [], 0

    # the stream
    def open(self) -> _Stream:
        """The stream to write to; closing it (`with f.open() as fh`) does not commit."""
        return _Stream(self)

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def write(self, data: Any) -> int:
        b = bytes(data)
        self._pos += len(b)
        if self._stream is not None:
            with errors(self.final):
                self._stream.write(b)
            return len(b)
        self._buf.append(b)
        self._held += len(b)
        if self._held > SMALL:
            self._spill()
        return len(b)

    def close(self) -> None:
        pass  # pyarrow's writers close their sink; the object is only made by commit()

    def __enter__(self) -> S3AtomicFile:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def commit(self) -> S3Path:
        fs = filesystem()
        with errors(self.final):
            if self._stream is None:
                with fs.open_output_stream(self.final.physical) as fh:
                    fh.write(b"".join(self._buf))
                self._buf = []
            else:
                assert self._tmp is not None
                self._stream.close()  # a no-op when a Parquet writer closed it already
                self._stream = None
                fs.copy_file(self._tmp.physical, self.final.physical)
                fs.delete_file(self._tmp.physical)
        self.closed = True
        return self.final

    def abort(self) -> None:
        self._buf = []
        self.closed = True
        if self._stream is not None:
            # Closing completes the upload (pyarrow has no abort): the temporary then goes.
            try:
                self._stream.close()
            except OSError:
                pass
            self._stream = None
            assert self._tmp is not None
            try:
                filesystem().delete_file(self._tmp.physical)
            except OSError:
                pass


class _Stream:
    """A write-only view of an S3AtomicFile whose close() is a no-op."""

    def __init__(self, file: S3AtomicFile) -> None:
        self._file = file
        self.write, self.tell, self.flush = file.write, file.tell, file.flush
        self.closed = False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def put_bytes(data: bytes, final: S3Path) -> None:
    if len(data) <= SMALL:
        with errors(final), filesystem().open_output_stream(final.physical) as fh:
            fh.write(data)
    else:
        with S3AtomicFile(final) as f:
            f.write(data)


# --- one writer at a time -------------------------------------------------------------------------


class S3Lock:
    """`storage.RunLock` on S3 (see storage's docstring for what it guarantees)."""

    def __init__(self, path: S3Path, busy: str) -> None:
        self.obj = path if path.name.endswith(".lock") else path / ".imat.lock"
        self.busy = busy
        self._local: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._me = {"host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex()}

    def _local_lock(self) -> Any:
        import hashlib
        from pathlib import Path

        from imatdata.storage import RunLock

        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imat" / "locks"
        name = hashlib.sha1(str(self.obj).encode()).hexdigest()[:20] + ".lock"
        return RunLock(cache / name, self.busy)

    def _read(self) -> tuple[dict[str, Any] | None, float]:
        from pyarrow import fs as pafs

        fs = filesystem()
        info = fs.get_file_info(self.obj.physical)
        if info.type != pafs.FileType.File:
            return None, 0.0
        try:
            with fs.open_input_stream(self.obj.physical) as fh:
                owner = json.loads(fh.read().decode())
        except (OSError, ValueError):
            return None, 0.0
        age = time.time() - info.mtime.timestamp() if info.mtime is not None else 0.0
        return owner, age

    def _write(self) -> None:
        with filesystem().open_output_stream(self.obj.physical) as fh:
            fh.write(json.dumps(self._me | {"refreshed": time.time()}).encode())

    def __enter__(self) -> S3Lock:
        self._local = self._local_lock().__enter__()
        try:
            with errors(self.obj):
                owner, age = self._read()
                if owner and owner.get("token") != self._me["token"] and age < LOCK_STALE_S and \
                        owner.get("host") != self._me["host"]:
                    raise UserError(f"{self.busy} (lock {self.obj} held by {owner.get('host')}, "
                                    f"pid {owner.get('pid')})")
                self._write()
                time.sleep(0.05)
                owner, _ = self._read()
                if not owner or owner.get("token") != self._me["token"]:
                    raise UserError(self.busy)
        except BaseException:
            self._local.__exit__(None, None, None)
            raise
        self._thread = threading.Thread(target=self._refresh, name="imat-s3-lock", daemon=True)
        self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_S):
            try:
                self._write()
            except OSError:
                pass  # a missed heartbeat: the next one, or the run's own writes, will fail loudly

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            owner, _ = self._read()
            if owner and owner.get("token") == self._me["token"]:
                filesystem().delete_file(self.obj.physical)
        except OSError:
            pass  # left behind, it goes stale in LOCK_STALE_S
        finally:
            self._local.__exit__(None, None, None)


def open_input(path: S3Path) -> IO[bytes]:
    with errors(path):
        return filesystem().open_input_file(path.physical)  # type: ignore[no-any-return]
