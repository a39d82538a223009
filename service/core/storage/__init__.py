"""Where everything durable lives: one interface, two backends (a local directory and S3).

Keys are ``/``-separated paths relative to the storage root (a directory, or ``s3://bucket/prefix``),
built from validated parts only (:func:`join_key`). Job records change by compare-and-swap:
:meth:`Storage.create` writes only if the key is absent, :meth:`Storage.replace` only if the key
still has the etag the caller read. Backend errors arrive as ``service.core.errors`` classes: a missing
key is :class:`NotFound`, a lost race :class:`AlreadyExists` / :class:`PreconditionFailed`, and
everything else the backend cannot do (unreachable, wrong credentials, full disk)
:class:`StorageError`.

Usage::

    storage = open_storage(StorageConfig(uri="s3://bucket/prefix", endpoint_url="http://127.0.0.1:8333"))
    etag = storage.create(join_key("jobs", job_id, "job.json"), body)
    storage.replace(join_key("jobs", job_id, "job.json"), new_body, etag)

S3 credentials come from the standard AWS chain (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION`` …), never from the config, so nothing secret travels with a pickled config.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

from service.core.errors import InvalidRequest, StorageError

if TYPE_CHECKING:
    from service.core.storage.config import StorageConfig

Body = bytes | bytearray | memoryview | IO[bytes]
"""What a write takes: bytes, or a binary file object read to its end (streamed, not buffered)."""

CHUNK = 1024 * 1024
"""Bytes per read when copying streams."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    """Relative to the storage root."""
    size: int
    etag: str
    """Opaque version tag, without quotes; changes on every write."""
    last_modified: datetime
    """Timezone-aware (UTC)."""


_BAD_CHARS = re.compile(r"[\\\x00-\x1f\x7f]")


def check_key(key: str, *, what: str = "key") -> str:
    """Return ``key`` if it is a safe relative key; raise :class:`InvalidRequest` otherwise.

    Refused: empty keys, a leading ``/``, empty parts (``a//b``, a trailing ``/``), ``.`` and
    ``..`` parts, backslashes, NUL and other control characters.
    """
    problem = _key_problem(key)
    if problem:
        raise InvalidRequest(f"invalid storage {what} {key!r}: {problem}", param=what,
                             code="invalid_key")
    return key


def check_prefix(prefix: str) -> str:
    """A prefix is ``""`` (everything) or a key, optionally ending in ``/``."""
    if prefix == "":
        return prefix
    check_key(prefix[:-1] if prefix.endswith("/") else prefix, what="prefix")
    return prefix


def _key_problem(key: str) -> str | None:
    if not isinstance(key, str) or not key:
        return "keys must be non-empty strings"
    if key.startswith("/"):
        return "keys are relative, they must not start with '/'"
    if _BAD_CHARS.search(key):
        return "backslashes and control characters are not allowed"
    for part in key.split("/"):
        if part == "":
            return "empty path parts are not allowed"
        if part in (".", ".."):
            return f"{part!r} parts are not allowed"
    return None


def join_key(*parts: str) -> str:
    """Join validated parts with ``/``: ``join_key("jobs", job_id, "job.json")``.

    Each part may itself hold ``/`` (a multiplexed id such as ``ftjob-…/final``), but the result
    must pass :func:`check_key`, so ``..``, ``""`` and absolute parts are refused.
    """
    if not parts:
        raise InvalidRequest("invalid storage key: no parts", param="key", code="invalid_key")
    for part in parts:
        check_key(part)
    return check_key("/".join(parts))


class Storage(abc.ABC):
    """The operations every backend offers; keys are checked with :func:`check_key`."""

    kind: Literal["local", "s3"]
    config: StorageConfig

    @abc.abstractmethod
    def put(self, key: str, body: Body) -> str:
        """Write ``body`` (overwriting); return the new etag. Large bodies stream."""

    @abc.abstractmethod
    def open(self, key: str) -> IO[bytes]:
        """A streaming binary reader (a context manager). :class:`NotFound` if absent."""

    def get(self, key: str) -> bytes:
        """The whole object. :class:`NotFound` if absent."""
        with self.open(key) as f:
            return f.read()

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size, etag and time of ``key``, or None if absent."""

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    @abc.abstractmethod
    def list(self, prefix: str, *, after: str | None = None,
             limit: int = 1000) -> tuple[list[ObjectInfo], bool]:
        """Up to ``limit`` objects whose key starts with ``prefix`` and sorts after ``after``.

        Sorted by key (byte order, as S3 sorts). Returns ``(objects, has_more)``. The prefix is a
        string prefix, as on S3: ``"jobs/a"`` matches ``jobs/a/x`` and ``jobs/ab/x``.
        """

    def iter(self, prefix: str, *, after: str | None = None) -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` (with a key after ``after``), sorted by key, fetched a
        page at a time."""
        while True:
            page, has_more = self.list(prefix, after=after, limit=1000)
            yield from page
            if not has_more or not page:
                return
            after = page[-1].key

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; deleting an absent key is not an error (as on S3)."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix``; return how many were removed."""
        check_prefix(prefix)
        keys = [info.key for info in self.iter(prefix)]
        for key in keys:
            self.delete(key)
        return len(keys)

    @abc.abstractmethod
    def create(self, key: str, body: Body) -> str:
        """Write only if ``key`` is absent; return the etag. :class:`AlreadyExists` otherwise."""

    @abc.abstractmethod
    def replace(self, key: str, body: Body, etag: str) -> str:
        """Write only if ``key`` still has ``etag``; return the new etag.

        :class:`PreconditionFailed` if the key changed or is gone; nothing is written then.
        """

    def presigned_url(self, key: str, expires: int = 3600) -> str:
        """A URL anyone can GET for ``expires`` seconds (S3 only)."""
        raise StorageError(f"presigned URLs need S3 storage; {self.kind} storage has none",
                           code="unsupported")

    @abc.abstractmethod
    def location(self, key: str) -> str:
        """Where ``key`` lives outside this API: an absolute path or an ``s3://`` URI."""

    def check(self) -> None:
        """Raise :class:`StorageError` unless the backend is reachable and writable-looking."""

    def download_file(self, key: str, path: str | Path) -> None:
        """Copy ``key`` to a local file (streamed; the file appears complete or not at all)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        with self.open(key) as src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
        tmp.replace(path)

    def upload_file(self, path: str | Path, key: str) -> str:
        with open(path, "rb") as f:
            return self.put(key, f)

    def download_prefix(self, prefix: str, local_dir: str | Path) -> list[Path]:
        """Copy every object under ``prefix/`` into ``local_dir``, keeping relative paths."""
        prefix = _dir_prefix(prefix)
        local_dir = Path(local_dir)
        written = []
        for info in self.iter(prefix):
            # Keys are checked on the way in, so the relative part has no ".." or leading "/".
            target = local_dir.joinpath(*info.key[len(prefix):].split("/"))
            self.download_file(info.key, target)
            written.append(target)
        return written

    def upload_dir(self, local_dir: str | Path, prefix: str) -> list[str]:
        """Upload every file below ``local_dir`` to ``prefix/<relative path>``; return the keys."""
        prefix = _dir_prefix(prefix)
        local_dir = Path(local_dir)
        keys = []
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            key = prefix + path.relative_to(local_dir).as_posix()
            self.upload_file(path, check_key(key))
            keys.append(key)
        return keys

    def __reduce__(self):
        # A storage travels to Ray workers as its config and is reopened there; clients and
        # locks do not pickle.
        return (open_storage, (self.config,))


def _dir_prefix(prefix: str) -> str:
    check_prefix(prefix)
    return prefix if prefix == "" or prefix.endswith("/") else prefix + "/"


def open_storage(config: StorageConfig) -> Storage:
    """The backend for ``config.uri``: ``s3://bucket/prefix`` or a local directory / ``file://``.

    No network I/O happens here; call :meth:`Storage.check` to probe the backend.
    """
    if config.uri.startswith("s3://"):
        from service.core.storage.s3 import S3Storage
        return S3Storage(config)
    from service.core.storage.local import LocalStorage
    return LocalStorage(config)
