"""The one check of a training file: the files API runs it on every upload, ``tuneserve files
validate`` on a local file, with the same limits, the same tokenizer and the same verdict.

What it checks is ``training.data.validation.validate_file``; here are the service's choices:

- limits from the settings: ``TUNESERVE_MAX_LINE_BYTES`` per line or array record, and a
  compressed file may decompress to at most ``DECOMPRESSION_RATIO`` times
  ``TUNESERVE_MAX_UPLOAD_BYTES`` (the upload limit counts the bytes received; this bounds what
  a small zip bomb can cost: reading that many bytes, then a 413);
- tokens counted under the first base model's tokenizer and chat template (the built-in model
  unless configured otherwise), for the first ``TOKENIZED_EXAMPLES`` examples;
- the refusal: one message whose first words say what the file was read as (container and
  layout), then its first problems, then what to change.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from service.core.errors import InvalidRequest, PayloadTooLarge, TuneserveError
from service.core.names import base_model_ids
from service.core.settings import Settings

if TYPE_CHECKING:
    from training.data.jsonl import Readable
    from training.data.validation import FileReport, InvalidRecords, TokenCounter

log = logging.getLogger(__name__)

DECOMPRESSION_RATIO = 4
"""A gzip or zstd upload may hold up to this many times ``TUNESERVE_MAX_UPLOAD_BYTES`` once
decompressed (instruction data compresses 3-5x; a bomb compresses 1000x)."""

TOKENIZED_EXAMPLES = 2000
"""Token statistics cover the first this many examples of a file: the exact count under the
chat template costs a few milliseconds per example, too slow for every line of a 512 MB file
within one request. Every record is still validated."""


@functools.lru_cache(maxsize=4)
def _shared_counter(model_dir: str) -> TokenCounter:
    """One tokenizer per model directory in this process (apps in tests, replicas' reloads)."""
    from training.data.validation import chat_token_counter
    from training.model.registry import load_tokenizer

    count = chat_token_counter(load_tokenizer(model_dir))
    lock = threading.Lock()  # a fast tokenizer raises "Already borrowed" when used concurrently

    def locked(example: dict) -> tuple[int, int]:
        with lock:
            return count(example)

    return locked


class FileTokenizer:
    """A base model's tokenizer, counting tokens as training does (None: no token counts)."""

    def __init__(self, model: str | None = None, model_dir: str | None = None,
                 context_length: int | None = None):
        self.model, self.context_length = model, context_length
        self.counter = _shared_counter(model_dir) if model_dir else None


def load_file_tokenizer(settings: Settings, model: str | None = None) -> FileTokenizer:
    """The tokenizer of ``model``, by default the first base model (the built-in one unless the
    settings say otherwise), from the local model cache.

    Raises:
        Exception: whatever loading the model raised (the caller decides whether a file is
            described without token counts or the user is told).
    """
    from training.model.registry import resolve_model

    model = model or next(iter(base_model_ids(settings)), None)
    if model is None:
        return FileTokenizer()
    # Local cache only (storage=None): sharing the converted weights through storage is the
    # trainers' job; checking a file needs just the tokenizer and the config.
    model_dir = resolve_model(model, None, settings.models)
    config = json.loads((model_dir / "config.json").read_text())
    return FileTokenizer(model, str(model_dir), config.get("max_position_embeddings"))


@dataclass(frozen=True)
class FileChecks:
    """Everything a check of a file depends on besides the file."""

    max_line_bytes: int
    max_decompressed_bytes: int
    tokens: FileTokenizer = field(default_factory=FileTokenizer)

    @classmethod
    def from_settings(cls, settings: Settings, tokens: FileTokenizer) -> FileChecks:
        return cls(settings.max_line_bytes, DECOMPRESSION_RATIO * settings.max_upload_bytes,
                   tokens)


def check_file(stream: Readable, checks: FileChecks, *, declared_format: str | None = None,
               invalid_records: InvalidRecords = "refuse") -> FileReport:
    """The report of one file, as the files API makes it for an upload."""
    from training.data.validation import validate_file

    return validate_file(stream, max_line_bytes=checks.max_line_bytes,
                         max_decompressed_bytes=checks.max_decompressed_bytes,
                         max_length=checks.tokens.context_length, declared_format=declared_format,
                         count_tokens=checks.tokens.counter, max_tokenized=TOKENIZED_EXAMPLES,
                         invalid_records=invalid_records)


def description(report: FileReport, checks: FileChecks) -> dict[str, Any]:
    """An accepted file's description, as the files API stores and returns it."""
    return {**report.description(), "model": checks.tokens.model}


def refusal_message(report: FileReport) -> str:
    """Why a file is refused, starting with what it was read as, ending with what to change."""
    read_as, fatal = f"This is {report.read_as()}", report.fatal
    if fatal is not None and fatal.code == "decompressed_too_large":
        return (f"{read_as}; {fatal.message} ({DECOMPRESSION_RATIO} x TUNESERVE_MAX_UPLOAD_BYTES)."
                " Split it into smaller files.")
    if fatal is not None or not report.problems or report.problems[0].line is None:
        return f"{read_as}; {report.summary()}."  # the problem says what to change
    if report.examples == 0 and report.invalid_records == "skip":
        return (f"{read_as}; no valid {report.unit} is left once the invalid ones are skipped: "
                f"{report.summary()}.")
    if report.format is None:
        advice = "Use one of the layouts listed, or declare one with the form field 'format'."
    else:
        advice = (f"Fix these {report.unit}s, or upload with the form field "
                  "invalid_records=skip to train on the others (the skipped ones are counted "
                  "in the file's description).")
    return f"{read_as}; {report.summary()}. {advice}"


def refusal(report: FileReport) -> TuneserveError:
    """The error answering an upload of a refused file: 413 for an over-large decompressed
    size (naming the limit), 400 otherwise."""
    message = refusal_message(report)
    if report.fatal is not None and report.fatal.code == "decompressed_too_large":
        return PayloadTooLarge(message, param="file", code="decompressed_too_large")
    return InvalidRequest(message, param="file", code="invalid_file")
