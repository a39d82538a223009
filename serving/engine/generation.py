"""What a request gets back from the engine: ``Chunk``s of its choices, through a ``Generation``
that plain threads and asyncio event loops can both read."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Literal

FinishReason = Literal["stop", "length"]
END = object()
"""Put once per choice after its last chunk."""


@dataclass
class Chunk:
    """A piece of an answer; the last one of a request carries ``finish_reason`` and usage."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    index: int = 0
    """The choice (of the request's ``n``) this piece belongs to."""
    logprobs: list[dict] | None = None
    """With ``SamplingParams.logprobs``: entries of the tokens whose text this piece settles."""


class Generation:
    """The stream of one request's ``Chunk``s (its ``n`` choices interleaved, each ending with
    a ``finish_reason``). Iterate it (sync or async) or ``cancel`` it."""

    def __init__(self, prompt_tokens: int, choices: int = 1):
        self.prompt_tokens = prompt_tokens
        self.choices = choices
        self.cancelled = False
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._async_queue: asyncio.Queue[Any] = asyncio.Queue()
        except RuntimeError:
            self._loop = None
        self._queue: queue.Queue[Any] = queue.Queue()

    def cancel(self) -> None:
        """Stop generating; the engine frees the request's batch row at its next step."""
        self.cancelled = True

    def _put(self, item: Chunk | BaseException | object) -> None:
        if self._loop is None:
            self._queue.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._async_queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is gone
            self.cancelled = True

    def __iter__(self) -> Iterator[Chunk]:
        left = self.choices
        while left:
            item = self._queue.get()
            if item is END:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        left = self.choices
        try:
            while left:
                item = await self._async_queue.get()
                if item is END:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            self.cancel()  # a consumer that stops listening frees the row (no-op when done)
