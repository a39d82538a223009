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
    messages: list[dict[str, str]]
    max_tokens: int | None
    """None: as many as the cap and the context allow."""
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


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
    """A whole answer, or one piece of a stream; the last piece has ``finish_reason``."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replica: ReplicaStats | None = None
    """On a whole answer and on a stream's first piece; None elsewhere."""


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
        return replace(await collect(generation), replica=stats)

    async def stream(self, call: ChatCall) -> AsyncIterator[ChatOutput]:
        from serving.server import outputs

        generation, stats = await self._start(call)
        try:
            async for output in outputs(generation):
                yield replace(output, replica=stats) if stats is not None else output
                stats = None  # only the first piece carries it
        finally:
            generation.cancel()  # the caller went away (Serve cancels us): free the batch row
