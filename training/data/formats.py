"""The dataset layouts tuneserve reads, and how each record becomes training examples.

Every record of a file is read in the file's one layout ("format") — declared by the caller, or
detected from the keys (and, where keys are shared, the content) of the first record that has
one — and normalised to one of three shapes:

- supervised (SFT): ``{"messages": [{"role", "content", "weight"?, "tool_calls"?}, …],
  "tools"?: [...]}``, roles ``system``/``user``/``assistant``/``tool``; an assistant message with
  ``weight`` 0 is context, not trained on;
- plain text (continued pretraining): ``{"text": str}``, every token trained on;
- preference (DPO): ``{"prompt": [messages], "chosen": str, "rejected": str}``.

A record gives one example, except a Self-Instruct seed task (one per instance). Layouts that
tuneserve recognises but does not train (KTO's labelled single responses) are refused for the
whole file, never read as something else.

The parsers of the layouts are in ``training.data.layouts``. Pure Python: the files API, the CLI and the training workers all read files through
``iter_normalised`` (containers: ``training.data.containers``); ``training.data.validation``
adds the per-file report.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from training.data.containers import open_records
from training.data.conversation import json_type
from training.data.jsonl import FileProblem, LineProblem, Readable
from training.data.layouts import (
    KTO_REFUSAL,
    Notes,
    has_boolean_label,
    is_hh_transcript,
    is_oig,
    is_rft_prompt,
    parse_alpaca,
    parse_chosen_rejected,
    parse_dolly,
    parse_flan,
    parse_hh_rlhf,
    parse_oig,
    parse_openai_chat,
    parse_openai_preference,
    parse_openai_rft,
    parse_openorca,
    parse_prompt_completion,
    parse_self_instruct,
    parse_sharegpt,
    parse_sharegpt_preference,
    parse_text,
)

Kind = Literal["sft", "preference", "prompts"]
TrainsOn = Literal["responses", "all_tokens", "rewards"]
DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Format:
    name: str
    kind: Kind
    signatures: tuple[frozenset[str], ...]
    """A record is in this layout when it has every key of one of these sets …"""
    keys: frozenset[str]
    """Every key the layout knows (others are reported as ignored; the nearest layout of a record
    missing a field is the one sharing most keys)."""
    parse: Callable[[dict, Notes], dict | list[dict]]
    summary: str
    accepts: Callable[[dict], bool] | None = None
    """… and, for layouts sharing their keys with another, this says yes to its content."""
    trains_on: TrainsOn = "responses"
    refusal: str | None = None
    """Set for a layout recognised only to be refused: what it is and what to send instead."""

    def matches(self, obj: dict) -> bool:
        return (any(sig <= obj.keys() for sig in self.signatures)
                and (self.accepts is None or self.accepts(obj)))


# -- the registry, in detection order (more specific key sets first) -------------------------

def _fmt(name: str, kind: Kind, signatures: list[set[str]], optional: set[str],
         parse: Callable[[dict, Notes], dict | list[dict]], summary: str,
         **extra: Any) -> Format:
    keys = frozenset(optional.union(*signatures))
    return Format(name, kind, tuple(frozenset(s) for s in signatures), keys, parse, summary,
                  **extra)


def _refused(obj: dict, notes: Notes) -> dict:
    raise AssertionError("a refused layout is never parsed")  # FormatReader refuses it first


REFUSED: dict[str, Format] = {f.name: f for f in (
    _fmt("kto", "preference", [{"messages", "label"}, {"prompt", "completion", "label"}], set(),
         _refused, "KTO: messages (or prompt/completion) with a true/false label",
         accepts=has_boolean_label, refusal=KTO_REFUSAL),
)}
"""Layouts recognised only to be refused (checked before ``FORMATS``)."""

FORMATS: dict[str, Format] = {f.name: f for f in (
    _fmt("openai_preference", "preference",
         [{"input", "preferred_output", "non_preferred_output"},
          {"input", "preferred_completion", "non_preferred_completion"}],
         set(), parse_openai_preference, "OpenAI DPO: input/preferred_output/non_preferred_output"),
    _fmt("sharegpt_preference", "preference", [{"conversations", "chosen", "rejected"}],
         {"system", "id"}, parse_sharegpt_preference,
         "ShareGPT preference: conversations with chosen/rejected gpt turns"),
    _fmt("hh_rlhf", "preference", [{"chosen", "rejected"}], set(), parse_hh_rlhf,
         "HH-RLHF: chosen/rejected Human:/Assistant: transcripts", accepts=is_hh_transcript),
    _fmt("chosen_rejected", "preference", [{"chosen", "rejected"}], {"prompt"},
         parse_chosen_rejected, "prompt/chosen/rejected"),
    _fmt("openai_rft", "prompts", [{"messages"}], {"tools", "parallel_tool_calls"},
         parse_openai_rft, "OpenAI reinforcement: messages ending with the user's turn, plus the "
         "fields the grader reads", accepts=is_rft_prompt, trains_on="rewards"),
    _fmt("openai_chat", "sft", [{"messages"}], {"tools", "parallel_tool_calls"},
         parse_openai_chat, "OpenAI chat: messages"),
    _fmt("sharegpt", "sft", [{"conversations"}], {"tools", "system", "id"}, parse_sharegpt,
         "ShareGPT: conversations of from/value"),
    _fmt("self_instruct", "sft", [{"instruction", "instances"}],
         {"id", "name", "is_classification"}, parse_self_instruct,
         "Self-Instruct seed tasks: instruction/instances of input/output"),
    _fmt("alpaca", "sft", [{"instruction", "output"}], {"input", "system"}, parse_alpaca,
         "Alpaca: instruction/input/output"),
    _fmt("dolly", "sft", [{"instruction", "response"}], {"context", "category"}, parse_dolly,
         "Dolly: instruction/context/response"),
    _fmt("openorca", "sft", [{"question", "response"}], {"system_prompt", "id"}, parse_openorca,
         "OpenOrca: system_prompt/question/response"),
    _fmt("flan", "sft", [{"inputs", "targets"}],
         {"task_source", "task_name", "template_type", "_template_idx", "_task_source",
          "_task_name", "_template_type"}, parse_flan, "FLAN: inputs/targets"),
    _fmt("prompt_completion", "sft", [{"prompt", "completion"}], set(),
         parse_prompt_completion, "prompt/completion"),
    _fmt("oig", "sft", [{"text"}], {"metadata"}, parse_oig,
         "OIG: text with <human>: / <bot>: turns", accepts=is_oig),
    _fmt("text", "sft", [{"text"}], {"meta", "metadata", "id"}, parse_text,
         "plain text (continued pretraining)", trains_on="all_tokens"),
)}

_DETECTION_ORDER = (*REFUSED.values(), *FORMATS.values())


def detect_format(obj: dict) -> Format | None:
    return next((f for f in _DETECTION_ORDER if f.matches(obj)), None)


def _nearest_format(obj: dict) -> Format | None:
    """The layout sharing most keys with a record that matches none (to name its missing
    field)."""
    overlap, best = max(((len(f.keys & obj.keys()), f) for f in FORMATS.values()),
                        key=lambda pair: pair[0])
    return best if overlap else None


class FormatReader:
    """Reads the records of one file, holding them all to one layout.

    Args:
        declared: the layout the caller named (a key of ``FORMATS``); None to detect it from
            the first record that matches a layout.

    Raises:
        ValueError: ``declared`` is not a known layout.
    """

    def __init__(self, declared: str | None = None, unit: str = "line"):
        if declared is not None and declared not in FORMATS:
            raise ValueError(f"unknown format {declared!r}; expected one of " + ", ".join(FORMATS))
        self.format: Format | None = FORMATS[declared] if declared else None
        self.declared = declared is not None
        self.format_line: int | None = None
        self.unit = unit
        self.notes: Notes = Counter()
        self.ignored_keys: Counter[str] = Counter()
        """Keys of the records that their layout does not read, with how many records had
        them."""

    def read(self, number: int, obj: object) -> list[dict]:
        """Normalise one record's JSON value into its examples.

        Raises:
            LineProblem: the record is broken.
            FileProblem: the file is in a layout tuneserve refuses.
        """
        if not isinstance(obj, dict):
            raise LineProblem("not_an_object", f"expected a JSON object, got {json_type(obj)}")
        if self.format is not None and self.format.matches(obj):
            return self._parse(obj)
        found = detect_format(obj)
        if self.format is None:
            if found is None:
                raise self._unrecognised(obj)
            self.format, self.format_line = found, number
            return self._parse(obj)
        if found is not None:
            origin = "declared as" if self.declared else f"from {self.unit} {self.format_line} is"
            raise LineProblem("mixed_formats", f"mixed formats: this {self.unit} is {found.name} "
                              f"({found.summary}) but the file {origin} {self.format.name}; "
                              f"use one format for every {self.unit}")
        return self._parse(obj)  # raises for the field it lacks

    def _parse(self, obj: dict) -> list[dict]:
        assert self.format is not None
        if self.format.refusal is not None:
            raise FileProblem("unsupported_layout", self.format.refusal)
        if self.format.kind != "prompts":  # a prompt's other fields are the grader's item
            self.ignored_keys.update(obj.keys() - self.format.keys)
        parsed = self.format.parse(obj, self.notes)
        return parsed if isinstance(parsed, list) else [parsed]

    @staticmethod
    def _unrecognised(obj: dict) -> LineProblem:
        nearest = _nearest_format(obj)
        if nearest is not None:
            try:
                nearest.parse(obj, Counter())
            except LineProblem as exc:
                exc.message = f"{exc.message} (the keys look like {nearest.summary})"
                return exc
        keys = ", ".join(sorted(obj)[:8]) or "none"
        known = "; ".join(f.summary for f in FORMATS.values())
        return LineProblem("unknown_format",
                           f"unrecognised format (keys: {keys}); expected one of: {known}")


class FormatError(ValueError):
    """A record of a file cannot be read as a training example."""

    def __init__(self, line: int, code: str, message: str, unit: str = "line"):
        super().__init__(f"{unit} {line}: {message}")
        self.line = line
        self.code = code
        self.message = message


InvalidRecord = Callable[[int, LineProblem], None]
"""Told about each record skipped as invalid: its number and its problem."""


def iter_normalised(stream: Readable, *, declared_format: str | None = None,
                    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                    max_decompressed_bytes: int | None = None,
                    on_invalid: InvalidRecord | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(record number, normalised example)`` for every example of a training file in
    any container (``training.data.containers``): line numbers for JSONL, record numbers for a
    JSON array; a Self-Instruct task yields one example per instance, all with its number.

    Args:
        on_invalid: skip invalid records, telling this about each; None raises at the first.

    Raises:
        FormatError: at the first broken record (without ``on_invalid``), or at a problem that
            ends the file (always). Files are validated at upload, so a training run only sees
            the records an upload chose to skip, or a file changed behind the API's back.
    """
    records = open_records(stream, max_record_bytes=max_line_bytes,
                           max_decompressed_bytes=max_decompressed_bytes)
    unit = records.container.unit
    reader = FormatReader(declared_format, unit)
    for number, value in records:
        try:
            if isinstance(value, LineProblem):
                raise value
            for example in reader.read(number, value):
                yield number, example
        except LineProblem as exc:
            if on_invalid is None or isinstance(exc, FileProblem):
                raise FormatError(number, exc.code, exc.message, unit) from None
            on_invalid(number, exc)
