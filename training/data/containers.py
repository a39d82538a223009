"""How a training file's records are packed, recognised from its bytes, never from its name.

Two structures: JSON Lines (one record per line) and one JSON array of records (``[{…}, {…}]``,
how Alpaca, ShareGPT and the LLaMA-Factory demo files ship), either of them plain or gzip- or
zstd-compressed (how Anthropic's HH-RLHF ships). Compression is told by its magic bytes, the
structure by the first non-blank character (``[`` is an array).

Everything streams: compressed bytes are decompressed as they are read, and an array is parsed
one record at a time (``ijson``), so neither a large file nor a large array is ever held whole.
Two bounds keep a hostile file from costing more than a plain one:

- a record is at most ``max_record_bytes`` (the line limit), in an array as on a line;
- decompressed content is at most ``max_decompressed_bytes`` (the files API sets a fixed
  multiple of its upload limit): past it reading stops with ``DecompressedTooLarge``, so a
  small zip bomb costs no more than reading that many bytes.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import ijson
import zstandard

from training.data.jsonl import (CHUNK_BYTES, FileProblem, LineProblem, Readable, decode_line,
                                 iter_raw_lines)

Compression = Literal["gzip", "zstd"]
Structure = Literal["jsonl", "json_array"]

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BOM = b"\xef\xbb\xbf"
_BLANK = b" \t\r\n"
SNIFF_BYTES = 1 << 20
"""How far to look for the first non-blank character; a file blank that far is read as JSONL."""


@dataclass(frozen=True)
class Container:
    structure: Structure = "jsonl"
    compression: Compression | None = None

    @property
    def unit(self) -> str:
        """What problems are numbered by: lines of JSONL, records of an array (from 1)."""
        return "record" if self.structure == "json_array" else "line"

    def __str__(self) -> str:
        what = "JSON array" if self.structure == "json_array" else "JSONL file"
        return f"a {self.compression}-compressed {what}" if self.compression else f"a {what}"


class DecompressedTooLarge(FileProblem):
    """The content decompresses to more than the limit (a zip bomb, or simply too much data)."""

    def __init__(self, limit: int):
        super().__init__("decompressed_too_large", f"the file decompresses to more than the "
                         f"limit of {limit} bytes")
        self.limit = limit


class _Source:
    """A byte stream that can be peeked at; text streams are read as the UTF-8 they came from."""

    def __init__(self, stream: Readable):
        self._stream = stream
        self._head = b""

    def _read_raw(self, size: int) -> bytes:
        chunk = self._stream.read(size)
        if isinstance(chunk, str):
            chunk = chunk.encode("utf-8", "surrogateescape")
        return chunk

    def peek(self, size: int) -> bytes:
        while len(self._head) < size and (chunk := self._read_raw(size - len(self._head))):
            self._head += chunk
        return self._head[:size]

    def skip(self, size: int) -> None:
        self.peek(size)
        self._head = self._head[size:]

    def read(self, size: int = -1) -> bytes:
        if self._head:
            n = len(self._head) if size is None or size < 0 else size
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._read_raw(CHUNK_BYTES if size is None or size < 0 else size)


class _Decompressed:
    """Reads a decompressor, counting its output against the limit; corrupt data and the limit
    become ``FileProblem``s."""

    def __init__(self, reader: Any, limit: int | None):
        self._reader, self._limit, self.total = reader, limit, 0

    def read(self, size: int = -1) -> bytes:
        try:
            chunk = self._reader.read(CHUNK_BYTES if size is None or size < 0 else size)
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            raise FileProblem("invalid_compression", f"the compressed data is corrupt or cut "
                              f"short after {self.total} bytes: {exc}") from None
        self.total += len(chunk)
        if self._limit is not None and self.total > self._limit:
            raise DecompressedTooLarge(self._limit)
        return chunk


def _decompressed(source: _Source, limit: int | None) -> tuple[Compression | None, Readable]:
    magic = source.peek(4)
    if magic.startswith(GZIP_MAGIC):
        return "gzip", _Decompressed(gzip.GzipFile(fileobj=source, mode="rb"), limit)  # type: ignore[arg-type]
    if magic == ZSTD_MAGIC:
        reader = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)
        return "zstd", _Decompressed(reader, limit)
    return None, source


def _structure(source: _Source) -> Structure:
    head = source.peek(SNIFF_BYTES)
    first = head.removeprefix(_BOM).lstrip(_BLANK)[:1]
    return "json_array" if first == b"[" else "jsonl"


class Records:
    """The records of one file, in order, after ``open_records`` recognised its container.

    Iterating yields ``(number, value)``: the JSON value of each non-blank line or array element,
    or a ``LineProblem`` in its place for one that cannot be read. A ``FileProblem`` is the last
    thing yielded (nothing after it can be read).
    """

    def __init__(self, source: _Source, container: Container, max_record_bytes: int):
        self._source, self.container, self._max = source, container, max_record_bytes
        self.count = 0
        """Lines (JSONL, blank ones included) or records (array) read so far."""

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        values = self._array() if self.container.structure == "json_array" else self._lines()
        try:
            yield from values
        except FileProblem as exc:
            yield self.count + 1, exc

    def _lines(self) -> Iterator[tuple[int, Any]]:
        for number, raw in iter_raw_lines(self._source, self._max):
            self.count = number
            try:
                value = decode_line(number, raw, self._max)
            except LineProblem as exc:
                yield number, exc
                if isinstance(exc, FileProblem):
                    return
                continue
            if value is not None:
                yield number, value

    def _array(self) -> Iterator[tuple[int, Any]]:
        self._source.skip(len(_BOM) if self._source.peek(3) == _BOM else 0)
        budget = _RecordBudget(self._source, self._max)
        items = ijson.items(budget, "item", use_float=True, buf_size=CHUNK_BYTES)
        while True:
            try:
                value = next(items)
            except StopIteration:
                return
            except ijson.JSONError as exc:
                detail = str(exc).strip().splitlines()[0].removeprefix("b'").strip()
                raise FileProblem("invalid_json", f"invalid JSON in the array (at or after "
                                  f"record {self.count + 1}): {detail}; nothing after it can "
                                  "be read") from None
            self.count += 1
            budget.record_done()
            yield self.count, (LineProblem("not_an_object", "expected a JSON object, got null")
                               if value is None else value)


class _RecordBudget:
    """Feeds the array parser, refusing to read more than one record's limit (give or take a
    chunk) past the end of the previous record: a huge record is never built in memory."""

    def __init__(self, source: Readable, max_record_bytes: int):
        self._source, self._max = source, max_record_bytes
        self._read = self._mark = 0

    def record_done(self) -> None:
        self._mark = self._read

    def read(self, size: int = -1) -> bytes:
        if self._read - self._mark > self._max + CHUNK_BYTES:
            raise FileProblem("record_too_long", f"a record is longer than the limit of "
                              f"{self._max} bytes; nothing after it can be read")
        chunk = self._source.read(size)
        self._read += len(chunk)
        return chunk  # type: ignore[return-value]


def open_records(stream: Readable, *, max_record_bytes: int,
                 max_decompressed_bytes: int | None = None) -> Records:
    """Recognise the container of ``stream`` (reading at most ``SNIFF_BYTES`` ahead) and return
    its records.

    Args:
        stream: anything with ``read(n)`` returning bytes or text (a storage object, a file).
        max_record_bytes: the longest line or array element.
        max_decompressed_bytes: the most a compressed stream may decompress to; None: no limit.
    """
    source = _Source(stream)
    compression, readable = _decompressed(source, max_decompressed_bytes)
    if compression is not None:
        source = _Source(readable)
    try:
        structure = _structure(source)
    except FileProblem as exc:  # corrupt or over-large within the first bytes
        return _Broken(source, Container("jsonl", compression), max_record_bytes, exc)
    return Records(source, Container(structure, compression), max_record_bytes)


class _Broken(Records):
    """A file whose container could not even be sniffed: its one item is the problem."""

    def __init__(self, source: _Source, container: Container, max_record_bytes: int,
                 problem: FileProblem):
        super().__init__(source, container, max_record_bytes)
        self._problem = problem

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        yield 1, self._problem
