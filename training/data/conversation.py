"""Conversations as training reads them: typed fields, messages, and the order roles come in.

Every check raises ``LineProblem`` with a stable code and a message that names the field (and
the message index), so the files API can say exactly what is wrong on which line.
"""

from __future__ import annotations

import re
from typing import Any

from training.data.jsonl import LineProblem
from training.model import chat

Message = dict[str, Any]
ROLES = ("system", "user", "assistant", "tool")

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
               int: "a number", float: "a number", type(None): "null"}


def json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def get_field(obj: dict, key: str, kind: type | tuple[type, ...], *, where: str = "",
              required: bool = True) -> Any:
    """``obj[key]`` checked against ``kind``; None when absent and not required."""
    name = f"{where}{key}"
    if key not in obj or (obj[key] is None and not required):
        if required:
            raise LineProblem("missing_field", f"missing field '{name}'")
        return None
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and bool not in _as_tuple(kind):
        expected = " or ".join(json_type(k()) for k in _as_tuple(kind))
        raise LineProblem("invalid_type",
                          f"field '{name}' must be {expected}, got {json_type(value)}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def get_text(obj: dict, key: str, *, where: str = "", required: bool = True,
             empty_code: str | None = "empty_field") -> str:
    """A string field; an empty (or all-whitespace) one raises ``empty_code`` unless it is None."""
    value = get_field(obj, key, str, where=where, required=required)
    if value is None:
        return ""
    if empty_code and not value.strip():
        what = "response" if empty_code == "empty_response" else "field"
        raise LineProblem(empty_code, f"empty {what} '{where}{key}'")
    return value


def parse_message(raw: object, index: int, *, path: str = "messages") -> Message:
    """One OpenAI chat message → ``{"role", "content", "weight"?, "tool_calls"?, …}``."""
    where = f"{path}[{index}]."
    if not isinstance(raw, dict):
        raise LineProblem("invalid_type",
                          f"'{path}[{index}]' must be an object, got {json_type(raw)}")
    role = get_field(raw, "role", str, where=where)
    if role not in ROLES:
        raise LineProblem("invalid_role", f"'{where}role' is {role!r}; expected one of "
                          + ", ".join(ROLES))
    tool_calls = get_field(raw, "tool_calls", list, where=where, required=False)
    if tool_calls is not None and role != "assistant":
        raise LineProblem("invalid_value",
                          f"'{where}tool_calls' is only allowed on assistant messages")
    content = _content(raw, where, optional=bool(tool_calls))
    if tool_calls and not content.strip():
        content = tool_calls_text(tool_calls, where)
    message: Message = {"role": role, "content": content}
    if "weight" in raw:
        message["weight"] = _weight(raw["weight"], where, role)
    if tool_calls:
        message["tool_calls"] = tool_calls
    for key in ("tool_call_id", "name"):
        if (value := get_field(raw, key, str, where=where, required=False)) is not None:
            message[key] = value
    return message


def _content(raw: dict, where: str, *, optional: bool) -> str:
    """Message content: a string, or a list of text parts joined (other parts are refused)."""
    value = get_field(raw, "content", (str, list), where=where, required=not optional)
    if not isinstance(value, list):
        return value or ""
    texts = []
    for i, part in enumerate(value):
        if not (isinstance(part, dict) and part.get("type") == "text"
                and isinstance(part.get("text"), str)):
            raise LineProblem("invalid_type", f"'{where}content[{i}]' must be a text part "
                              '{"type": "text", "text": "…"}; only text content is supported')
        texts.append(part["text"])
    return "".join(texts)


def tool_calls_text(tool_calls: list, where: str) -> str:
    """Tool calls as the text the model learns to write (chat templates without tool support,
    SmolLM2's among them, would otherwise render an empty turn): checked here, written by
    ``training.model.chat`` so that what is trained is what the chat endpoint parses."""
    for i, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise LineProblem("invalid_type", f"'{where}tool_calls[{i}]' must be an object with "
                              "'function': {\"name\", \"arguments\"}")
    return chat.tool_calls_text(tool_calls)


def _weight(value: object, where: str, role: str) -> int:
    if role != "assistant":
        raise LineProblem("invalid_weight",
                          f"'{where}weight' is only allowed on assistant messages")
    if isinstance(value, bool) or value not in (0, 1):
        raise LineProblem("invalid_weight", f"'{where}weight' must be 0 or 1, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def parse_messages(raw: object, *, path: str = "messages") -> list[Message]:
    if not isinstance(raw, list):
        raise LineProblem("invalid_type", f"field '{path}' must be an array, got {json_type(raw)}")
    if not raw:
        raise LineProblem("missing_field", f"field '{path}' is empty")
    return [parse_message(m, i, path=path) for i, m in enumerate(raw)]


_ALLOWED_BEFORE = {
    "system": (None,),
    "user": (None, "system", "assistant", "tool"),
    "assistant": ("user", "tool"),
    "tool": ("assistant", "tool"),
}


def check_role_order(messages: list[Message], *, path: str = "messages") -> None:
    """System first (at most one), then user; user and assistant take turns; tool results
    follow an assistant message (or another tool result)."""
    previous = None
    for i, message in enumerate(messages):
        role = message["role"]
        if previous not in _ALLOWED_BEFORE[role]:
            after = f"after '{previous}'" if previous else "as the first message"
            raise LineProblem("roles_out_of_order",
                              f"roles out of order: '{path}[{i}]' is '{role}' {after}")
        previous = role


def check_sft(messages: list[Message], *, path: str = "messages") -> None:
    """A conversation to train on: roles in order, and at least one non-empty assistant turn
    with weight 1."""
    check_role_order(messages, path=path)
    assistant = [(i, m) for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise LineProblem("no_assistant_turn", f"'{path}' has no assistant message to train on")
    for i, m in assistant:
        if not m["content"].strip() and not m.get("tool_calls"):
            raise LineProblem("empty_response", f"empty response: '{path}[{i}].content' is empty")
    if all(m.get("weight", 1) == 0 for _, m in assistant):
        raise LineProblem("no_assistant_turn",
                          f"every assistant message in '{path}' has weight 0: nothing to train on")
    for i, m in enumerate(messages):
        if m["role"] == "user" and not m["content"].strip():
            raise LineProblem("empty_field", f"empty user message '{path}[{i}].content'")


def check_prompt(messages: list[Message], *, path: str) -> None:
    """A preference pair's prompt: roles in order, ending with the user's turn."""
    check_role_order(messages, path=path)
    if messages[-1]["role"] not in ("user", "tool"):
        raise LineProblem("roles_out_of_order",
                          f"roles out of order: '{path}' must end with a user message, "
                          f"not '{messages[-1]['role']}'")


def split_turns(text: str, markers: dict[str, str], *, field: str) -> list[Message]:
    """Split ``<human>: … <bot>: …``-style text into messages, ``markers`` mapping each marker
    to its role. Text before the first marker is refused."""
    pattern = "(" + "|".join(re.escape(m) for m in markers) + ")"
    pieces = re.split(pattern, text)
    if pieces[0].strip():
        first = ", ".join(repr(m.strip()) for m in markers)
        raise LineProblem("invalid_value",
                          f"field '{field}' must start with a turn marker ({first})")
    return [{"role": markers[marker], "content": body.strip()}
            for marker, body in zip(pieces[1::2], pieces[2::2], strict=True)]
