"""``POST /v1/chat/completions`` in OpenAI's shape, plain and streaming (server-sent events)."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.api.auth import get_tenant
from service.api.chat_schemas import ChatCompletionRequest
from service.api.routes.models import resolve_model
from service.chat.backends import ChatBackend, ChatUnavailable
from service.core.errors import TuneserveError
from serving.protocol import ChatCall, ChatOutput

log = logging.getLogger(__name__)

router = APIRouter(tags=["chat"])


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
    body.check(settings.max_tokens_cap)
    messages = [m.plain(f"messages.{i}") for i, m in enumerate(body.messages)]
    tools, tool_choice = body.tool_call_settings()
    target = await run_in_threadpool(resolve_model, request, body.model, tenant)
    call = ChatCall(base_model=target.base_model, adapter_id=target.adapter_id,
                    messages=messages, max_tokens=body.token_limit(settings.max_tokens_cap),
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                    stop=body.stop_strings(), n=body.n or 1,
                    logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                    frequency_penalty=body.frequency_penalty or 0.0,
                    presence_penalty=body.presence_penalty or 0.0, logit_bias=body.bias(),
                    response_format=body.format_setting(), tools=tools, tool_choice=tool_choice,
                    parallel_tool_calls=body.parallel_tool_calls is not False)
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    head = {"id": completion_id, "created": created, "model": body.model}
    if not body.stream:
        output = await chat.complete(call)
        return _completion(head, output, call)
    outputs = chat.stream(call)
    try:
        # The first piece decides the HTTP status: an error before it (bad prompt, capacity)
        # is a plain error response, not a broken stream.
        first = await anext(outputs)
    except BaseException:
        await outputs.aclose()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = _sse(outputs, first, head, call, include_usage)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(output: ChatOutput) -> dict[str, int]:
    return {"prompt_tokens": output.prompt_tokens, "completion_tokens": output.completion_tokens,
            "total_tokens": output.prompt_tokens + output.completion_tokens}


def _logprobs(output: ChatOutput, call: ChatCall) -> dict | None:
    if call.logprobs is None:
        return None
    return {"content": list(output.logprobs or ()), "refusal": None}


def _message(output: ChatOutput) -> dict:
    message = {"role": "assistant", "content": output.text, "refusal": None}
    if output.tool_calls:
        message["content"] = None
        message["tool_calls"] = list(output.tool_calls)
    return message


def _completion(head: dict, output: ChatOutput, call: ChatCall) -> dict:
    # No system_fingerprint: the spec allows it absent, not null.
    return {
        **head, "object": "chat.completion",
        "choices": [{"index": c.index, "message": _message(c), "finish_reason": c.finish_reason,
                     "logprobs": _logprobs(c, call)} for c in output.choices or (output,)],
        "usage": _usage(output),
    }


class _Chunks:
    """``data: {chunk}`` events of one completion; with ``include_usage`` every chunk has a
    ``usage`` key, null until the last chunk (as the spec says)."""

    def __init__(self, head: dict, call: ChatCall, include_usage: bool):
        self.head, self.call, self.include_usage = head, call, include_usage

    def choice(self, index: int, delta: dict, finish_reason: str | None = None,
               logprobs: tuple | None = None) -> str:
        entry = {"index": index, "delta": delta, "finish_reason": finish_reason,
                 "logprobs": None if self.call.logprobs is None else
                 {"content": list(logprobs or ()), "refusal": None}}
        return self._event([entry])

    def usage(self, output: ChatOutput) -> str:
        return self._event([], _usage(output))

    def _event(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {**self.head, "object": "chat.completion.chunk", "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"


def _delta(output: ChatOutput) -> dict:
    if output.tool_calls:
        return {"tool_calls": [{"index": i, **c} for i, c in enumerate(output.tool_calls)]}
    return {"content": output.text}


async def _sse(outputs: AsyncIterator[ChatOutput], first: ChatOutput, head: dict,
               call: ChatCall, include_usage: bool) -> AsyncIterator[str]:
    """The chunks of every choice, then the usage chunk if asked, then ``data: [DONE]``; a
    later error is an error event."""
    chunks = _Chunks(head, call, include_usage)
    for index in range(call.n):
        yield chunks.choice(index, {"role": "assistant", "content": "", "refusal": None})
    output: ChatOutput | None = first
    running = call.n
    try:
        while output is not None:
            if output.text or output.tool_calls or output.logprobs:
                yield chunks.choice(output.index, _delta(output), logprobs=output.logprobs)
            if output.finish_reason is not None:
                yield chunks.choice(output.index, {}, output.finish_reason)
                running -= 1
                if not running:
                    if include_usage:
                        yield chunks.usage(output)
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
