"""The body of ``POST /v1/chat/completions``: every field of the spec's
``CreateChatCompletionRequest``, each honoured, accepted and ignored, or refused with a 400.

Ignored, because they do not apply to a self-hosted model: ``store``, ``service_tier``,
``metadata``, ``prompt_cache_key``, ``prompt_cache_retention``, ``prompt_cache_options`` (our
prefix cache is automatic), ``safety_identifier``, ``user``, ``verbosity``, ``reasoning_effort``
(no reasoning models), ``prediction`` (it only speeds up OpenAI's decoding; the answer is the
same), ``stream_options.include_obfuscation`` (nothing is obfuscated), ``modalities: ["text"]``
and ``audio: null``. Refused when set: audio output, ``web_search_options``, ``moderation``, the
deprecated ``functions`` / ``function_call`` (send ``tools``), custom tools.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from jsonschema import exceptions as jsonschema_errors
from jsonschema import validators
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from service.core import limits
from service.core.errors import InvalidRequest


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can carry a lone surrogate ("\\ud800"); no tokenizer can take it.
        raise ValueError("the text holds an unpaired UTF-16 surrogate, which is not a character") \
            from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]
NonEmpty = Annotated[str, Field(min_length=1), AfterValidator(_utf8)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
"""A function's or a response format's name, as the spec words it: a-z, A-Z, 0-9, _ and -,
at most 64."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(Strict):
    """A text part (any role) or a refusal part (assistant); images, audio and files are not
    taken by our text models."""
    type: Literal["text", "refusal"]
    text: Text | None = None
    refusal: str | None = None


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(Strict):
    """One of the spec's message kinds, told apart by ``role`` (checked in ``plain``)."""
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | Annotated[list[ContentPart], Field(min_length=1)] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """Assistant messages: the calls it made."""
    tool_call_id: str | None = None
    """Tool messages: the call this result answers."""
    refusal: str | None = None
    function_call: FunctionCall | None = None
    audio: dict[str, Any] | None = None

    def plain(self, where: str) -> dict[str, Any]:
        """``{"role", "content"}`` (plus ``tool_calls``) as the chat template takes them."""
        if self.role == "function" or self.function_call is not None:
            raise InvalidRequest("Function messages and function_call are deprecated; send "
                                 "tool messages and tool_calls.", param=f"{where}.role")
        if self.audio is not None:
            raise InvalidRequest("Audio is not supported.", param=f"{where}.audio")
        parts = [self.content] if isinstance(self.content, str) else (self.content or [])
        text = []
        for i, part in enumerate(parts):
            if isinstance(part, str):
                text.append(part)
            elif part.type == "text" and part.text is not None:
                text.append(part.text)
            elif not (part.type == "refusal" and self.role == "assistant"):
                raise InvalidRequest(f"A {part.type} part needs its {part.type!r} field; refusal "
                                     "parts are for assistant messages.",
                                     param=f"{where}.content.{i}")
        if self.role == "tool" and self.tool_call_id is None:
            raise InvalidRequest("A tool message needs tool_call_id.", param=f"{where}.tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise InvalidRequest("Only assistant messages carry tool_calls.",
                                 param=f"{where}.tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise InvalidRequest("content is required (an assistant message may give "
                                 "tool_calls instead).", param=f"{where}.content")
        # "developer" is OpenAI's newer word for the system message.
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": "".join(text)}
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return message


class StreamOptions(Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None
    """Ignored: chunks carry no padding to obfuscate their size."""


class FunctionDefinition(Strict):
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    """Arguments are constrained to ``parameters`` whenever a call is required; otherwise
    the model writes them freely."""


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class AllowedTools(Strict):
    mode: Literal["auto", "required"]
    tools: list[NamedToolChoice] = Field(min_length=1)


class AllowedToolsChoice(Strict):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class JsonSchemaFormat(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Name
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    """The answer always follows the schema (constrained decoding), strict or not."""


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """OpenAI's newer name for ``max_tokens``; wins when both are given."""
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=4)] | None = None
    """Up to 4 strings that end the answer."""
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)
    """A 64-bit integer, as OpenAI's; torch's generator takes no more."""
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=1, le=limits.MAX_CHOICES)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=limits.MAX_TOP_LOGPROBS)
    frequency_penalty: float | None = Field(default=0, ge=-2, le=2)
    presence_penalty: float | None = Field(default=0, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None
    """Token id (as a string) → bias from -100 to 100, added to that token's logit."""
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice | \
        None = None
    parallel_tool_calls: bool | None = None
    # Accepted and ignored (see the module docstring).
    store: bool | None = None
    service_tier: str | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(default=None,
                                                                           max_length=16)
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = Field(default=None, max_length=64)
    user: str | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | \
        None = None
    prediction: dict[str, Any] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    # Refused when set.
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    def check(self, max_tokens_cap: int) -> None:
        """What a field's type cannot say; each problem is a 400 naming its parameter."""
        refused = {"web_search_options": "Web search is not available",
                   "moderation": "Moderation is not available",
                   "audio": "Audio output is not supported",
                   "functions": "functions is deprecated; send tools",
                   "function_call": "function_call is deprecated; send tool_choice"}
        for field, why in refused.items():
            if getattr(self, field) is not None:
                raise InvalidRequest(f"{why}.", param=field)
        if self.modalities and "audio" in self.modalities:
            raise InvalidRequest("Only text output is supported.", param="modalities")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true.", param="top_logprobs")
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit() or not -100 <= bias <= 100:
                raise InvalidRequest(f"logit_bias maps token ids to biases from -100 to 100; "
                                     f"got {key!r}: {bias}.", param="logit_bias")
        limit = self.token_limit(max_tokens_cap) or max_tokens_cap
        if (self.n or 1) * limit > limits.MAX_CHOICE_TOKENS:
            raise InvalidRequest(
                f"n × max_tokens is {(self.n or 1)} × {limit}; this service allows at most "
                f"{limits.MAX_CHOICE_TOKENS} tokens per request. Lower n or max_tokens.",
                param="n")
        self._check_response_format()
        self._check_tools()

    def _check_response_format(self) -> None:
        fmt = self.response_format
        if fmt is None or fmt.type != "json_schema":
            return
        if fmt.json_schema is None:
            raise InvalidRequest("A json_schema response format needs its json_schema.",
                                 param="response_format.json_schema")
        check_schema(fmt.json_schema.schema_ or {}, "response_format.json_schema.schema")

    def _check_tools(self) -> None:
        names = [t.function.name for t in self.tools or []]
        for i, tool in enumerate(self.tools or []):
            if tool.function.parameters is not None:
                check_schema(tool.function.parameters, f"tools.{i}.function.parameters")
        if len(set(names)) < len(names):
            raise InvalidRequest("Two tools have the same name.", param="tools")
        choice = self.tool_choice
        wanted = [choice.function.name] if isinstance(choice, NamedToolChoice) else \
            [t.function.name for t in choice.allowed_tools.tools] \
            if isinstance(choice, AllowedToolsChoice) else []
        if choice not in (None, "none", "auto") and not names:
            raise InvalidRequest("tool_choice asks for a tool call, but no tools are given.",
                                 param="tool_choice")
        for name in wanted:
            if name not in names:
                raise InvalidRequest(f"tool_choice names {name!r}, which is not in tools.",
                                     param="tool_choice")

    def tool_call_settings(self) -> tuple[list[dict] | None, str | dict]:
        """``(tools, tool_choice)`` for the call: allowed tools narrow the list."""
        tools = [t.model_dump(exclude_none=True) for t in self.tools or []] or None
        choice = self.tool_choice or "auto"
        if isinstance(choice, AllowedToolsChoice):
            allowed = {t.function.name for t in choice.allowed_tools.tools}
            tools = [t for t in tools or [] if t["function"]["name"] in allowed]
            return tools, choice.allowed_tools.mode
        if isinstance(choice, NamedToolChoice):
            return tools, choice.model_dump()
        return tools, choice

    def format_setting(self) -> dict[str, Any] | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "json_object"}
        assert fmt.json_schema is not None
        return {"type": "json_schema", "schema": fmt.json_schema.schema_ or {}}

    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise InvalidRequest("stop takes up to 4 non-empty strings.", param="stop")
        return tuple(stops)

    def token_limit(self, cap: int) -> int | None:
        param = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
        limit = self.max_completion_tokens or self.max_tokens
        if limit is not None and limit > cap:
            raise InvalidRequest(f"{param} is {limit}; this service allows at most {cap}.",
                                 param=param, code="max_tokens_exceeded")
        return limit


def check_schema(schema: dict[str, Any], param: str) -> None:
    """A 400 naming ``param`` unless ``schema`` is a valid JSON Schema (its declared draft, or
    2020-12)."""
    try:
        validators.validator_for(schema, default=validators.Draft202012Validator) \
            .check_schema(schema)
    except jsonschema_errors.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise InvalidRequest(f"{param} is not a valid JSON Schema: {exc.message}"
                             + (f" (at {where})" if where else ""), param=param) from None
