"""The dataset formats tuneserve reads, and how each line becomes one training example.

Every line of a file is read in the file's one format — declared by the caller, or detected
from the keys of the first readable line — and normalised to one of two shapes:

- supervised (SFT): ``{"messages": [{"role", "content", "weight"?}, …]}`` (plus ``"tools"`` when
  the line declared tools), roles ``system``/``user``/``assistant``/``tool``; an assistant
  message with ``weight`` 0 is context, not trained on;
- preference (DPO): ``{"prompt": [messages], "chosen": str, "rejected": str}``.

Pure Python: the files API, the CLI and the training workers all read files through
``iter_normalised``; ``training.data.validation`` adds the per-file report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from training.data.conversation import (
    Message,
    check_prompt,
    check_sft,
    get_field,
    get_text,
    json_type,
    parse_message,
    parse_messages,
    split_turns,
)
from training.data.jsonl import LineProblem, Readable, decode_line, iter_raw_lines

Kind = Literal["sft", "preference"]
DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Format:
    name: str
    kind: Kind
    signatures: tuple[frozenset[str], ...]
    """A line is in this format when it has every key of one of these sets."""
    keys: frozenset[str]
    """Every key the format knows (to guess the intended format of a line missing a field)."""
    parse: Callable[[dict], dict]
    summary: str

    def matches(self, obj: dict) -> bool:
        return any(sig <= obj.keys() for sig in self.signatures)


# -- supervised formats ---------------------------------------------------------------------

def _sft(*turns: tuple[str, str]) -> dict:
    """A conversation from (role, content) pairs, skipping an empty system prompt."""
    messages = [{"role": r, "content": c} for r, c in turns if r != "system" or c.strip()]
    return {"messages": messages}


def _joined(first: str, second: str) -> str:
    return f"{first}\n\n{second}" if second.strip() else first


def parse_openai_chat(obj: dict) -> dict:
    messages = parse_messages(obj["messages"])
    check_sft(messages)
    example: dict[str, Any] = {"messages": messages}
    if (tools := get_field(obj, "tools", list, required=False)) is not None:
        example["tools"] = tools
    return example


def parse_alpaca(obj: dict) -> dict:
    instruction = get_text(obj, "instruction")
    context = get_field(obj, "input", str, required=False) or ""
    return _sft(("user", _joined(instruction, context)),
                ("assistant", get_text(obj, "output", empty_code="empty_response")))


def parse_dolly(obj: dict) -> dict:
    instruction = get_text(obj, "instruction")
    context = get_field(obj, "context", str, required=False) or ""
    return _sft(("user", _joined(instruction, context)),
                ("assistant", get_text(obj, "response", empty_code="empty_response")))


def parse_openorca(obj: dict) -> dict:
    system = get_field(obj, "system_prompt", str, required=False) or ""
    return _sft(("system", system), ("user", get_text(obj, "question")),
                ("assistant", get_text(obj, "response", empty_code="empty_response")))


def parse_flan(obj: dict) -> dict:
    return _sft(("user", get_text(obj, "inputs")),
                ("assistant", get_text(obj, "targets", empty_code="empty_response")))


def parse_prompt_completion(obj: dict) -> dict:
    return _sft(("user", get_text(obj, "prompt")),
                ("assistant", get_text(obj, "completion", empty_code="empty_response")))


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user",
                   "gpt": "assistant", "assistant": "assistant"}


def parse_sharegpt(obj: dict) -> dict:
    turns = get_field(obj, "conversations", list)
    if not turns:
        raise LineProblem("missing_field", "field 'conversations' is empty")
    messages = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]."
        if not isinstance(turn, dict):
            raise LineProblem("invalid_type", f"'conversations[{i}]' must be an object, "
                              f"got {json_type(turn)}")
        speaker = get_field(turn, "from", str, where=where)
        if speaker not in _SHAREGPT_ROLES:
            raise LineProblem("invalid_role", f"'{where}from' is {speaker!r}; expected one of "
                              + ", ".join(_SHAREGPT_ROLES))
        value = get_field(turn, "value", str, where=where)
        messages.append({"role": _SHAREGPT_ROLES[speaker], "content": value})
    check_sft(messages, path="conversations")
    return {"messages": messages}


def parse_oig(obj: dict) -> dict:
    text = get_text(obj, "text")
    messages = split_turns(text, {"<human>:": "user", "<bot>:": "assistant"}, field="text")
    check_sft(messages, path="text")
    return {"messages": messages}


# -- preference formats ---------------------------------------------------------------------

def _pair(prompt: list[Message], chosen: str, rejected: str, names: tuple[str, str]) -> dict:
    for text, name in zip((chosen, rejected), names, strict=True):
        if not text.strip():
            raise LineProblem("empty_response", f"empty response '{name}'")
    if chosen.strip() == rejected.strip():
        raise LineProblem("identical_outputs",
                          f"'{names[0]}' and '{names[1]}' are identical: the pair teaches nothing")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _single_reply(value: object, name: str) -> str:
    """A response given as a string or as a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise LineProblem("invalid_type", f"field '{name}' must be a string or an array of one "
                          f"assistant message, got {json_type(value)}")
    if len(value) != 1:
        raise LineProblem("invalid_value", f"field '{name}' must hold exactly one assistant "
                          f"message, got {len(value)}")
    message = parse_message(value[0], 0, path=name)
    if message["role"] != "assistant":
        raise LineProblem("roles_out_of_order", f"'{name}[0]' must be an assistant message, "
                          f"not '{message['role']}'")
    return message["content"]


