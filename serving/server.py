"""What a chat replica does, without Ray: one engine, adapters fetched from storage, chat calls.

The Serve deployment (``serving.deployment``) and the in-process back end
(``service.chat.backends.LocalChatBackend``) both wrap a ``ChatServer``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any


from serving.protocol import ChatCall, ChatOutput
from service.core import limits
from service.core.errors import InvalidRequest
from service.core.settings import Settings
from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from serving.adapters import fetch_adapter
from serving.engine.native import Engine, Generation, pick_dtype
from serving.engine.sampling import SamplingParams

log = logging.getLogger(__name__)


class ChatServer:
    def __init__(self, engine: Engine, storage: Any, *, cache_dir: Path | None = None):
        self.engine = engine
        self.storage = storage
        self.cache_dir = cache_dir or Path(tempfile.mkdtemp(prefix="tuneserve-adapters-"))

    @classmethod
    def from_settings(cls, base_model: str, settings: Settings, *, dtype: str = "auto",
                      max_batch: int = 16, threads: int | None = None) -> ChatServer:
        return cls.build(base_model, settings.storage_config(), overrides=settings.models,
                         dtype=dtype, max_batch=max_batch, threads=threads,
                         max_pending=settings.chat_max_concurrency,
                         default_max_tokens=settings.max_tokens_cap)

    @classmethod
    def build(cls, base_model: str, storage_config: StorageConfig, *,
              overrides: dict[str, str] | None = None, dtype: str = "auto", max_batch: int = 16,
              max_pending: int = 64, default_max_tokens: int = limits.MAX_TOKENS,
              threads: int | None = None) -> ChatServer:
        started = time.monotonic()
        storage = open_storage(storage_config)
        engine = Engine.for_base_model(base_model, storage, overrides=overrides, dtype=dtype,
                                       max_batch=max_batch, max_pending=max_pending,
                                       default_max_tokens=default_max_tokens, threads=threads)
        log.info("chat engine for %s ready in %.1f s (%s)", base_model,
                 time.monotonic() - started, pick_dtype(dtype))
        return cls(engine, storage)

    def load_adapter(self, adapter_id: str) -> None:
        """Fetch an adapter from storage, check it and make it usable (blocking)."""
        started = time.monotonic()
        path = fetch_adapter(self.storage, adapter_id, self.cache_dir)
        self.engine.load_adapter(adapter_id, path)
        log.info("adapter %s loaded in %.0f ms", adapter_id, (time.monotonic() - started) * 1e3)

    def unload_adapter(self, adapter_id: str) -> None:
        self.engine.remove_adapter(adapter_id)
        shutil.rmtree(self.cache_dir / adapter_id, ignore_errors=True)

    def start(self, call: ChatCall) -> Generation:
        """Render the conversation with the training template and queue it (from the loop
        that will read the result)."""
        from training.model.chat import ExampleError, render_prompt

        try:
            prompt = render_prompt(self.engine.tokenizer, call.messages)
        except ExampleError as exc:
            raise InvalidRequest(str(exc), param="messages") from exc
        params = SamplingParams(max_tokens=call.max_tokens, temperature=call.temperature,
                                top_p=call.top_p, seed=call.seed, stop=tuple(call.stop))
        return self.engine.submit(prompt, params, call.adapter_id)

    def close(self) -> None:
        self.engine.close()
        shutil.rmtree(self.cache_dir, ignore_errors=True)


async def outputs(generation: Generation) -> AsyncIterator[ChatOutput]:
    async for chunk in generation:
        yield ChatOutput(chunk.text, chunk.finish_reason, chunk.prompt_tokens,
                         chunk.completion_tokens)


async def collect(generation: Generation) -> ChatOutput:
    text: list[str] = []
    last = None
    async for last in outputs(generation):
        text.append(last.text)
    assert last is not None and last.finish_reason is not None
    return ChatOutput("".join(text), last.finish_reason, last.prompt_tokens,
                      last.completion_tokens)
