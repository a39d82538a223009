"""Receiving a multipart upload straight into storage, with the size limit enforced as it arrives.

Starlette's form parser spools a file part to a temporary file before the endpoint runs, so a
limit checked in the endpoint comes after the whole body was read. Here the body is parsed as it
streams in (python-multipart's push parser): small form fields are kept in memory, the file part
is handed chunk by chunk through a bounded pipe to ``storage.put`` running in a worker thread.
At most ``PIPE_CHUNKS`` chunks are in flight, whatever the size of the upload; the moment the
file passes the limit the request is answered 413 and the partial write is abandoned.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections import deque
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header
from python_multipart.exceptions import MultipartParseError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from service.core.errors import InvalidRequest, PayloadTooLarge
from service.core.storage import Storage

PIPE_CHUNKS = 16
MAX_FIELD_BYTES = 4096
FORM_OVERHEAD_BYTES = 64 * 1024
"""Room for boundaries, part headers and small fields on top of the file's own limit."""


class _Aborted(Exception):
    """Raised inside the storage write when the upload is abandoned."""


class Pipe(io.RawIOBase):
    """A bounded byte channel: the event loop feeds chunks, a storage write reads them."""

    def __init__(self, max_chunks: int = PIPE_CHUNKS):
        super().__init__()
        self._chunks: deque[bytes] = deque()
        self._max = max_chunks
        self._cond = threading.Condition()
        self._eof = False
        self._aborted = False
        self._reader_gone = False
        self._view = memoryview(b"")

    # -- writer side
    def has_room(self) -> bool:
        with self._cond:
            return len(self._chunks) < self._max

    def feed(self, data: bytes) -> None:
        """Add a chunk, waiting while the pipe is full. Raises BrokenPipeError when the reader
        stopped (the storage write failed)."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._chunks) < self._max or self._reader_gone)
            if self._reader_gone:
                raise BrokenPipeError("the storage write stopped")
            self._chunks.append(data)
            self._cond.notify_all()

    def finish(self) -> None:
        self._signal("_eof")

    def abort(self) -> None:
        self._signal("_aborted")

    def reader_done(self) -> None:
        self._signal("_reader_gone")

    def _signal(self, flag: str) -> None:
        """Raise one of the pipe's flags and wake both sides; an abort also drops what is queued."""
        with self._cond:
            setattr(self, flag, True)
            if flag == "_aborted":
                self._chunks.clear()
            self._cond.notify_all()

    # -- reader side (io.RawIOBase)
    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if not self._view:
            with self._cond:
                self._cond.wait_for(lambda: self._chunks or self._eof or self._aborted)
                if self._aborted:
                    raise _Aborted("upload abandoned")
                if not self._chunks:
                    return 0
                self._view = memoryview(self._chunks.popleft())
                self._cond.notify_all()
        n = min(len(buffer), len(self._view))
        buffer[:n] = self._view[:n]
        self._view = self._view[n:]
        return n


class StorageSink:
    """``storage.put(key, pipe)`` in a worker thread, fed from the event loop."""

    def __init__(self, storage: Storage, key: str):
        self.pipe = Pipe()
        self._storage, self._key = storage, key
        self._task = asyncio.get_running_loop().run_in_executor(None, self._run)

    def _run(self) -> str:
        try:
            return self._storage.put(self._key, self.pipe)
        finally:
            self.pipe.reader_done()

    async def write(self, data: bytes) -> None:
        try:
            if self.pipe.has_room():
                self.pipe.feed(data)  # never waits: there is room
            else:
                await run_in_threadpool(self.pipe.feed, data)
        except BrokenPipeError:
            await self._task  # raises the storage error that stopped the reader
            raise

    async def close(self) -> None:
        self.pipe.finish()
        await self._task

    async def abort(self) -> None:
        self.pipe.abort()
        try:
            await self._task
        except Exception:  # noqa: BLE001 - the write was abandoned on purpose
            pass


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    has_file: bool = False
    size: int = 0
    """Bytes of the file part written to storage."""


