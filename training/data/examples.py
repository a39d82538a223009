"""Training files in storage → a tokenised dataset with response masks, stored once per run.

Steps, each testable alone:
1. ``read_examples``: stream ``files/<file_id>/content`` from storage, hash it, normalise every
   line (``training.data.formats.iter_normalised``).
2. ``tokenize_examples``: render with the base model's chat template and label only the
   assistant tokens (``training.model.chat.tokenize_conversation``); examples whose mask cannot be
   derived or whose responses do not fit ``max_length`` are dropped, counted and reported with
   their line numbers.
3. ``prepare_split``: rank 0 writes the tokenised split to ``jobs/<job_id>/data/<split>/`` as a
   Hugging Face ``datasets`` folder, with ``stats.json`` last (its presence means "complete";
   a resumed run reuses it). The other ranks wait at a barrier and load it.

Batches, sharding and packing of the loaded split are in ``training.data.packing``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from datasets import Dataset, load_from_disk

from service.core import names
from service.core.errors import InvalidRequest
from training.model import chat
from training.data.formats import iter_normalised

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_REPORTED_PROBLEMS = 20


@dataclass
class SplitStats:
    """What tokenising a split found; reported as an event and kept in ``stats.json``."""

    fingerprint: str
    """Hash of what the tokens depend on: file contents, chat template, max_length."""
    file_hashes: dict[str, str]
    """``file_id -> sha256`` of the raw content (goes into the adapter manifest)."""
    n_lines: int = 0
    n_examples: int = 0
    n_rejected: int = 0
    """Dropped: the response mask could not be derived for the template (``MaskError``)."""
    n_truncated: int = 0
    """Dropped: a response would be cut by ``max_length`` (``TruncatedError``)."""
    n_skipped: int = 0
    """Invalid records skipped (an upload with ``invalid_records=skip`` kept them)."""
    n_tokens: int = 0
    n_supervised: int = 0
    problems: list[str] = field(default_factory=list)
    """The first few dropped examples as ``"<file_id> line <n>: <reason>"``."""

    def note(self, file_id: str, line: int, reason: str) -> None:
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(f"{file_id} line {line}: {reason}")

    def tokenized(self, file_id: str, line: int, tokenize: Callable[[], T]) -> T | None:
        """``tokenize()``, or None with the example counted and noted as truncated or rejected."""
        try:
            return tokenize()
        except chat.TruncatedError as exc:
            self.n_truncated += 1
            self.note(file_id, line, f"truncated: {exc}")
        except chat.MaskError as exc:
            self.n_rejected += 1
            self.note(file_id, line, f"rejected: {exc}")
        return None


class _HashingReader(io.RawIOBase):
    """Reads through ``stream`` and hashes every byte on the way (no second pass over S3)."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self.stream.read(len(buffer))
        n = len(chunk)
        buffer[:n] = chunk
        self.sha256.update(chunk)
        return n


def file_key(file_id: str) -> str:
    return names.file_content_key(file_id)


def read_examples(storage: Any, file_id: str,
                  stats: SplitStats | None = None) -> tuple[list[tuple[int, dict]], str]:
    """``[(line or record number, normalised example)]`` and the sha256 of the file's bytes.
    With ``stats``, invalid records (those an upload chose to skip) are skipped and counted."""

    def skip(number: int, problem: Any) -> None:
        assert stats is not None
        stats.n_skipped += 1
        stats.note(file_id, number, f"skipped: {problem.message}")

    with storage.open(file_key(file_id)) as raw:
        reader = _HashingReader(raw)
        examples = list(iter_normalised(io.BufferedReader(reader, buffer_size=1 << 20),
                                        on_invalid=skip if stats is not None else None))
        while reader.read(1 << 20):  # hash whatever the parser did not need to read
            pass
    return examples, reader.sha256.hexdigest()


def as_messages(example: dict) -> list[dict]:
    """The conversation SFT trains on; a preference pair trains on its chosen response."""
    if "messages" in example:
        return example["messages"]
    return [*example["prompt"], {"role": "assistant", "content": example["chosen"]}]


def tokenize_examples(tokenizer: Any, examples: list[tuple[int, dict]], max_length: int,
                      file_id: str, stats: SplitStats) -> Iterator[tuple[list[int], list[int]]]:
    """Yield ``(input_ids, labels)`` per usable example; count and note the dropped ones."""
    for line, example in examples:
        stats.n_lines += 1
        tokens = stats.tokenized(file_id, line, lambda: (
            chat.tokenize_text(tokenizer, example["text"], max_length) if "text" in example
            else chat.tokenize_conversation(tokenizer, as_messages(example), max_length,
                                            example.get("tools"))))
        if tokens is None:
            continue
        input_ids, labels = list(tokens.input_ids), list(tokens.labels)
        stats.n_examples += 1
        stats.n_tokens += len(input_ids)
        stats.n_supervised += sum(1 for y in labels[1:] if y != chat.IGNORE_INDEX)
        yield input_ids, labels


def fingerprint(file_ids: list[str], template_hash: str, max_length: int) -> str:
    text = json.dumps([file_ids, template_hash, max_length, 1])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def split_prefix(job_id: str, split: str) -> str:
    return names.split_prefix(job_id, split)


def build_split(storage: Any, tokenizer: Any, file_ids: list[str], max_length: int,
                template_hash: str) -> tuple[Dataset, SplitStats]:
    """Read and tokenise the files of one split (column ``source`` = index into ``file_ids``)."""
    stats = SplitStats(fingerprint=fingerprint(file_ids, template_hash, max_length),
                       file_hashes={})
    columns: dict[str, list] = {"input_ids": [], "labels": [], "source": []}
    for source, file_id in enumerate(file_ids):
        examples, digest = read_examples(storage, file_id, stats)
        stats.file_hashes[file_id] = digest
        for input_ids, labels in tokenize_examples(tokenizer, examples, max_length, file_id,
                                                   stats):
            columns["input_ids"].append(input_ids)
            columns["labels"].append(labels)
            columns["source"].append(source)
    if stats.n_examples == 0:
        detail = "; ".join(stats.problems[:5]) or "the files hold no examples"
        raise InvalidRequest(f"no trainable example left in {', '.join(file_ids)}: {detail}",
                             param="training_file", code="invalid_training_file")
    return Dataset.from_dict(columns), stats


def write_split(storage: Any, prefix: str, dataset: Dataset, stats: SplitStats) -> None:
    with tempfile.TemporaryDirectory(prefix="tuneserve-data-") as tmp:
        dataset.save_to_disk(tmp)
        storage.upload_dir(tmp, prefix)
    storage.put(f"{prefix}/stats.json", json.dumps(asdict(stats)).encode())  # commit marker


def read_stats(storage: Any, prefix: str) -> SplitStats | None:
    if not storage.exists(f"{prefix}/stats.json"):
        return None
    return SplitStats(**json.loads(storage.get(f"{prefix}/stats.json")))


def load_split(storage: Any, prefix: str, local_dir: Path) -> tuple[list[list[int]],
                                                                    list[list[int]], list[int]]:
    """Download a stored split into ``local_dir``; return its columns as Python lists."""
    storage.download_prefix(prefix, str(local_dir))
    dataset = load_from_disk(str(local_dir))
    columns = dataset.to_dict()
    return columns["input_ids"], columns["labels"], columns["source"]
