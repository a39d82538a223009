"""The seed tasks of a data-generation job, read from an uploaded file.

Self-Instruct's own layout (``{"instruction", "instances": [{"input", "output"}],
"is_classification"?}``, as ``seed_tasks.jsonl``) is read as it is. Any other instruction layout
tuneserve reads (``training.data.formats``) gives one task per example: its first user message is
the instruction, the assistant's reply the instance's output (no separate input, not known to be
a classification task). Records that cannot be read are skipped; a file with no usable task is
the caller's mistake (400 naming ``seed_file``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from service.core import limits
from service.core.errors import InvalidRequest
from training.data.containers import open_records
from training.data.formats import FormatReader
from training.data.jsonl import LineProblem

MAX_RECORD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class SeedTask:
    instruction: str
    instances: tuple[dict[str, str], ...] = field(default_factory=tuple)
    is_classification: bool | None = None


def _self_instruct(obj: dict) -> SeedTask | None:
    instruction = obj.get("instruction")
    instances = obj.get("instances")
    if not isinstance(instruction, str) or not instruction.strip() or not isinstance(instances,
                                                                                      list):
        return None
    kept = tuple({"input": str(i.get("input") or ""), "output": str(i["output"])}
                 for i in instances
                 if isinstance(i, dict) and isinstance(i.get("output"), str) and i["output"])
    flag = obj.get("is_classification")
    return SeedTask(instruction.strip(), kept, flag if isinstance(flag, bool) else None)


def _from_example(example: dict) -> SeedTask | None:
    messages = example.get("messages") or []
    user = next((m["content"] for m in messages if m.get("role") == "user"), None)
    answer = next((m["content"] for m in messages if m.get("role") == "assistant"), None)
    if not isinstance(user, str) or not user.strip():
        return None
    instances = ({"input": "", "output": answer},) if isinstance(answer, str) and answer else ()
    return SeedTask(user.strip(), instances)


def read_seed_tasks(data: bytes) -> list[SeedTask]:
    """The usable seed tasks of a file's bytes (JSONL or a JSON array, compressed or not),
    distinct by instruction, at most ``limits.MAX_SEED_TASKS``."""
    import io

    records = open_records(io.BytesIO(data), max_record_bytes=MAX_RECORD_BYTES,
                           max_decompressed_bytes=64 * MAX_RECORD_BYTES * 16)
    reader = FormatReader()
    tasks: dict[str, SeedTask] = {}
    for number, value in records:
        if len(tasks) >= limits.MAX_SEED_TASKS:
            break
        if isinstance(value, LineProblem) or not isinstance(value, dict):
            continue
        found: list[SeedTask | None] = []
        if "instruction" in value and "instances" in value:
            found.append(_self_instruct(value))
        else:
            try:
                found.extend(_from_example(e) for e in reader.read(number, value))
            except LineProblem:
                continue
        for task in found:
            if task is not None:
                tasks.setdefault(task.instruction, task)
    return list(tasks.values())


def load(data: bytes, param: str = "seed_file") -> tuple[list[SeedTask], str]:
    """The seed tasks and the file's sha256; 400 naming ``param`` when none is usable."""
    try:
        tasks = read_seed_tasks(data)
    except LineProblem as exc:  # the container itself is broken (a bad compressed stream)
        raise InvalidRequest(f"The seed file cannot be read: {exc.message}.", param=param,
                             code="invalid_seed_file") from None
    if not tasks:
        raise InvalidRequest("The seed file holds no usable seed task: each needs an instruction "
                             "(Self-Instruct's {\"instruction\", \"instances\"} or any "
                             "instruction format tuneserve reads).", param=param,
                             code="no_seed_tasks")
    return tasks, hashlib.sha256(data).hexdigest()