def parse_openai_preference(obj: dict) -> dict:
    inputs = get_field(obj, "input", dict)
    prompt = parse_messages(get_field(inputs, "messages", list, where="input."),
                            path="input.messages")
    check_prompt(prompt, path="input.messages")
    names = ("preferred_output", "non_preferred_output")
    if names[0] not in obj and "preferred_completion" in obj:
        names = ("preferred_completion", "non_preferred_completion")  # the older field names
    for name in names:
        get_field(obj, name, (list, str))
    return _pair(prompt, _single_reply(obj[names[0]], names[0]),
                 _single_reply(obj[names[1]], names[1]), names)


_HH_MARKERS = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}


def parse_chosen_rejected(obj: dict) -> dict:
    """``prompt``/``chosen``/``rejected`` as strings or message lists (TRL's conversational
    form); without ``prompt``, the shared beginning of ``chosen`` and ``rejected`` is the
    prompt (TRL's implicit prompt, and Anthropic HH's "Human:/Assistant:" text)."""
    chosen = get_field(obj, "chosen", (str, list))
    rejected = get_field(obj, "rejected", (str, list))
    prompt = get_field(obj, "prompt", (str, list), required=False)
    names = ("chosen", "rejected")
    if prompt is None:
        return _implicit_prompt_pair(chosen, rejected)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) \
        else parse_messages(prompt, path="prompt")
    if not messages[-1]["content"].strip():
        raise LineProblem("empty_field", "empty field 'prompt'")
    check_prompt(messages, path="prompt")
    return _pair(messages, _single_reply(chosen, "chosen"), _single_reply(rejected, "rejected"),
                 names)


def _implicit_prompt_pair(chosen: str | list, rejected: str | list) -> dict:
    def conversation(value: str | list, name: str) -> list[Message]:
        if isinstance(value, str):
            return split_turns(value, _HH_MARKERS, field=name)
        return parse_messages(value, path=name)

    a, b = conversation(chosen, "chosen"), conversation(rejected, "rejected")
    shared = 0
    while shared < min(len(a), len(b)) - 1 and a[shared] == b[shared]:
        shared += 1
    prompt = a[:shared]
    if not prompt or len(a) != shared + 1 or len(b) != shared + 1 \
            or a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant":
        raise LineProblem("missing_field", "missing field 'prompt': without it, 'chosen' and "
                          "'rejected' must be the same conversation up to a last assistant turn")
    check_prompt(prompt, path="chosen")
    return _pair(prompt, a[-1]["content"], b[-1]["content"], ("chosen", "rejected"))


# -- the registry, in detection order (more specific key sets first) -------------------------

def _fmt(name: str, kind: Kind, signatures: list[set[str]], optional: set[str],
         parse: Callable[[dict], dict], summary: str) -> Format:
    keys = frozenset(optional.union(*signatures))
    return Format(name, kind, tuple(frozenset(s) for s in signatures), keys, parse, summary)


