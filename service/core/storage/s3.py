"""The S3 storage backend (boto3), for AWS or any S3-compatible endpoint (SeaweedFS, MinIO).

Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
a profile, an instance role); the region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else
``us-east-1``. Retries use botocore's ``standard`` mode. Large bodies go through boto3's transfer
manager (multipart, a bounded number of parts in memory); conditional writes are single
``PutObject`` calls with ``If-None-Match: *`` (create) or ``If-Match: <etag>`` (replace), which is
what AWS S3 and SeaweedFS honour. They are meant for records, not multi-gigabyte bodies.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)

from service.core.errors import AlreadyExists, NotFound, PreconditionFailed, StorageError
from service.core.storage import Body, ObjectInfo, Storage, check_key, check_prefix
from service.core.storage.config import StorageConfig

PART_SIZE = 8 * 1024 * 1024
"""Multipart threshold and part size; at most ``PARTS_IN_MEMORY`` parts are buffered."""
PARTS_IN_MEMORY = 4

_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                     "InvalidToken", "ExpiredToken", "InvalidClientTokenId"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_CONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class S3Storage(Storage):
    kind: Literal["local", "s3"] = "s3"

    def __init__(self, config: StorageConfig):
        self.config = config
        bucket, _, prefix = config.uri[len("s3://"):].partition("/")
        if not bucket:
            raise StorageError(f"S3 storage URI {config.uri!r} names no bucket; "
                               "use s3://bucket/prefix")
        prefix = prefix.strip("/")
        if prefix:
            check_prefix(prefix)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint = config.endpoint_url or "AWS S3"
        session = boto3.session.Session()
        self._client = session.client(
            "s3",
            endpoint_url=config.endpoint_url or None,  # "" from an empty variable means AWS
            region_name=session.region_name or "us-east-1",
            config=Config(
                retries={"mode": "standard"},
                signature_version="s3v4",
                # Custom endpoints rarely resolve bucket subdomains.
                s3={"addressing_style": "path" if config.endpoint_url else "auto"},
                connect_timeout=10, read_timeout=60,
            ),
        )
        self._transfer = TransferConfig(multipart_threshold=PART_SIZE,
                                        multipart_chunksize=PART_SIZE,
                                        max_concurrency=PARTS_IN_MEMORY)
        # s3transfer's bound on buffered parts (default 10); boto3's __init__ does not take it.
        self._transfer.max_in_memory_upload_chunks = PARTS_IN_MEMORY

    def __repr__(self) -> str:
        return f"S3Storage('s3://{self.bucket}/{self.prefix}', endpoint={self.endpoint!r})"

    def _full(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix):]

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    # -- reads -----------------------------------------------------------------------------

    def open(self, key: str) -> IO[bytes]:
        with self._errors(key):
            body = self._client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"]
        return io.BufferedReader(_StreamReader(body, self, key), buffer_size=1024 * 1024)

    def get(self, key: str) -> bytes:
        with self._errors(key):
            return self._client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()

    def head(self, key: str) -> ObjectInfo | None:
        try:
            with self._errors(key):
                r = self._client.head_object(Bucket=self.bucket, Key=self._full(key))
        except NotFound:
            return None
        return ObjectInfo(key=key, size=r["ContentLength"], etag=_unquote(r["ETag"]),
                          last_modified=r["LastModified"])

    def list(self, prefix: str, *, after: str | None = None,
             limit: int = 1000) -> tuple[list[ObjectInfo], bool]:
        check_prefix(prefix)
        if limit < 1:
            raise ValueError("limit must be positive")
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        if after is not None:
            args["StartAfter"] = self.prefix + after
        out: list[ObjectInfo] = []
        truncated = False
        with self._errors(prefix):
            while len(out) < limit:
                page = self._client.list_objects_v2(**args, MaxKeys=min(1000, limit - len(out)))
                out.extend(self._infos(page))
                truncated = page.get("IsTruncated", False)
                if not truncated:
                    break
                args["ContinuationToken"] = page["NextContinuationToken"]
        return out, truncated

    def iter(self, prefix: str, *, after: str | None = None) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        start = {} if after is None else {"StartAfter": self.prefix + after}
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix, **start)
        with self._errors(prefix):
            for page in pages:
                yield from self._infos(page)

    def _infos(self, page: dict[str, Any]) -> list[ObjectInfo]:
        return [ObjectInfo(key=self._relative(o["Key"]), size=o["Size"], etag=_unquote(o["ETag"]),
                           last_modified=o["LastModified"]) for o in page.get("Contents", [])]

    def presigned_url(self, key: str, expires: int = 3600) -> str:
        with self._errors(key):
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)},
                ExpiresIn=expires)

    def download_file(self, key: str, path: str | Path) -> None:
        # boto3 writes to a temporary name and renames, so the file is complete or absent.
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self._errors(key):
            self._client.download_file(self.bucket, self._full(key), str(path),
                                       Config=self._transfer)

    def check(self) -> None:
        with self._errors(""):
            self._client.head_bucket(Bucket=self.bucket)

    # -- writes ----------------------------------------------------------------------------

    def put(self, key: str, body: Body) -> str:
        full = self._full(key)
        with self._errors(key):
            if isinstance(body, (bytes, bytearray, memoryview)) and len(body) < PART_SIZE:
                return _unquote(self._client.put_object(Bucket=self.bucket, Key=full,
                                                        Body=bytes(body))["ETag"])
            fileobj = (io.BytesIO(body) if isinstance(body, (bytes, bytearray, memoryview))
                       else _full_reads(body))
            # Streams in parts of PART_SIZE; the transfer manager returns no response, so the
            # etag comes from a HEAD (a racing writer may win in between, as with any put).
            self._client.upload_fileobj(fileobj, self.bucket, full, Config=self._transfer)
            return _unquote(self._client.head_object(Bucket=self.bucket, Key=full)["ETag"])

    def create(self, key: str, body: Body) -> str:
        try:
            return self._put_if(key, body, IfNoneMatch="*")
        except _ConditionFailed:
            raise AlreadyExists(f"an object already exists at key {key!r}", param="key") from None

    def replace(self, key: str, body: Body, etag: str) -> str:
        try:
            return self._put_if(key, body, IfMatch=f'"{etag}"')
        except (_ConditionFailed, NotFound):
            raise PreconditionFailed(
                f"object at key {key!r} changed since etag {etag!r} was read", param="key") from None

    def _put_if(self, key: str, body: Body, **condition: str) -> str:
        data = bytes(body) if isinstance(body, (bytes, bytearray, memoryview)) else body.read()
        with self._errors(key, conditional=True):
            r = self._client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data,
                                        **condition)
        return _unquote(r["ETag"])

    def delete(self, key: str) -> None:
        with self._errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def delete_prefix(self, prefix: str) -> int:
        check_prefix(prefix)
        count = 0
        batch: list[dict[str, str]] = []
        for info in self.iter(prefix):
            batch.append({"Key": self.prefix + info.key})
            if len(batch) == 1000:
                count += self._delete_batch(batch, prefix)
                batch = []
        if batch:
            count += self._delete_batch(batch, prefix)
        return count

    def _delete_batch(self, batch: list[dict[str, str]], prefix: str) -> int:
        with self._errors(prefix):
            r = self._client.delete_objects(Bucket=self.bucket,
                                            Delete={"Objects": batch, "Quiet": True})
        if r.get("Errors"):
            first = r["Errors"][0]
            raise StorageError(f"S3 could not delete {len(r['Errors'])} objects under "
                               f"{prefix!r}, e.g. {first.get('Key')}: {first.get('Message')}")
        return len(batch)

    # -- errors ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, key: str, *, conditional: bool = False) -> Iterator[None]:
        """Turn botocore's errors into ours (``_ConditionFailed`` for a refused condition)."""
        try:
            yield
        except ClientError as e:
            if conditional and _code(e) in _CONDITION_CODES:
                raise _ConditionFailed(_code(e)) from e
            raise self._translate(_code(e), _message(e), key) from e
        except S3UploadFailedError as e:
            cause = e.__context__
            if isinstance(cause, ClientError):
                raise self._translate(_code(cause), _message(cause), key) from e
            code = m.group(1) if (m := re.search(r"\((\w+)\)", str(e))) else "UploadFailed"
            raise self._translate(code, str(e), key) from e
        except (NoCredentialsError, PartialCredentialsError) as e:
            raise StorageError(
                f"no S3 credentials for s3://{self.bucket}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY", code="storage_credentials") from e
        except EndpointConnectionError as e:
            raise StorageError(f"cannot reach S3 at {self.endpoint}: {e}",
                               code="storage_unreachable") from e
        except BotoCoreError as e:
            raise StorageError(f"S3 request for {key!r} failed: {e}") from e

    def _translate(self, code: str, message: str, key: str) -> Exception:
        where = f"s3://{self.bucket}/{self.prefix}"
        if code in _NOT_FOUND_CODES and key:
            return NotFound(f"no object at key {key!r}", param="key")
        if code in ("NoSuchBucket",) or (code in _NOT_FOUND_CODES and not key):
            return StorageError(f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}",
                                code="storage_no_bucket")
        if code in _CREDENTIAL_CODES:
            return StorageError(
                f"S3 at {self.endpoint} refused the credentials for {where} ({code}: {message}); "
                "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", code="storage_credentials")
        return StorageError(f"S3 request for {key!r} in {where} failed: {code}: {message}")


