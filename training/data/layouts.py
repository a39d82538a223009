"""How each record of each layout becomes training examples: one ``parse_<layout>(record,
notes)`` per layout, returning the normalised example (or, for a Self-Instruct task, a list of
them) and raising ``LineProblem`` naming the field that is wrong. The registry that picks a
layout for a file is ``training.data.formats``.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

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
    tool_calls_text,
)
from training.data.jsonl import LineProblem

Notes = Counter[str]
"""Things a parser did to records that the file's description must say, each with a ``{n}``
for how many records it touched."""


# -- supervised layouts ---------------------------------------------------------------------

def _sft(*turns: tuple[str, str]) -> dict:
    """A conversation from (role, content) pairs, skipping an empty system prompt."""
    messages = [{"role": r, "content": c} for r, c in turns if r != "system" or c.strip()]
    return {"messages": messages}


def _joined(first: str, second: str) -> str:
    return f"{first}\n\n{second}" if second.strip() else first


def parse_openai_chat(obj: dict, notes: Notes) -> dict:
    messages = parse_messages(obj["messages"])
    check_sft(messages)
    example: dict[str, Any] = {"messages": messages}
    if tools := _tools(obj):
        example["tools"] = tools
    return example


def parse_openai_rft(obj: dict, notes: Notes) -> dict:
    """A reinforcement fine-tuning prompt: messages ending with the user's turn, and any other
    fields, which the grader's templates read as ``{{item.…}}`` (the whole line is the item)."""
    messages = parse_messages(obj["messages"])
    check_prompt(messages, path="messages")
    example: dict[str, Any] = {"messages": messages, "item": obj}
    if tools := _tools(obj):
        example["tools"] = tools
    return example


def is_rft_prompt(obj: dict) -> bool:
    """Messages that end with a user (or tool) turn: a prompt to sample answers for."""
    messages = obj.get("messages")
    return (isinstance(messages, list) and bool(messages) and isinstance(messages[-1], dict)
            and messages[-1].get("role") in ("user", "tool"))


def _tools(obj: dict) -> list[dict] | None:
    """``tools`` as OpenAI function tools: an array, or a string holding one (LLaMA-Factory);
    bare function schemas (``{"name", "parameters"}``) are wrapped as ``{"type": "function",
    "function": …}``. None when absent or empty."""
    value = get_field(obj, "tools", (list, str), required=False)
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise LineProblem("invalid_value", f"field 'tools' is a string but not JSON: "
                              f"{exc.msg} at column {exc.colno}") from None
        if not isinstance(value, list):
            raise LineProblem("invalid_type", "field 'tools' must hold an array of tools, got "
                              f"{json_type(value)}")
    tools = []
    for i, tool in enumerate(value or []):
        if isinstance(tool, dict) and tool.get("type") == "function" \
                and isinstance(tool.get("function"), dict):
            tool = tool["function"]
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise LineProblem("invalid_type", f"'tools[{i}]' must be a function: an object with "
                              "a 'name' (and 'description', 'parameters')")
        tools.append({"type": "function", "function": tool})
    return tools or None


def parse_alpaca(obj: dict, notes: Notes) -> dict:
    instruction = get_text(obj, "instruction")
    context = get_field(obj, "input", str, required=False) or ""
    system = get_field(obj, "system", str, required=False) or ""
    return _sft(("system", system), ("user", _joined(instruction, context)),
                ("assistant", get_text(obj, "output", empty_code="empty_response")))


def parse_self_instruct(obj: dict, notes: Notes) -> list[dict]:
    """A Self-Instruct seed task: one instruction, one example per instance."""
    instruction = get_text(obj, "instruction")
    instances = get_field(obj, "instances", list)
    if not instances:
        raise LineProblem("missing_field", "field 'instances' is empty")
    examples = []
    for i, instance in enumerate(instances):
        where = f"instances[{i}]."
        if not isinstance(instance, dict):
            raise LineProblem("invalid_type", f"'instances[{i}]' must be an object, got "
                              f"{json_type(instance)}")
        context = get_field(instance, "input", str, where=where, required=False) or ""
        output = get_text(instance, "output", where=where, empty_code="empty_response")
        examples.append(_sft(("user", _joined(instruction, context)), ("assistant", output)))
    return examples


def parse_dolly(obj: dict, notes: Notes) -> dict:
    instruction = get_text(obj, "instruction")
    context = get_field(obj, "context", str, required=False) or ""
    return _sft(("user", _joined(instruction, context)),
                ("assistant", get_text(obj, "response", empty_code="empty_response")))


def parse_openorca(obj: dict, notes: Notes) -> dict:
    system = get_field(obj, "system_prompt", str, required=False) or ""
    return _sft(("system", system), ("user", get_text(obj, "question")),
                ("assistant", get_text(obj, "response", empty_code="empty_response")))


def parse_flan(obj: dict, notes: Notes) -> dict:
    return _sft(("user", get_text(obj, "inputs")),
                ("assistant", get_text(obj, "targets", empty_code="empty_response")))


