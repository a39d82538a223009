"""``POST /v1/chat/completions`` in OpenAI's shape, plain and streaming (server-sent events)."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from service.api.auth import get_tenant
from service.chat.backends import ChatBackend, ChatUnavailable
from serving.protocol import ChatCall, ChatOutput
from service.core.errors import InvalidRequest, TuneserveError
from service.api.routes.models import resolve_model

log = logging.getLogger(__name__)

router = APIRouter(tags=["chat"])


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


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = None

    def plain(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else \
            "".join(p.text for p in self.content)
        # "developer" is OpenAI's newer word for the system message.
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    """Only one choice per request is supported."""
    user: str | None = None
    """Accepted for compatibility; not used."""

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


def _backend(request: Request) -> ChatBackend:
    chat = request.app.state.chat
    if chat is None:
        raise ChatUnavailable("Chat completions are not enabled on this server.",
                              code="chat_disabled")
    return chat


_STREAM_RESPONSE = {200: {"description": "The completion; with `stream: true`, server-sent "
                           "events of chunks ending with `data: [DONE]`",
                           "content": {"text/event-stream": {}}}}


@router.post("/chat/completions", responses=_STREAM_RESPONSE)
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 tenant: str = Depends(get_tenant)):
    settings = request.app.state.settings
    chat = _backend(request)
    call_limit = body.token_limit(settings.max_tokens_cap)
    stop = body.stop_strings()
    target = await run_in_threadpool(resolve_model, request, body.model, tenant)
    call = ChatCall(base_model=target.base_model, adapter_id=target.adapter_id,
                    messages=[m.plain() for m in body.messages], max_tokens=call_limit,
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=stop)
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    if not body.stream:
        output = await chat.complete(call)
        return _completion(completion_id, created, body.model, output)
    outputs = chat.stream(call)
    try:
        # The first piece decides the HTTP status: an error before it (bad prompt, capacity)
        # is a plain error response, not a broken stream.
        first = await anext(outputs)
    except BaseException:
        await outputs.aclose()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = _sse(outputs, first, completion_id, created, body.model, include_usage)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(output: ChatOutput) -> dict[str, int]:
    return {"prompt_tokens": output.prompt_tokens, "completion_tokens": output.completion_tokens,
            "total_tokens": output.prompt_tokens + output.completion_tokens}


def _completion(completion_id: str, created: int, model: str, output: ChatOutput) -> dict:
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": output.text},
                     "finish_reason": output.finish_reason, "logprobs": None}],
        "usage": _usage(output), "system_fingerprint": None,
    }


def _chunk(completion_id: str, created: int, model: str, delta: dict,
           finish_reason: str | None = None, usage: dict | None = None) -> str:
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                         "logprobs": None}]}
    if usage is not None:
        body["choices"], body["usage"] = [], usage
    return f"data: {json.dumps(body)}\n\n"


async def _sse(outputs: AsyncIterator[ChatOutput], first: ChatOutput, completion_id: str,
               created: int, model: str, include_usage: bool) -> AsyncIterator[str]:
    """``data: {chunk}`` events, then ``data: [DONE]``; a later error is an error event."""
    yield _chunk(completion_id, created, model, {"role": "assistant", "content": ""})
    output: ChatOutput | None = first
    try:
        while output is not None:
            if output.text:
                yield _chunk(completion_id, created, model, {"content": output.text})
            if output.finish_reason is not None:
                yield _chunk(completion_id, created, model, {}, output.finish_reason)
                if include_usage:
                    yield _chunk(completion_id, created, model, {}, usage=_usage(output))
                break
            output = await anext(outputs, None)
    except TuneserveError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    except Exception:
        log.exception("chat stream failed")
        error = {"error": {"message": "Internal server error.", "type": "server_error",
                           "param": None, "code": None}}
        yield f"data: {json.dumps(error)}\n\n"
    finally:
        # Closing runs the back end's cleanup now (it cancels the request and frees its
        # batch row), also when the client disconnected and this generator was cancelled.
        await outputs.aclose()
    yield "data: [DONE]\n\n"