class _ConditionFailed(Exception):
    """Internal: a conditional PutObject was refused (412, or 409 for a concurrent write)."""


class _StreamReader(io.RawIOBase):
    """A raw reader over a botocore body that turns mid-stream failures into StorageError."""

    def __init__(self, body: Any, storage: S3Storage, key: str):
        self._body, self._storage, self._key = body, storage, key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with self._storage._errors(self._key):
            try:
                data = self._body.read(len(buffer))
            except OSError as e:  # urllib3 protocol errors, resets
                raise StorageError(f"S3 read of {self._key!r} broke off: {e}") from e
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class _FullReads:
    """Reads that return ``n`` bytes unless the stream ends.

    s3transfer takes a short first read from a non-seekable stream for the end of a small body and
    then reads *the whole rest into memory* for a single PutObject; raw streams (sockets, pipes,
    ``RawIOBase``) do return short reads.
    """

    def __init__(self, raw: IO[bytes]):
        self._raw = raw

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return self._raw.read()
        parts, got = [], 0
        while got < n and (chunk := self._raw.read(n - got)):
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)


def _full_reads(body: IO[bytes]) -> IO[bytes] | _FullReads:
    seekable = getattr(body, "seekable", None)
    return body if seekable is not None and seekable() else _FullReads(body)


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _message(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Message", ""))


def _unquote(etag: str) -> str:
    return etag.strip('"')
