"""Checking a whole JSONL file in one streaming pass, and describing what it holds.

``validate_jsonl`` reads a stream chunk by chunk (never the whole file), lists the broken lines
with their numbers, and describes the good file: its format, its number of examples, the tokens
and supervised (response) tokens per example under the base model's chat template, examples
longer than the context, and duplicates. Broken lines are errors; long examples and duplicates
are warnings. The files API runs it on every upload, ``tuneserve files validate`` on a local file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from training.data.formats import FormatReader, Kind
from training.data.jsonl import LineProblem, Readable, decode_line, iter_raw_lines

MAX_PROBLEMS = 20
MAX_WARNINGS = 10
MAX_TRACKED = 250_000
"""Examples remembered for duplicate detection (~100 bytes each): later ones are checked
against these but not remembered, so a file of millions of short lines stays within ~25 MB."""

TokenCounter = Callable[[dict], tuple[int, int]]
"""Maps a normalised example to (tokens, supervised tokens); raises LineProblem if it cannot."""


@dataclass(frozen=True)
class Problem:
    line: int | None
    """1-based line number; None for a problem of the whole file (it is empty)."""
    code: str
    message: str

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"


@dataclass
class Stats:
    """min / mean / max of a count per example."""

    count: int = 0
    total: int = 0
    min: int | None = None
    max: int | None = None

    def add(self, value: int) -> None:
        self.count += 1
        self.total += value
        self.min = value if self.min is None else min(self.min, value)
        self.max = value if self.max is None else max(self.max, value)

    def as_dict(self) -> dict[str, float | int | None]:
        mean = round(self.total / self.count, 1) if self.count else None
        return {"min": self.min, "mean": mean, "max": self.max, "total": self.total}


@dataclass
class FileReport:
    """What one pass over a file found."""

    format: str | None = None
    kind: Kind | None = None
    examples: int = 0
    lines: int = 0
    problems: list[Problem] = field(default_factory=list)
    """The first ``MAX_PROBLEMS`` problems, in line order."""
    problem_count: int = 0
    duplicates: int = 0
    tokens: Stats | None = None
    supervised_tokens: Stats | None = None
    context_length: int | None = None
    over_context: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def add_problem(self, problem: Problem) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)

    def warn(self, message: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(message)

    def summary(self, limit: int = 5) -> str:
        """The first problems in one line, for an error message."""
        shown = "; ".join(str(p) for p in self.problems[:limit])
        more = self.problem_count - min(limit, len(self.problems))
        return shown + (f" (and {more} more problem{'s' * (more > 1)})" if more > 0 else "")

    def description(self) -> dict[str, Any]:
        """The file's description as the files API returns it."""
        return {
            "format": self.format, "kind": self.kind, "examples": self.examples,
            "tokens": self.tokens.as_dict() if self.tokens else None,
            "supervised_tokens": (self.supervised_tokens.as_dict()
                                  if self.supervised_tokens else None),
            "tokenized_examples": self.tokens.count if self.tokens else None,
            "context_length": self.context_length,
            "over_context": self.over_context if self.tokens else None,
            "duplicates": self.duplicates, "warnings": list(self.warnings),
        }


def validate_jsonl(stream: Readable, *, max_line_bytes: int, tokenizer: Any = None,
                   max_length: int | None = None, declared_format: str | None = None,
                   count_tokens: TokenCounter | None = None,
                   max_tokenized: int | None = None) -> FileReport:
    """Check every line of a JSONL stream and describe the file.

    Args:
        stream: anything with ``read(n)`` (bytes or text).
        max_line_bytes: a longer line is a problem (its bytes are skipped, not held).
        tokenizer: a Hugging Face tokenizer of the base model; with it the report counts tokens
            and supervised tokens under its chat template. None skips token counts.
        max_length: the context length; examples longer than it are counted (a warning).
        declared_format: the format the caller named; None detects it from the keys.
        count_tokens: overrides the tokenizer-based counter (tests, other templates).
        max_tokenized: count tokens of the first this many examples only (the chat template
            costs milliseconds per example); None counts all. Every line is still checked.

    Raises:
        ValueError: ``declared_format`` is not a known format.
    """
    reader = FormatReader(declared_format)
    report = FileReport(context_length=max_length)
    if count_tokens is None and tokenizer is not None:
        count_tokens = chat_token_counter(tokenizer)
    if count_tokens is not None:
        report.tokens, report.supervised_tokens = Stats(), Stats()
    seen: dict[bytes, int] = {}
    for number, raw in iter_raw_lines(stream, max_line_bytes):
        report.lines = number
        try:
            value = decode_line(number, raw, max_line_bytes)
            if value is None:
                continue
            example = reader.read(number, value)
            if count_tokens is not None and (max_tokenized is None
                                             or report.examples < max_tokenized):
                _count(report, number, count_tokens(example), max_length)
        except LineProblem as exc:
            report.add_problem(Problem(number, exc.code, exc.message))
            continue
        report.examples += 1
        _note_duplicate(report, seen, number, example)
    if reader.format is not None:
        report.format, report.kind = reader.format.name, reader.format.kind
    if report.examples == 0 and report.problem_count == 0:
        report.add_problem(Problem(None, "empty_file", "the file holds no examples"))
    return report


def _count(report: FileReport, number: int, counts: tuple[int, int],
           max_length: int | None) -> None:
    tokens, supervised = counts
    assert report.tokens is not None and report.supervised_tokens is not None
    report.tokens.add(tokens)
    report.supervised_tokens.add(supervised)
    if max_length is not None and tokens > max_length:
        report.over_context += 1
        report.warn(f"line {number}: {tokens} tokens, longer than the context of {max_length}; "
                    "it will be truncated")


def _note_duplicate(report: FileReport, seen: dict[bytes, int], number: int, example: dict) -> None:
    digest = hashlib.blake2b(json.dumps(example, sort_keys=True).encode(), digest_size=16).digest()
    first = seen.get(digest)
    if first is None and len(seen) < MAX_TRACKED:
        seen[digest] = number
    elif first is not None:
        report.duplicates += 1
        report.warn(f"line {number} duplicates line {first}")


def chat_token_counter(tokenizer: Any) -> TokenCounter:
    """Counts tokens as training will see them: the base model's chat template, with labels
    only on the trained responses (``training.model.chat``)."""
    from training.model import chat  # imported here: it pulls in the tokenizer stack

    def count(example: dict) -> tuple[int, int]:
        try:
            if "messages" in example:
                tokenized = chat.tokenize_conversation(tokenizer, example["messages"], None)
                ids, labels = tokenized.input_ids, tokenized.labels
            else:
                pair = chat.tokenize_preference(tokenizer, example["prompt"], example["chosen"],
                                                example["rejected"], None)
                ids, labels = pair.chosen.input_ids, pair.chosen.labels
        except chat.MaskError as exc:
            raise LineProblem("template_error", f"cannot apply the chat template: {exc}") from None
        return len(ids), sum(1 for label in labels if label != chat.IGNORE_INDEX)

    return count