class _Form:
    """python-multipart callbacks → a list of events the async side acts on."""

    def __init__(self, boundary: bytes, file_field: str):
        self.file_field = file_field
        self.events: list[tuple[str, bytes | str | None]] = []
        self.fields: dict[str, str] = {}
        self._headers: dict[str, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._part: str | None = None
        self._is_file = False
        self._value = bytearray()
        self.parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self._begin, "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value, "on_header_end": self._on_header_end,
            "on_headers_finished": self._headers_done, "on_part_data": self._data,
            "on_part_end": self._end})

    def _begin(self) -> None:
        self._headers, self._value = {}, bytearray()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_name.decode("latin-1").lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._part, self._is_file = name, name == self.file_field
        if self._is_file:
            filename = options.get(b"filename")
            self.events.append(("start", filename.decode("utf-8", "replace") if filename else None))

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.events.append(("data", bytes(data[start:end])))
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"Form field {self._part!r} is longer than "
                                 f"{MAX_FIELD_BYTES} bytes.",
                                 param=self._part, code="field_too_long")

    def _end(self) -> None:
        if self._is_file:
            self.events.append(("end", None))
        elif self._part:
            self.fields[self._part] = self._value.decode("utf-8", "replace")


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidRequest("Send the file as multipart/form-data with fields 'file' and "
                             "'purpose'.",
                             param="file", code="invalid_content_type")
    return boundary


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The file is larger than the limit of {limit} bytes "
                           "(TUNESERVE_MAX_UPLOAD_BYTES).", param="file", code="file_too_large")


async def receive_upload(request: Request, storage: Storage, key: str, *, max_file_bytes: int,
                         file_field: str = "file") -> Upload:
    """Stream a multipart/form-data body: fields into ``Upload.fields``, the file part into
    storage at ``key``.

    Raises:
        PayloadTooLarge: the declared Content-Length or the bytes received pass the limit
            (answered before the rest of the body is read; nothing stays at ``key``).
        InvalidRequest: not multipart, a malformed body, two file parts.
    """
    form = _Form(_boundary(request), file_field)
    max_body = max_file_bytes + FORM_OVERHEAD_BYTES
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        raise _too_large(max_file_bytes)
    upload, sink, received = Upload(), None, 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_body:
                raise _too_large(max_file_bytes)
            try:
                form.parser.write(chunk)
            except MultipartParseError as exc:
                raise InvalidRequest(f"Malformed multipart body: {exc}", param="file",
                                     code="invalid_multipart") from None
            sink = await _handle(form, upload, sink, storage, key, max_file_bytes)
        form.parser.finalize()
        if sink is not None:  # the body ended inside the file part
            raise InvalidRequest("Malformed multipart body: the file part is not closed.",
                                 param="file", code="invalid_multipart")
    except BaseException:  # a limit, a bad body, a client gone, a cancelled request
        if sink is not None:
            await sink.abort()
        raise
    upload.fields = form.fields
    return upload


async def _handle(form: _Form, upload: Upload, sink: StorageSink | None, storage: Storage,
                  key: str, limit: int) -> StorageSink | None:
    """Act on the events of one parsed chunk; returns the open sink (None between parts)."""
    events, form.events = form.events, []
    try:
        for kind, value in events:
            if kind == "start":
                if upload.has_file:
                    raise InvalidRequest("Send one file per upload.", param="file",
                                         code="too_many_files")
                upload.has_file, upload.filename = True, value  # type: ignore[assignment]
                sink = StorageSink(storage, key)
            elif kind == "data" and sink is not None:
                upload.size += len(value)  # type: ignore[arg-type]
                if upload.size > limit:
                    raise _too_large(limit)
                await sink.write(value)  # type: ignore[arg-type]
            elif kind == "end" and sink is not None:
                await sink.close()
                sink = None
    except BaseException:
        # A sink opened by this call is not yet known to the caller: abort it here, or its
        # storage write waits for data forever and holds a worker thread.
        if sink is not None:
            await sink.abort()
        raise
    return sink
