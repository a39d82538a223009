"""Conversations → tokens, one module for training and serving so both render identically.

A normalised message is ``{"role": "system"|"user"|"assistant"|"tool", "content": str}`` with an
optional ``"weight": 0|1`` on assistant messages (default 1). Rendering uses the tokenizer's chat
template, or ``PLAIN_TEMPLATE`` (### Instruction / ### Input / ### Response … EOS) when it has none.

The response mask is derived, not assumed: for each supervised assistant turn the conversation is
rendered up to it with the generation prompt (exactly what serving sends the model) and through it,
both renders must be prefixes of the whole conversation, and the text between them must be the
assistant content followed by the end-of-turn marker. The labels then cover those characters'
tokens, and decoding the supervised tokens must give back exactly the assistant contents plus
their end markers. When anything does not hold, ``MaskError`` is raised: an example is never
returned with a wrong mask.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypedDict

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")

PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'tool' %}{{ '### Input:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
"""The template for tokenizers without a chat template: Alpaca's sections, each response ending
in the EOS token. Tool messages render as ``### Input:`` (context given with the instruction)."""


class Message(TypedDict, total=False):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    weight: int
    """Assistant messages only: 0 keeps the turn as context without training on it."""


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    """Same length as ``input_ids``; the token id where supervised, ``IGNORE_INDEX`` elsewhere."""

    @property
    def num_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


class PreferencePair(NamedTuple):
    """A DPO example: two tokenisations sharing the prompt tokens, labels on the response only."""

    chosen: TokenizedExample
    rejected: TokenizedExample


class ExampleError(ValueError):
    """An example that cannot be trained on; callers skip it and count it."""


class MaskError(ExampleError):
    """The response mask cannot be derived exactly for this example under this chat template."""


class TruncatedError(ExampleError):
    """Truncating to ``max_length`` would cut a supervised response."""

    def __init__(self, message: str, *, num_tokens: int, max_length: int):
        super().__init__(message)
        self.num_tokens = num_tokens
        self.max_length = max_length


# --------------------------------------------------------------------------- template facts


@dataclass(frozen=True)
class _TemplateInfo:
    template: str
    stop_ids: tuple[int, ...]
    """End-of-turn id first, then EOS if different."""
    end_markers: tuple[str, ...]
    """Strings of ``stop_ids``; one of them must follow each assistant content."""
    special_tokens: tuple[str, ...]
    special_re: re.Pattern[str] | None
    """Finds any special token in a text in one pass (Llama-3 has 256 of them)."""


_info_cache: weakref.WeakKeyDictionary[Any, dict[tuple, _TemplateInfo]] = weakref.WeakKeyDictionary()


def _template_info(tokenizer: PreTrainedTokenizerBase) -> _TemplateInfo:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one renders chats
        template = template.get("default")
    # The key covers what tests and callers change on a live tokenizer (template, added tokens).
    key = (template, len(tokenizer), tokenizer.eos_token)
    try:
        per_tok = _info_cache.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no caching
        per_tok = {}
    info = per_tok.get(key)
    if info is None:
        info = per_tok[key] = _probe_template(tokenizer, template or PLAIN_TEMPLATE)
    return info


def _probe_template(tokenizer: PreTrainedTokenizerBase, template: str) -> _TemplateInfo:
    """Find the end-of-turn token by rendering a probe conversation and reading what follows the
    assistant's content: the first special token there (only whitespace before it)."""
    special = _special_tokens(tokenizer)
    eos = tokenizer.eos_token
    stops: list[str] = []
    probe = "Zq9 probe"
    try:
        prompt = _render_with(tokenizer, template, [{"role": "user", "content": "hi"}], True)
        full = _render_with(tokenizer, template, [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": probe}], False)
    except MaskError:
        prompt = full = ""
    if full.startswith(prompt) and probe in full[len(prompt):]:
        trailer = full[len(prompt):].split(probe, 1)[1].lstrip()
        found = [t for t in special if trailer.startswith(t)]
        if found:
            stops.append(max(found, key=len))
    if eos and eos not in stops:
        stops.append(eos)
    ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in stops)
    pattern = re.compile("|".join(map(re.escape, sorted(special, key=len, reverse=True))))
    return _TemplateInfo(template, ids, tuple(stops), special, pattern if special else None)


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    names = set(tokenizer.all_special_tokens)
    names.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return tuple(sorted(n for n in names if n))


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids at which generation stops: the template's end-of-turn token (``<|im_end|>``
    for ChatML, ``<|eot_id|>`` for Llama-3, ``<end_of_turn>`` for Gemma), then EOS."""
    return list(_template_info(tokenizer).stop_ids)


def template_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides how a conversation becomes tokens: the chat template,
    the vocabulary and added tokens, the special and end-of-turn tokens."""
    info = _template_info(tokenizer)
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps({
        "template": info.template,
        "stop_ids": list(info.stop_ids),
        "special": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token],
        "vocab": vocab,
    }, ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------- rendering