END_MARKERS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>",
               "<eos>")
"""End markers that legacy prompt/completion files put at the end of each completion (GPT-3's
fine-tuning guide asked for one). The chat template ends each response with its own
end-of-turn token, and a marker left in the content is a special token the template refuses."""


def parse_prompt_completion(obj: dict, notes: Notes) -> dict:
    prompt = get_text(obj, "prompt")
    completion = get_text(obj, "completion", empty_code="empty_response")
    end = completion.rstrip()
    marker = next((m for m in END_MARKERS if end.endswith(m)), None)
    if marker is not None:
        completion = end.removesuffix(marker)
        notes[f"removed the end marker {marker!r} that ended {{n}} completion(s): the chat "
              "template ends every response with its own end-of-turn token"] += 1
        if not completion.strip():
            raise LineProblem("empty_response", f"empty response 'completion' (only the end "
                              f"marker {marker!r})")
    return _sft(("user", prompt), ("assistant", completion))


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user",
                   "gpt": "assistant", "assistant": "assistant",
                   "function_call": "assistant", "observation": "tool"}
"""FastChat's speakers, plus LLaMA-Factory's tool turns: ``function_call`` is the assistant
calling a tool, ``observation`` the tool's result."""


def _sharegpt_turns(obj: dict, key: str = "conversations") -> list[Message]:
    turns = get_field(obj, key, list)
    if not turns:
        raise LineProblem("missing_field", f"field '{key}' is empty")
    system = get_field(obj, "system", str, required=False) or ""
    messages: list[Message] = [{"role": "system", "content": system}] if system.strip() else []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]."
        if not isinstance(turn, dict):
            raise LineProblem("invalid_type", f"'{key}[{i}]' must be an object, "
                              f"got {json_type(turn)}")
        speaker = get_field(turn, "from", str, where=where)
        if speaker not in _SHAREGPT_ROLES:
            raise LineProblem("invalid_role", f"'{where}from' is {speaker!r}; expected one of "
                              + ", ".join(_SHAREGPT_ROLES))
        value = get_field(turn, "value", str, where=where)
        if speaker == "function_call":
            messages.append(_function_call(value, f"{where}value"))
        else:
            messages.append({"role": _SHAREGPT_ROLES[speaker], "content": value})
    return messages


def _function_call(value: str, where: str) -> Message:
    """A ``function_call`` turn's JSON (``{"name", "arguments"}``, or an array of them) as an
    assistant message with OpenAI ``tool_calls``."""
    try:
        calls = json.loads(value)
    except json.JSONDecodeError:
        calls = None
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                            for c in calls):
        raise LineProblem("invalid_value", f"'{where}' of a function_call turn must be JSON "
                          '{"name": …, "arguments": {…}} (or an array of them)')
    tool_calls = [{"type": "function", "function": {
        "name": c["name"], "arguments": c["arguments"] if isinstance(c.get("arguments"), str)
        else json.dumps(c.get("arguments", {}), ensure_ascii=False)}} for c in calls]
    return {"role": "assistant", "content": tool_calls_text(tool_calls, where),
            "tool_calls": tool_calls}


def parse_sharegpt(obj: dict, notes: Notes) -> dict:
    messages = _sharegpt_turns(obj)
    check_sft(messages, path="conversations")
    example: dict[str, Any] = {"messages": messages}
    if tools := _tools(obj):
        example["tools"] = tools
    return example


_OIG_MARKERS = {"<human>:": "user", "<bot>:": "assistant"}


def parse_oig(obj: dict, notes: Notes) -> dict:
    text = get_text(obj, "text")
    messages = split_turns(text, _OIG_MARKERS, field="text")
    check_sft(messages, path="text")
    return {"messages": messages}


def is_oig(obj: dict) -> bool:
    text = obj.get("text")
    return isinstance(text, str) and text.lstrip().startswith("<human>:")


def parse_text(obj: dict, notes: Notes) -> dict:
    return {"text": get_text(obj, "text")}


# -- preference layouts ---------------------------------------------------------------------

def _pair(prompt: list[Message], chosen: str, rejected: str, names: tuple[str, str]) -> dict:
    for text, name in zip((chosen, rejected), names, strict=True):
        if not text.strip():
            raise LineProblem("empty_response", f"empty response '{name}'")
    if chosen.strip() == rejected.strip():
        raise LineProblem("identical_outputs",
                          f"'{names[0]}' and '{names[1]}' are identical: the pair teaches nothing")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _single_reply(value: object, name: str) -> str:
    """A response given as a string, a list holding one assistant message, or a ShareGPT turn
    object (``{"from": "gpt", "value": …}``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "from" in value:
        speaker = get_field(value, "from", str, where=f"{name}.")
        if _SHAREGPT_ROLES.get(speaker) != "assistant" or speaker == "function_call":
            raise LineProblem("roles_out_of_order", f"'{name}.from' must be 'gpt', "
                              f"not {speaker!r}")
        return get_field(value, "value", str, where=f"{name}.")
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


def parse_openai_preference(obj: dict, notes: Notes) -> dict:
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


def parse_sharegpt_preference(obj: dict, notes: Notes) -> dict:
    """LLaMA-Factory's ranking ShareGPT: ``conversations`` is the prompt (ending with the
    human's turn), ``chosen`` and ``rejected`` are one ``gpt`` turn each."""
    prompt = _sharegpt_turns(obj)
    check_prompt(prompt, path="conversations")
    for name in ("chosen", "rejected"):
        get_field(obj, name, (dict, str, list))
    return _pair(prompt, _single_reply(obj["chosen"], "chosen"),
                 _single_reply(obj["rejected"], "rejected"), ("chosen", "rejected"))


