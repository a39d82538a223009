"""What a chat call asks and what it answers: the types the API and the chat replicas exchange.

Plain dataclasses, free of torch, so the API replica builds and reads them without loading any
model code; they cross process boundaries (Ray Serve handles) pickled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class ChatCall:
    base_model: str
    adapter_id: str | None
    """The adapter's folder under ``adapters/`` (``ftjob-…/final``); None for the base model."""
    messages: list[dict[str, Any]]
    """``{"role", "content": str}``; an assistant message may add ``tool_calls`` (OpenAI's)."""
    max_tokens: int | None
    """None: as many as the cap and the context allow."""
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    """Choices to generate, decoded together in one batch."""
    logprobs: int | None = None
    """None: no log-probs; k: each token's log-prob with the k most likely (0 to 20)."""
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    response_format: dict[str, Any] | None = None
    """``{"type": "json_object"}`` or ``{"type": "json_schema", "schema": {…}}``; None: text."""
    tools: list[dict[str, Any]] | None = None
    """OpenAI function tools (``{"type": "function", "function": {…}}``), checked by the API."""
    tool_choice: str | dict[str, Any] = "auto"
    """``none``, ``auto``, ``required`` or ``{"type": "function", "function": {"name"}}``."""
    parallel_tool_calls: bool = True

    @property
    def calls_tools(self) -> bool:
        """Whether the answer may be tool calls (and is read for them)."""
        return bool(self.tools) and self.tool_choice != "none"


@dataclass(frozen=True)
class ReplicaStats:
    """What the replica that answered tells the API about its adapters, for ``/metrics``.

    Chat replicas are processes of their own, so counters kept there never reach the API's
    ``/metrics``; instead each answer carries this small record (a few bytes) back.
    """

    replica: str
    """The Serve replica (``<deployment>#<replica tag>``), or ``local`` in process."""
    adapters_loaded: int
    """Adapters held by that replica right after this request started."""
    adapter_load_seconds: float | None = None
    """Set when this request hot-loaded its adapter: how long fetching and loading took."""


@dataclass(frozen=True)
class ChatOutput:
    """A whole answer, or one piece of a stream of one choice; a choice's last piece has
    ``finish_reason``. Token counts are the request's so far (all choices): the stream's last
    piece and a whole answer carry its usage."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replica: ReplicaStats | None = None
    """On a whole answer and on a stream's first piece; None elsewhere."""
    index: int = 0
    """The choice this piece belongs to."""
    logprobs: tuple[dict[str, Any], ...] | None = None
    """With ``ChatCall.logprobs``: OpenAI's ``ChatCompletionTokenLogprob`` of this text's tokens."""
    tool_calls: tuple[dict[str, Any], ...] | None = None
    """The answer read as tool calls (``finish_reason`` "tool_calls"): OpenAI's
    ``{"id", "type": "function", "function": {"name", "arguments"}}``; ``text`` is then empty."""
    choices: tuple[ChatOutput, ...] = ()
    """A whole answer: each choice's (its text is choice 0's). Empty on stream pieces."""


class AnswersChat:
    """``complete`` and ``stream`` over a ``_start(call)`` that submits the call to an engine.

    Shared by the Serve chat replica (``serving.deployment.ChatModel``) and the in-process back
    end (``service.chat.backends.LocalChatBackend``). The engine is imported on first call, so
    this module stays free of torch.
    """

    async def _start(self, call: ChatCall) -> tuple[Any, ReplicaStats | None]:
        """Submit ``call``; return its ``Generation`` and the stats the first output carries."""
        raise NotImplementedError

    async def complete(self, call: ChatCall) -> ChatOutput:
        from serving.server import collect

        generation, stats = await self._start(call)
        return replace(await collect(generation, call), replica=stats)

    async def stream(self, call: ChatCall) -> AsyncIterator[ChatOutput]:
        from serving.server import outputs

        generation, stats = await self._start(call)
        try:
            async for output in outputs(generation, call):
                yield replace(output, replica=stats) if stats is not None else output
                stats = None  # only the first piece carries it
        finally:
            generation.cancel()  # the caller went away (Serve cancels us): free the batch row