def _render_with(tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict],
                 add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt, tools=tools)
    except Exception as exc:  # jinja errors and the templates' own raise_exception(...)
        raise MaskError(f"the chat template refused the conversation: {exc}") from exc
    return text


def _plain_messages(messages: list[Message]) -> list[dict]:
    """Validate, and drop keys the template must not see (``weight``)."""
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise MaskError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise MaskError(f"messages[{i}].content must be a string")
        if m.get("weight", 1) not in (0, 1):
            raise MaskError(f"messages[{i}].weight must be 0 or 1, got {m.get('weight')!r}")
        out.append({"role": role, "content": content})
    return out


TOOLS_FALLBACK = (
    "# Tools\n\nYou may call one or more of these functions. To call them, answer with only a "
    'JSON array of calls: [{{"name": <function name>, "arguments": <JSON string of the '
    'arguments>}}]. A call\'s result comes back in a tool message.\n\n{tools}')
"""How tool definitions reach a model whose chat template takes no ``tools``: this text, one
JSON tool per line at ``{tools}``, ends the system message (one is added first when the
conversation has none). The calls it asks for are the text assistant tool calls train on
(``training.data.conversation.tool_calls_text``)."""


def tool_calls_text(tool_calls: list[dict]) -> str:
    """OpenAI tool calls (``{"function": {"name", "arguments"}}``) as the text an assistant turn
    holds for them: ``TOOLS_FALLBACK``'s JSON array, what a model is trained to write."""
    return json.dumps([{"name": c["function"]["name"], "arguments": c["function"].get(
        "arguments", "")} for c in tool_calls], ensure_ascii=False)