def parse_chosen_rejected(obj: dict, notes: Notes) -> dict:
    """``prompt``/``chosen``/``rejected`` as strings or message lists (TRL's conversational
    form); without ``prompt``, the shared beginning of ``chosen`` and ``rejected`` is the
    prompt (TRL's implicit prompt)."""
    chosen = get_field(obj, "chosen", (str, list))
    rejected = get_field(obj, "rejected", (str, list))
    prompt = get_field(obj, "prompt", (str, list), required=False)
    names = ("chosen", "rejected")
    if prompt is None:
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise LineProblem("missing_field", "missing field 'prompt': 'chosen' and 'rejected' "
                              "are plain responses, so the prompt they answer must be given")
        return _implicit_prompt_pair(parse_messages(chosen, path="chosen"),
                                     parse_messages(rejected, path="rejected"), "message")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) \
        else parse_messages(prompt, path="prompt")
    if not messages[-1]["content"].strip():
        raise LineProblem("empty_field", "empty field 'prompt'")
    check_prompt(messages, path="prompt")
    return _pair(messages, _single_reply(chosen, "chosen"), _single_reply(rejected, "rejected"),
                 names)


_HH_MARKERS = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}
_HH_NAMES = {"user": "Human", "assistant": "Assistant"}


def parse_hh_rlhf(obj: dict, notes: Notes) -> dict:
    """Anthropic HH-RLHF: ``chosen`` and ``rejected`` are whole ``Human:``/``Assistant:``
    transcripts; what they share is the prompt, their final Assistant turns the two replies."""
    chosen = split_turns(get_field(obj, "chosen", str), _HH_MARKERS, field="chosen")
    rejected = split_turns(get_field(obj, "rejected", str), _HH_MARKERS, field="rejected")
    for messages, name in ((chosen, "chosen"), (rejected, "rejected")):
        for i in range(1, len(messages)):
            if messages[i]["role"] == messages[i - 1]["role"]:
                who = _HH_NAMES[messages[i]["role"]]
                raise LineProblem("roles_out_of_order", f"'{name}' has two {who} turns in a row "
                                  f"(turns {i} and {i + 1}): Human and Assistant take turns")
        if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
            raise LineProblem("empty_response", f"the final Assistant turn of '{name}' is empty")
    return _implicit_prompt_pair(chosen, rejected, "turn")


def _implicit_prompt_pair(a: list[Message], b: list[Message], unit: str) -> dict:
    """The pair of two conversations that differ only in their final assistant turn."""
    for messages, name in ((a, "chosen"), (b, "rejected")):
        if messages[-1]["role"] != "assistant":
            raise LineProblem("roles_out_of_order", f"'{name}' must end with the assistant's "
                              f"reply, not a {messages[-1]['role']} {unit}")
        if len(messages) < 2:
            raise LineProblem("missing_field", f"'{name}' holds only a reply: no prompt before it")
    if a[:-1] != b[:-1]:
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)) - 1)
        raise LineProblem("prompts_differ", f"'chosen' and 'rejected' differ before their final "
                          f"assistant {unit} (first at {unit} {k + 1}): a pair must share every "
                          f"{unit} but the last reply")
    prompt = a[:-1]
    check_prompt(prompt, path="chosen")
    return _pair(prompt, a[-1]["content"], b[-1]["content"], ("chosen", "rejected"))


def is_hh_transcript(obj: dict) -> bool:
    chosen = obj.get("chosen")
    return "prompt" not in obj and isinstance(chosen, str) and chosen.lstrip().startswith("Human:")


def has_boolean_label(obj: dict) -> bool:
    return isinstance(obj.get("label"), bool)


KTO_REFUSAL = (
    "this is KTO data: each record is one response labelled desirable (true) or undesirable "
    "(false), for Kahneman-Tversky Optimization, which tuneserve does not train (read as "
    "conversations, the undesirable answers would be learned as good ones). Send DPO preference "
    "pairs instead, the same prompt with a chosen and a rejected response (e.g. "
    '{"prompt": …, "chosen": …, "rejected": …}), or for supervised training only the records '
    "labelled true, without 'label'")