FORMATS: dict[str, Format] = {f.name: f for f in (
    _fmt("openai_preference", "preference",
         [{"input", "preferred_output", "non_preferred_output"},
          {"input", "preferred_completion", "non_preferred_completion"}],
         set(), parse_openai_preference, "OpenAI DPO: input/preferred_output/non_preferred_output"),
    _fmt("chosen_rejected", "preference", [{"chosen", "rejected"}], {"prompt"},
         parse_chosen_rejected, "prompt/chosen/rejected"),
    _fmt("openai_chat", "sft", [{"messages"}], {"tools", "parallel_tool_calls"},
         parse_openai_chat, "OpenAI chat: messages"),
    _fmt("sharegpt", "sft", [{"conversations"}], set(), parse_sharegpt,
         "ShareGPT: conversations of from/value"),
    _fmt("alpaca", "sft", [{"instruction", "output"}], {"input"}, parse_alpaca,
         "Alpaca / Self-Instruct: instruction/input/output"),
    _fmt("dolly", "sft", [{"instruction", "response"}], {"context", "category"}, parse_dolly,
         "Dolly: instruction/context/response"),
    _fmt("openorca", "sft", [{"question", "response"}], {"system_prompt"}, parse_openorca,
         "OpenOrca: system_prompt/question/response"),
    _fmt("flan", "sft", [{"inputs", "targets"}], set(), parse_flan, "FLAN: inputs/targets"),
    _fmt("prompt_completion", "sft", [{"prompt", "completion"}], set(),
         parse_prompt_completion, "prompt/completion"),
    _fmt("oig", "sft", [{"text"}], set(), parse_oig, "OIG: text with <human>: / <bot>: turns"),
)}


def detect_format(obj: dict) -> Format | None:
    return next((f for f in FORMATS.values() if f.matches(obj)), None)


def _nearest_format(obj: dict) -> Format | None:
    """The format sharing most keys with a line that matches none (to name its missing field)."""
    overlap, best = max(((len(f.keys & obj.keys()), f) for f in FORMATS.values()),
                        key=lambda pair: pair[0])
    return best if overlap else None


class FormatReader:
    """Reads the lines of one file, holding them all to one format.

    Args:
        declared: the format the caller named (a key of ``FORMATS``); None to detect it from
            the first line that matches a format.

    Raises:
        ValueError: ``declared`` is not a known format.
    """

    def __init__(self, declared: str | None = None):
        if declared is not None and declared not in FORMATS:
            raise ValueError(f"unknown format {declared!r}; expected one of " + ", ".join(FORMATS))
        self.format: Format | None = FORMATS[declared] if declared else None
        self.declared = declared is not None
        self.format_line: int | None = None

    def read(self, number: int, obj: object) -> dict:
        """Normalise one line's JSON value; raises LineProblem."""
        if not isinstance(obj, dict):
            raise LineProblem("not_an_object", f"expected a JSON object, got {json_type(obj)}")
        if self.format is not None and self.format.matches(obj):
            return self.format.parse(obj)
        found = detect_format(obj)
        if self.format is None:
            if found is None:
                raise self._unrecognised(obj)
            self.format, self.format_line = found, number
            return found.parse(obj)
        if found is not None:
            origin = "declared as" if self.declared else f"from line {self.format_line} is"
            raise LineProblem("mixed_formats", f"mixed formats: this line is {found.name} "
                              f"({found.summary}) but the file {origin} {self.format.name}; "
                              "use one format for every line")
        return self.format.parse(obj)  # raises for the field it lacks

    @staticmethod
    def _unrecognised(obj: dict) -> LineProblem:
        nearest = _nearest_format(obj)
        if nearest is not None:
            try:
                nearest.parse(obj)
            except LineProblem as exc:
                exc.message = f"{exc.message} (the keys look like {nearest.summary})"
                return exc
        keys = ", ".join(sorted(obj)[:8]) or "none"
        known = "; ".join(f.summary for f in FORMATS.values())
        return LineProblem("unknown_format",
                           f"unrecognised format (keys: {keys}); expected one of: {known}")


class FormatError(ValueError):
    """A line of a file cannot be read as a training example."""

    def __init__(self, line: int, code: str, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.code = code
        self.message = message


def iter_normalised(stream: Readable, *, declared_format: str | None = None,
                    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, normalised example)`` for every non-blank line of a JSONL stream.

    The stream is read in chunks (a storage object, an open file, …); blank lines, a BOM and
    CRLF line ends are fine.

    Raises:
        FormatError: at the first broken line (files are validated at upload, so a training
            run only sees this for a file changed behind the API's back).
    """
    reader = FormatReader(declared_format)
    for number, raw in iter_raw_lines(stream, max_line_bytes):
        try:
            value = decode_line(number, raw, max_line_bytes)
            if value is not None:
                yield number, reader.read(number, value)
        except LineProblem as exc:
            raise FormatError(number, exc.code, exc.message) from None