def tool_calls_schema(tools: list[dict], name: str | None = None, *,
                      parallel: bool = True) -> dict:
    """The JSON schema of an answer that is ``TOOLS_FALLBACK``'s calls: at least one call (one
    at most without ``parallel``) of ``name``, or of any of ``tools``. The arguments are written
    as a JSON object that follows the function's ``parameters`` (a string could hold anything);
    ``parse_tool_calls`` reads both forms."""
    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": f["name"]},
                             "arguments": f.get("parameters") or {"type": "object"}}}
             for f in functions]
    schema: dict = {"type": "array", "minItems": 1,
                    "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parse_tool_calls(text: str, tools: list[dict]) -> list[dict] | None:
    """``[{"name", "arguments": str}]`` when ``text`` is, as a whole, ``TOOLS_FALLBACK``'s calls
    (a JSON array of ``{"name", "arguments"}``, or one such object) of functions in ``tools``;
    None when it is anything else (then it is an ordinary answer)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    calls = [value] if isinstance(value, dict) else value
    if not isinstance(calls, list) or not calls:
        return None
    names = {t["function"]["name"] for t in tools}
    out = []
    for call in calls:
        if not (isinstance(call, dict) and call.get("name") in names):
            return None
        arguments = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        out.append({"name": call["name"], "arguments": arguments})
    return out


def _takes_tools(template: str) -> bool:
    return "tools" in template


def with_tools(tokenizer: PreTrainedTokenizerBase, messages: list[Message],
               tools: list[dict] | None) -> tuple[list[Message], list[dict] | None]:
    """``(messages, tools for the template)``: the tools as the template renders them when it
    takes ``tools``, otherwise written into the system message (``TOOLS_FALLBACK``). Training and
    serving both render through this, so a model sees its tools the same way in both."""
    if not tools or _takes_tools(_template_info(tokenizer).template):
        return messages, tools or None
    block = TOOLS_FALLBACK.format(tools="\n".join(json.dumps(t, ensure_ascii=False)
                                                    for t in tools))
    if messages and messages[0].get("role") == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{block}"}
        return [first, *messages[1:]], None
    return [{"role": "system", "content": block}, *messages], None


def render_text(tokenizer: PreTrainedTokenizerBase, messages: list[Message],
                add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
    """The conversation as text under the tokenizer's template (``PLAIN_TEMPLATE`` without one),
    with ``tools`` (OpenAI function tools) in the prompt as ``with_tools`` places them."""
    info = _template_info(tokenizer)
    messages, tools = with_tools(tokenizer, messages, tools)
    return _render_with(tokenizer, info.template, _plain_messages(messages), add_generation_prompt,
                        tools)


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message],
                  tools: list[dict] | None = None) -> list[int]:
    """Token ids of the conversation with the generation prompt: what the model continues."""
    return _encode(tokenizer, [render_text(tokenizer, messages, True, tools)])[0]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    # Special tokens come from the rendered text itself (the template writes BOS if it wants it).
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- masking


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message],
                          max_length: int | None = None,
                          tools: list[dict] | None = None) -> TokenizedExample:
    """Tokens and labels for one conversation: only assistant turns with weight 1 (default) are
    supervised, each including its end-of-turn marker. ``tools`` (OpenAI function tools) are in
    the prompt (``with_tools``), never supervised.

    Raises:
        MaskError: the template refuses the conversation or renders it so that the supervised
            tokens would not decode to exactly the assistant contents plus their end markers,
            or no assistant turn is supervised.
        TruncatedError: more than ``max_length`` tokens, and cutting would drop supervised tokens.
    """
    info = _template_info(tokenizer)
    messages, tools = with_tools(tokenizer, messages, tools)
    plain = _plain_messages(messages)
    _check_no_special_tokens(info, plain)
    full = _render_with(tokenizer, info.template, plain, False, tools)
    spans = _assistant_spans(tokenizer, info, messages, plain, full, tools)
    if not spans:
        raise MaskError("no assistant message to train on (none, or all with weight 0)")
    input_ids, labels = _tokens_and_labels(tokenizer, full, spans)
    _check_supervised_text(tokenizer, input_ids, labels, [full[a:b] for a, b in spans])
    return _truncate(TokenizedExample(input_ids, labels), max_length)


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str,
                  max_length: int | None = None) -> TokenizedExample:
    """Plain text for continued pretraining: its tokens, then EOS (where documents end when
    packed), all supervised but the first (no token comes before it to predict it); no chat
    template. Longer than ``max_length``: the rest is cut, as pretraining cuts documents.

    Raises:
        MaskError: the text holds a special token (it would be read as the control token).
    """
    info = _template_info(tokenizer)
    _check_no_special_tokens(info, [{"content": text}])
    ids = _encode(tokenizer, [text])[0]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    ids = ids[:max_length] if max_length is not None else ids
    return TokenizedExample(ids, [IGNORE_INDEX, *ids[1:]])


def _check_no_special_tokens(info: _TemplateInfo, messages: list[dict]) -> None:
    # A control token inside content would be tokenized as the token itself (e.g. an early
    # <|im_end|>), silently changing the turn structure the model is trained on.
    if info.special_re is None:
        return
    for i, m in enumerate(messages):
        if found := info.special_re.search(m["content"]):
            raise MaskError(f"messages[{i}].content contains the special token {found.group()!r}")


def _assistant_spans(tokenizer: PreTrainedTokenizerBase, info: _TemplateInfo,
                     messages: list[Message], plain: list[dict], full: str,
                     tools: list[dict] | None) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of ``full`` to supervise: content + end marker per turn."""
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(plain):
        if m["role"] != "assistant" or messages[i].get("weight", 1) == 0:
            continue
        prompt = _render_with(tokenizer, info.template, plain[:i], True, tools)
        through = _render_with(tokenizer, info.template, plain[: i + 1], False, tools)
        if not (full.startswith(prompt) and full.startswith(through) and len(through) > len(prompt)):
            raise MaskError(f"messages[{i}]: the chat template renders the conversation before and "
                            "through this turn differently from the whole conversation (it "
                            "rewrites or drops earlier turns), so the mask cannot be derived")
        start = len(prompt)
        end = _end_of_response(info, through, start, m["content"], i)
        if spans and start < spans[-1][1]:
            raise MaskError(f"messages[{i}]: assistant turns overlap in the rendered text")
        spans.append((start, end))
    return spans


def _end_of_response(info: _TemplateInfo, rendered: str, start: int, content: str, i: int) -> int:
    """Where content + end marker end in ``rendered`` (which holds the turn from ``start``)."""
    if not rendered.startswith(content, start):
        raise MaskError(f"messages[{i}]: the chat template does not render the assistant content "
                        "verbatim after the generation prompt (it rewrites, strips or moves it)")
    pos = start + len(content)
    # Whitespace the template puts between content and marker is generated too: supervise it.
    marker_at = len(rendered) - len(rendered[pos:].lstrip())
    for marker in sorted(info.end_markers, key=len, reverse=True):
        if rendered.startswith(marker, marker_at):
            return marker_at + len(marker)
    markers = ", ".join(repr(m) for m in info.end_markers) or "none known"
    raise MaskError(f"messages[{i}]: the assistant content is not followed by an end-of-turn "
                    f"marker ({markers}), so the model could not learn to stop")


def _tokens_and_labels(tokenizer: PreTrainedTokenizerBase, full: str,
                       spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Tokenize ``full`` and label the spans' tokens.

    Preferred: the natural tokenization of the whole text (what ``apply_chat_template`` gives),
    when every span boundary falls between two of its tokens; then the tokens before each turn are
    exactly what serving encodes for that prompt. Otherwise the pieces between boundaries are
    tokenized separately and joined, so no token straddles a boundary (the first piece is still
    exactly the served prompt); the decode check afterwards guards the result either way.
    """
    cuts = [0, *sorted({b for span in spans for b in span} - {0, len(full)}), len(full)]
    encoded = _encode(tokenizer, [full] + [full[a:b] for a, b in zip(cuts, cuts[1:])])
    ids, pieces = encoded[0], encoded[1:]
    joined = [t for piece in pieces for t in piece]
    index = dict(zip(cuts, [0, *itertools.accumulate(len(p) for p in pieces)]))
    if joined != ids:
        prefixes = _encode(tokenizer, [full[:b] for b in cuts[1:-1]])
        if all(ids[: len(p)] == p for p in prefixes):  # clean boundaries, context-dependent pieces
            index = {0: 0, len(full): len(ids)} | {b: len(p) for b, p in zip(cuts[1:-1], prefixes)}
        else:
            ids = joined
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        lo, hi = index[a], index[b]
        labels[lo:hi] = ids[lo:hi]
    return ids, labels


def _check_supervised_text(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int],
                           expected: list[str]) -> None:
    """Decoding each supervised run of tokens must give back exactly content + end marker."""
    runs: list[list[int]] = []
    previous_supervised = False
    for token, label in zip(ids, labels):
        supervised = label != IGNORE_INDEX
        if supervised and not previous_supervised:
            runs.append([])
        if supervised:
            runs[-1].append(token)
        previous_supervised = supervised
    decoded = tokenizer.batch_decode(runs, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
    if decoded != expected:
        bad = next((i for i, (d, e) in enumerate(zip(decoded, expected)) if d != e), len(decoded))
        got = decoded[bad] if bad < len(decoded) else None
        want = expected[bad] if bad < len(expected) else None
        raise MaskError(f"supervised tokens of response {bad} decode to {got!r}, expected {want!r}")


def _truncate(example: TokenizedExample, max_length: int | None) -> TokenizedExample:
    n = len(example.input_ids)
    if max_length is None or n <= max_length:
        return example
    if any(label != IGNORE_INDEX for label in example.labels[max_length:]):
        raise TruncatedError(f"example has {n} tokens, more than max_length={max_length}, and "
                             "truncating it would cut a response", num_tokens=n, max_length=max_length)
    # Only unsupervised tokens after the last response are dropped: the loss is unchanged.
    return TokenizedExample(example.input_ids[:max_length], example.labels[:max_length])


def tokenize_preference(tokenizer: PreTrainedTokenizerBase, prompt_messages: list[Message],
                        chosen: str, rejected: str, max_length: int | None = None) -> PreferencePair:
    """Tokenize a DPO pair: the prompt (any assistant turns in it unsupervised) followed by the
    chosen or the rejected response; labels on that final response and its end marker only.

    Raises:
        MaskError, TruncatedError: as ``tokenize_conversation``, for either response.
    """
    prompt = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in prompt_messages]
    pair = PreferencePair(
        tokenize_conversation(tokenizer, [*prompt, {"role": "assistant", "content": chosen}], max_length),
        tokenize_conversation(tokenizer, [*prompt, {"role": "assistant", "content": rejected}], max_length),
    )
    # Both share the prompt tokens: the DPO log-ratio compares responses, not prompts.
    n = _first_supervised(pair.chosen)
    if n != _first_supervised(pair.rejected) or pair.chosen.input_ids[:n] != pair.rejected.input_ids[:n]:
        raise MaskError("chosen and rejected tokenize to different prompts")
    return pair


def _first_supervised(example: TokenizedExample) -> int:
    return next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
