"""Broken training files, each with the line and the words the rejection must name.

Shared by tests/test_formats.py (the validator) and tests/test_files_api.py (the 400 of an
upload). The tests run with ``MAX_LINE_BYTES`` as the line limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_LINE_BYTES = 2048


@dataclass(frozen=True)
class Broken:
    name: str
    content: bytes
    line: int
    """The first broken line."""
    phrase: str
    """Words the problem's message must contain."""


def _lines(*objs: object) -> bytes:
    return b"".join((o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n" for o in objs)


def _chat(*messages: dict) -> dict:
    return {"messages": list(messages)}


U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}
S = {"role": "system", "content": "Be brief."}
GOOD_ALPACA = {"instruction": "Add 2 and 2.", "input": "", "output": "4"}
GOOD_PAIR = {"input": {"messages": [U]}, "preferred_output": [A],
             "non_preferred_output": [{"role": "assistant", "content": "Bye"}]}

BROKEN: list[Broken] = [
    Broken("invalid_json", _lines(GOOD_ALPACA, b'{"instruction": "x", "output": }'), 2,
           "invalid JSON"),
    Broken("truncated_last_line", _lines(GOOD_ALPACA)[:-1] + b'\n{"instruction": "x", "outp', 2,
           "invalid JSON"),
    Broken("nan", _lines(GOOD_ALPACA, GOOD_ALPACA, b'{"instruction": "x", "output": NaN}'), 3,
           "invalid JSON"),
    Broken("invalid_utf8",
           _lines(GOOD_ALPACA, GOOD_ALPACA, b'{"instruction": "\xff\xfe", "output": "x"}'), 3,
           "invalid UTF-8"),
    Broken("line_too_long",
           _lines(GOOD_ALPACA, {**GOOD_ALPACA, "output": "x" * (MAX_LINE_BYTES + 10)}), 2,
           "longer than the limit"),
    Broken("not_an_object", _lines(GOOD_ALPACA, [1, 2]), 2, "expected a JSON object"),
    Broken("unknown_format", _lines({"question_text": "x", "answer_text": "y"}), 1,
           "unrecognised format"),
    Broken("mixed_alpaca_dolly",
           _lines(GOOD_ALPACA, {"instruction": "x", "context": "", "response": "y"}), 2,
           "mixed formats"),
    Broken("mixed_chat_sharegpt",
           _lines(_chat(U, A), _chat(U, A),
                  {"conversations": [{"from": "human", "value": "x"}]}), 3, "mixed formats"),
    Broken("missing_output", _lines(GOOD_ALPACA, {"instruction": "x", "input": ""}), 2,
           "missing field 'output'"),
    Broken("missing_role", _lines(_chat(U, A), _chat(U, {"content": "x"})), 2,
           "missing field 'messages[1].role'"),
    Broken("output_not_string", _lines(GOOD_ALPACA, {"instruction": "x", "output": 42}), 2,
           "field 'output' must be a string, got a number"),
    Broken("messages_not_array", _lines(_chat(U, A), {"messages": "Hi"}), 2,
           "field 'messages' must be an array"),
    Broken("content_not_string", _lines(_chat(U, A), _chat({"role": "user", "content": 5}, A)), 2,
           "'messages[0].content' must be a string"),
    Broken("response_null", _lines({"instruction": "x", "context": "", "response": None}), 1,
           "field 'response' must be a string, got null"),
    Broken("no_assistant", _lines(_chat(U, A), _chat(S, U)), 2, "no assistant message"),
    Broken("all_weight_zero", _lines(_chat(U, A), _chat(U, {**A, "weight": 0})), 2, "weight 0"),
    Broken("empty_output", _lines(GOOD_ALPACA, GOOD_ALPACA, {"instruction": "x", "output": ""}), 3,
           "empty response 'output'"),
    Broken("empty_chat_response",
           _lines(_chat(U, A), _chat(U, {"role": "assistant", "content": "  "})), 2,
           "empty response"),
    Broken("user_twice", _lines(_chat(U, A), _chat(U, U, A)), 2, "roles out of order"),
    Broken("assistant_first", _lines(_chat(A, U, A)), 1, "roles out of order"),
    Broken("system_in_middle", _lines(_chat(U, A), _chat(U, A, S, U, A)), 2, "roles out of order"),
    Broken("weight_half", _lines(_chat(U, A), _chat(U, {**A, "weight": 0.5})), 2,
           "must be 0 or 1, got 0.5"),
    Broken("weight_on_user", _lines(_chat({**U, "weight": 1}, A)), 1,
           "only allowed on assistant messages"),
    Broken("unknown_role", _lines(_chat(U, A), _chat(U, {"role": "bot", "content": "x"})), 2,
           "expected one of system, user, assistant, tool"),
    Broken("sharegpt_unknown_speaker",
           _lines({"conversations": [{"from": "human", "value": "x"},
                                     {"from": "robot", "value": "y"}]}), 1,
           "'conversations[1].from' is 'robot'"),
    Broken("oig_no_bot",
           _lines({"text": "<human>: a\n<bot>: b"}, {"text": "<human>: only a question"}), 2,
           "no assistant message"),
    Broken("oig_then_plain_text",
           _lines({"text": "<human>: a\n<bot>: b"}, {"text": "just some prose"}), 2,
           "mixed formats"),
    Broken("identical_pair", _lines(GOOD_PAIR, {**GOOD_PAIR, "non_preferred_output": [A]}), 2,
           "are identical"),
    Broken("identical_chosen_rejected",
           _lines({"prompt": "x", "chosen": "same", "rejected": "same "}), 1, "are identical"),
    Broken("prompt_ends_with_assistant", _lines({**GOOD_PAIR, "input": {"messages": [U, A]}}), 1,
           "must end with a user message"),
    Broken("preferred_two_messages", _lines({**GOOD_PAIR, "preferred_output": [A, A]}), 1,
           "exactly one assistant message"),
]
