"""Reading JSONL the way real files are written: a BOM, CRLF line ends, blank lines, bad bytes.

Streams are read in fixed chunks, so a line over the limit (or a file with no newline at all)
never lands in memory whole: its bytes are skipped and the line is reported as too long.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, Protocol

_BOM = b"\xef\xbb\xbf"
CHUNK_BYTES = 1 << 16


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes | str: ...


class LineProblem(Exception):
    """One broken line or record; ``code`` is a stable machine-readable name of the problem."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class FileProblem(LineProblem):
    """A problem that ends the reading of the whole file: nothing after it can be read (a JSON
    array broken mid-way, a corrupt or over-large compressed stream), or nothing in it may be
    trained on (a layout tuneserve recognises but does not train, such as KTO). Never skipped."""


def iter_raw_lines(stream: Readable, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(line number, bytes without the newline)``, or ``None`` for a line over the limit.

    Line numbers start at 1 and count every line, blank ones included, so they match what an
    editor shows.
    """
    buf = bytearray()
    number = 0
    too_long = False
    while chunk := stream.read(CHUNK_BYTES):
        if isinstance(chunk, str):  # a text stream: read it as the UTF-8 it came from
            chunk = chunk.encode("utf-8", "surrogateescape")
        start = 0
        while (newline := chunk.find(b"\n", start)) >= 0:
            number += 1
            if not too_long:
                buf += chunk[start:newline]
            yield number, None if too_long or len(buf) > max_line_bytes else bytes(buf)
            buf.clear()
            too_long = False
            start = newline + 1
        if not too_long:
            buf += chunk[start:]
            if len(buf) > max_line_bytes:
                too_long = True  # drop what we hold; skip to the next newline
                buf.clear()
    if too_long or buf:
        yield number + 1, None if too_long else bytes(buf)


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def decode_line(number: int, raw: bytes | None, max_line_bytes: int) -> Any | None:
    """The JSON value of one line; None for a blank line.

    Raises:
        LineProblem: the line is too long, not UTF-8, or not JSON.
        FileProblem: the first line is a lone ``{`` (one JSON object spread over many lines).
    """
    if raw is None:
        raise LineProblem("line_too_long",
                          f"line is longer than the limit of {max_line_bytes} bytes")
    if number == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    raw = raw.rstrip(b"\r")
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LineProblem("invalid_utf8", f"invalid UTF-8 at byte {exc.start + 1}") from None
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        if number == 1 and text.strip() == "{":
            raise FileProblem("not_json_lines", "the file is one JSON object written over many "
                              "lines, not JSON Lines: send a JSON array of records "
                              "([{…}, {…}]) or one record per line") from None
        raise LineProblem("invalid_json",
                          f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise LineProblem("invalid_json", f"invalid JSON: {exc}") from None
    if value is None:  # a literal ``null`` is not a blank line: callers skip None
        raise LineProblem("not_an_object", "expected a JSON object, got null")
    if _SURROGATE_ESCAPE.search(text) and not _encodable(value):
        raise LineProblem("invalid_unicode", "a string holds an unpaired UTF-16 surrogate "
                          "escape (such as \\ud800), which is not a character")
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
"""A ``\\uD800``-``\\uDFFF`` escape; paired ones (emoji) are fine, lone ones are not text."""


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
