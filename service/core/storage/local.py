"""The local-directory storage backend: the embedded default for one machine.

It gives the guarantees S3 conditional writes give. Every write streams into a temporary file in
the key's directory, then, holding an exclusive ``flock`` on that directory, checks its condition
and moves the file into place with ``os.replace`` (atomic on POSIX). Readers therefore see the
old or the new object, never a mix, and create-if-absent / compare-and-swap hold across threads
and processes on the same machine. ``flock`` (not ``fcntl.lockf``) because its locks belong to the
open file, so two threads of one process exclude each other too.

The etag is ``<inode>-<mtime ns>-<size>`` from ``stat``: cheap for large objects (no hashing on
``head`` or ``list``), and every write gets a new inode and, under the lock, an mtime strictly
later than the version it replaces, so a stale etag never matches.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal

from service.core.errors import AlreadyExists, NotFound, PreconditionFailed, StorageError
from service.core.storage import CHUNK, Body, ObjectInfo, Storage, check_key, check_prefix
from service.core.storage.config import StorageConfig

_TMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")


class LocalStorage(Storage):
    kind: Literal["local", "s3"] = "local"

    def __init__(self, config: StorageConfig):
        self.config = config
        uri = config.uri
        root = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
        self.root = root.resolve()
        with _os_errors("the storage root"):
            self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    # -- reads -----------------------------------------------------------------------------

    def open(self, key: str) -> IO[bytes]:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"no object at key {key!r}", param="key") from None
        except OSError as e:
            raise _storage_error(key, e) from e

    def head(self, key: str) -> ObjectInfo | None:
        st = _stat(self._path(key), key)
        return None if st is None else _info(key, st)

    def list(self, prefix: str, *, after: str | None = None,
             limit: int = 1000) -> tuple[list[ObjectInfo], bool]:
        check_prefix(prefix)
        if limit < 1:
            raise ValueError("limit must be positive")
        keys = sorted(k for k in self._walk(prefix) if after is None or k > after)
        infos = []
        for key in keys:
            if len(infos) > limit:
                break
            st = _stat(self._path(key), key)
            if st is not None:  # deleted since the walk
                infos.append(_info(key, st))
        return infos[:limit], len(infos) > limit

    def iter(self, prefix: str, *, after: str | None = None) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        # One walk, not one per page.
        for key in sorted(k for k in self._walk(prefix) if after is None or k > after):
            st = _stat(self._path(key), key)
            if st is not None:
                yield _info(key, st)

    def _walk(self, prefix: str) -> Iterator[str]:
        # Walk only the directory the prefix points into, then filter as a string prefix.
        base_parts = prefix.split("/")[:-1]
        base = self.root.joinpath(*base_parts)
        if not base.is_dir():
            return
        for dirpath, _dirnames, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if _TMP_NAME.match(name):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    yield key

    def location(self, key: str) -> str:
        return str(self._path(key))

    def check(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"local storage {str(self.root)!r} is not a writable directory")

    # -- writes ----------------------------------------------------------------------------

    def put(self, key: str, body: Body) -> str:
        return self._write(key, body, lambda current: None)

    def create(self, key: str, body: Body) -> str:
        def absent(current: os.stat_result | None) -> None:
            if current is not None:
                raise AlreadyExists(f"an object already exists at key {key!r}", param="key")
        return self._write(key, body, absent)

    def replace(self, key: str, body: Body, etag: str) -> str:
        def unchanged(current: os.stat_result | None) -> None:
            if current is None or _etag(current) != etag:
                raise PreconditionFailed(
                    f"object at key {key!r} changed since etag {etag!r} was read", param="key")
        return self._write(key, body, unchanged)

    def _write(self, key: str, body: Body,
               condition: Callable[[os.stat_result | None], None]) -> str:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
        try:
            with _os_errors(key):
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_file(tmp, body)
                with _locked(path.parent):
                    current = _stat(path, key)
                    condition(current)
                    # Strictly later than the version we replace, so its etag can never recur.
                    mtime = max(time.time_ns(), current.st_mtime_ns + 1 if current else 0)
                    os.utime(tmp, ns=(mtime, mtime))
                    os.replace(tmp, path)
                    st = os.stat(path)
                _fsync_dir(path.parent)
            return _etag(st)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def delete(self, key: str) -> None:
        path = self._path(key)
        with _locked_if_dir(path.parent), _os_errors(key):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
                path.unlink()

    def delete_prefix(self, prefix: str) -> int:
        count = super().delete_prefix(prefix)
        if prefix.endswith("/"):
            # Best effort: drop the now-empty directories; a concurrent writer keeps its own.
            base = self.root.joinpath(*prefix.rstrip("/").split("/"))
            for dirpath, _dirs, _files in os.walk(base, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
        return count


def _write_file(path: Path, body: Body) -> None:
    with open(path, "wb") as f:
        if isinstance(body, (bytes, bytearray, memoryview)):
            f.write(body)
        else:
            while chunk := body.read(CHUNK):
                f.write(chunk)
        f.flush()
        os.fsync(f.fileno())  # job records are promised durable before any work starts


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def _locked_if_dir(directory: Path) -> Iterator[None]:
    if directory.is_dir():
        with _locked(directory):
            yield
    else:
        yield


def _stat(path: Path, key: str) -> os.stat_result | None:
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise _storage_error(key, e) from e
    return st if stat.S_ISREG(st.st_mode) else None


def _etag(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(key=key, size=st.st_size, etag=_etag(st),
                      last_modified=datetime.fromtimestamp(st.st_mtime_ns / 1e9, UTC))


@contextlib.contextmanager
def _os_errors(key: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise _storage_error(key, e) from e


def _storage_error(key: str, e: OSError) -> StorageError:
    return StorageError(f"local storage failed on {key!r}: {e.strerror or e}")
