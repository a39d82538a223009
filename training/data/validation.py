"""Checking a whole training file in one streaming pass, and describing what it holds.

``validate_file`` reads a stream chunk by chunk (never the whole file), in any container
(``training.data.containers``: JSONL or a JSON array, plain, gzip or zstd), lists the broken
records with their numbers, and describes the good file: its container and layout, its number of
examples, the tokens and supervised tokens per example under the base model's chat template,
examples longer than the context, duplicates, keys it ignored and what it changed (end markers
removed). Broken records are errors, unless the caller chose to skip them (then they are counted
with their reasons); long examples, duplicates and ignored keys are warnings. The files API runs
it on every upload, ``tuneserve files validate`` on a local file
(``service.files.validation`` sets both up the same way).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from training.data.containers import Container, open_records
from training.data.formats import FormatReader, Kind, TrainsOn
from training.data.jsonl import FileProblem, LineProblem, Readable

MAX_PROBLEMS = 20
MAX_WARNINGS = 10
MAX_TRACKED = 250_000
"""Examples remembered for duplicate detection (~100 bytes each): later ones are checked
against these but not remembered, so a file of millions of short lines stays within ~25 MB."""

InvalidRecords = Literal["refuse", "skip"]
"""What an invalid record does to its file: refuse the whole file (the default), or skip the
record, counted with its reason in the description."""

TokenCounter = Callable[[dict], tuple[int, int]]
"""Maps a normalised example to (tokens, supervised tokens); raises LineProblem if it cannot."""


@dataclass(frozen=True)
class Problem:
    line: int | None
    """1-based line (JSONL) or record (JSON array) number; None for a problem of the whole file
    (it is empty)."""
    code: str
    message: str
    unit: str = "line"

    def __str__(self) -> str:
        return self.message if self.line is None else f"{self.unit} {self.line}: {self.message}"


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

    container: Container = field(default_factory=Container)
    format: str | None = None
    format_summary: str | None = None
    kind: Kind | None = None
    trains_on: TrainsOn | None = None
    examples: int = 0
    lines: int = 0
    """Lines (JSONL, blank ones included) or records (JSON array) read."""
    problems: list[Problem] = field(default_factory=list)
    """The first ``MAX_PROBLEMS`` problems, in file order."""
    problem_count: int = 0
    fatal: Problem | None = None
    """A problem that ended the reading (``FileProblem``); the file is refused, whatever
    ``invalid_records`` says."""
    invalid_records: InvalidRecords = "refuse"
    skipped: Counter[str] = field(default_factory=Counter)
    """Skipped records per problem code (``invalid_records="skip"``)."""
    duplicates: int = 0
    tokens: Stats | None = None
    supervised_tokens: Stats | None = None
    context_length: int | None = None
    over_context: int = 0
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the reader did to the records (end markers removed), and how the file trains."""
    ignored_keys: dict[str, int] = field(default_factory=dict)
    """Keys of the records that their layout does not read, with how many records had them."""
    item_fields: set[str] | None = None
    """Reinforcement prompts: the fields every line has (what a grader's ``{{item.…}}`` may
    read; checked against the grader when a job names one)."""

    @property
    def ok(self) -> bool:
        if self.fatal is not None or self.examples == 0:
            return False
        return self.problem_count == 0 or self.invalid_records == "skip"

    @property
    def unit(self) -> str:
        return self.container.unit

    def add_problem(self, problem: Problem) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        if self.invalid_records == "skip" and problem.line is not None:
            self.skipped[problem.code] += 1

    def warn(self, message: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(message)

    def summary(self, limit: int = 5) -> str:
        """The first problems in one line, for an error message."""
        shown = "; ".join(str(p) for p in self.problems[:limit])
        more = self.problem_count - min(limit, len(self.problems))
        return shown + (f" (and {more} more problem{'s' * (more > 1)})" if more > 0 else "")

    def read_as(self) -> str:
        """What the file was read as, e.g. "a gzip-compressed JSONL file of HH-RLHF records
        (chosen/rejected Human:/Assistant: transcripts)"."""
        if self.format_summary is None:
            return f"{self.container} whose layout was not recognised"
        layout, _, detail = self.format_summary.partition(": ")
        return f"{self.container} of {layout} records" + (f" ({detail})" if detail else "")

    def description(self) -> dict[str, Any]:
        """The file's description as the files API returns it."""
        skipped = None
        if self.invalid_records == "skip":
            skipped = {"records": sum(self.skipped.values()), "reasons": dict(self.skipped),
                       "first": [str(p) for p in self.problems]}
        return {
            "format": self.format, "kind": self.kind, "trains_on": self.trains_on,
            "container": self.container.structure, "compression": self.container.compression,
            "examples": self.examples,
            "tokens": self.tokens.as_dict() if self.tokens else None,
            "supervised_tokens": (self.supervised_tokens.as_dict()
                                  if self.supervised_tokens else None),
            "tokenized_examples": self.tokens.count if self.tokens else None,
            "context_length": self.context_length,
            "over_context": self.over_context if self.tokens else None,
            "duplicates": self.duplicates, "warnings": list(self.warnings),
            "notes": list(self.notes), "ignored_keys": dict(self.ignored_keys),
            "invalid_records": self.invalid_records,
            "skipped": skipped,
            "item_fields": (sorted(self.item_fields) if self.item_fields is not None
                            else None),
        }


def validate_file(stream: Readable, *, max_line_bytes: int,
                  max_decompressed_bytes: int | None = None, tokenizer: Any = None,
                  max_length: int | None = None, declared_format: str | None = None,
                  count_tokens: TokenCounter | None = None, max_tokenized: int | None = None,
                  invalid_records: InvalidRecords = "refuse") -> FileReport:
    """Check every record of a training file and describe the file.

    Args:
        stream: anything with ``read(n)`` (bytes or text), in any container.
        max_line_bytes: a longer line or array record is a problem (its bytes are not held).
        max_decompressed_bytes: the most a compressed file may decompress to (None: no limit);
            past it the file is refused (``decompressed_too_large``).
        tokenizer: a Hugging Face tokenizer of the base model; with it the report counts tokens
            and supervised tokens under its chat template. None skips token counts.
        max_length: the context length; examples longer than it are counted (a warning).
        declared_format: the layout the caller named; None detects it from the keys.
        count_tokens: overrides the tokenizer-based counter (tests, other templates).
        max_tokenized: count tokens of the first this many examples only (the chat template
            costs milliseconds per example); None counts all. Every record is still checked.
        invalid_records: "skip" keeps the file when some records are invalid, counting them.

    Raises:
        ValueError: ``declared_format`` is not a known layout.
    """
    reader = FormatReader(declared_format)
    records = open_records(stream, max_record_bytes=max_line_bytes,
                           max_decompressed_bytes=max_decompressed_bytes)
    reader.unit = records.container.unit
    report = FileReport(container=records.container, context_length=max_length,
                        invalid_records=invalid_records)
    if count_tokens is None and tokenizer is not None:
        count_tokens = chat_token_counter(tokenizer)
    if count_tokens is not None:
        report.tokens, report.supervised_tokens = Stats(), Stats()
    seen: dict[bytes, int] = {}
    for number, value in records:
        try:
            if isinstance(value, LineProblem):
                raise value
            examples = reader.read(number, value)
            counts = [count_tokens(e) if count_tokens is not None and (
                max_tokenized is None or report.examples + i < max_tokenized) else None
                for i, e in enumerate(examples)]
        except LineProblem as exc:
            problem = Problem(number, exc.code, exc.message, report.unit)
            if isinstance(exc, FileProblem):
                report.fatal = problem
                report.problem_count += 1
                report.problems.insert(0, problem)  # the refusal's first words
                break
            report.add_problem(problem)
            continue
        for example, count in zip(examples, counts, strict=True):
            if count is not None:
                _count(report, number, count, max_length)
            report.examples += 1
            _note_duplicate(report, seen, number, example)
            if "item" in example:
                keys = set(example["item"])
                report.item_fields = keys if report.item_fields is None else (
                    report.item_fields & keys)
    report.lines = records.count
    _describe_layout(report, reader)
    if report.examples == 0 and report.problem_count == 0:
        report.add_problem(Problem(None, "empty_file", "the file holds no examples"))
    return report


def _describe_layout(report: FileReport, reader: FormatReader) -> None:
    fmt = reader.format
    if fmt is not None:
        report.format, report.format_summary = fmt.name, fmt.summary
        if fmt.refusal is None:
            report.kind, report.trains_on = fmt.kind, fmt.trains_on
    if report.trains_on == "all_tokens":
        report.notes.append("plain text: every token is trained on (continued pretraining), "
                            "not only responses")
    report.notes.extend(note.format(n=n) for note, n in reader.notes.items())
    report.ignored_keys = dict(reader.ignored_keys.most_common())


def _count(report: FileReport, number: int, counts: tuple[int, int],
           max_length: int | None) -> None:
    tokens, supervised = counts
    assert report.tokens is not None and report.supervised_tokens is not None
    report.tokens.add(tokens)
    report.supervised_tokens.add(supervised)
    if max_length is not None and tokens > max_length:
        report.over_context += 1
        report.warn(f"{report.unit} {number}: {tokens} tokens, longer than the context of "
                    f"{max_length}; it will be truncated")


def _note_duplicate(report: FileReport, seen: dict[bytes, int], number: int, example: dict) -> None:
    digest = hashlib.blake2b(json.dumps(example, sort_keys=True).encode(), digest_size=16).digest()
    first = seen.get(digest)
    if first is None and len(seen) < MAX_TRACKED:
        seen[digest] = number
    elif first is not None:
        report.duplicates += 1
        report.warn(f"{report.unit} {number} duplicates {report.unit} {first}")


def chat_token_counter(tokenizer: Any) -> TokenCounter:
    """Counts tokens as training will see them: the base model's chat template, with labels
    only on the trained responses (``training.model.chat``)."""
    from training.model import chat  # imported here: it pulls in the tokenizer stack

    def count(example: dict) -> tuple[int, int]:
        try:
            if "item" in example:  # a reinforcement prompt: the answers are sampled
                return len(chat.render_prompt(tokenizer, example["messages"],
                                              example.get("tools"))), 0
            if "text" in example:
                tokenized = chat.tokenize_text(tokenizer, example["text"], None)
                ids, labels = tokenized.input_ids, tokenized.labels
            elif "messages" in example:
                tokenized = chat.tokenize_conversation(tokenizer, example["messages"], None,
                                                       example.get("tools"))
                ids, labels = tokenized.input_ids, tokenized.labels
            else:
                pair = chat.tokenize_preference(tokenizer, example["prompt"], example["chosen"],
                                                example["rejected"], None)
                ids, labels = pair.chosen.input_ids, pair.chosen.labels
        except chat.MaskError as exc:
            raise LineProblem("template_error", f"cannot apply the chat template: {exc}") from None
        return len(ids), sum(1 for label in labels if label != chat.IGNORE_INDEX)

    return count
