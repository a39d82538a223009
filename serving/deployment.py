"""The Ray Serve chat deployment: one per base model, adapters multiplexed per replica (LRU).

``service.ray.app`` creates one per base model as
``ChatModel.options(name=deployment_name(base)).bind(base_model=..., settings_args=...)``.
A request for a tuned model carries the adapter id (``ftjob-…/final``) as multiplexed model
id; ``serve.get_multiplexed_model_id()`` reads it here and ``@serve.multiplexed`` loads the
adapter on first use, evicting the least recently used one beyond ``max_adapters``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any

from ray import serve

from serving.protocol import AnswersChat, ChatCall, ReplicaStats
from service.core.settings import Settings
from service.core.storage.config import StorageConfig
from serving.engine.native import AdapterNotLoaded
from serving.server import ChatServer

log = logging.getLogger(__name__)

_MULTIPLEX_ATTR = "__serve_multiplex_wrapper"
"""Where ``@serve.multiplexed`` keeps its LRU (ray 2.60 serve/api.py); read to evict by id."""


class _Adapter:
    """What the multiplexed LRU holds; Serve calls ``__del__`` when it evicts the adapter."""

    def __init__(self, server: ChatServer, adapter_id: str):
        self.server = server
        self.adapter_id = adapter_id
        self.unloaded = False

    def __del__(self) -> None:
        # Serve runs this in its executor on LRU eviction; the garbage collector calls it once
        # more later, hence the flag.
        if not self.unloaded:
            self.unloaded = True
            self.server.unload_adapter(self.adapter_id)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256,
                  max_queued_requests=256, health_check_period_s=10)
class ChatModel(AnswersChat):
    """A chat replica for one base model.

    Args:
        base_model: the base model id this deployment serves.
        settings_args: ``Settings`` fields (from ``build_app``); storage, caps and LRU size
            come from them unless given below.
        storage_config: where adapters live (overrides ``settings_args``).
        max_adapters: adapters kept per replica (default ``max_adapters_per_replica``).
        dtype: ``auto`` (bf16 on CPUs with native bf16), ``bfloat16`` or ``float32``.
        threads: intra-op threads of the generation thread. One by default, as Ray gives an
            actor that asks for no CPUs: on the 2-core reference machine a decode step on one
            thread is faster than on two whose OpenMP workers sleep between ops (which they
            must where training shares the cores: ``service.ray.embedded``), 90 against 128 ms at
            batch 8.
    """

    def __init__(self, base_model: str, settings_args: dict[str, Any] | None = None, *,
                 storage_config: StorageConfig | None = None, max_adapters: int | None = None,
                 dtype: str = "auto", max_batch: int = 16, threads: int = 1):
        settings = Settings(**(settings_args or {}))
        self.base_model = base_model
        self.server = ChatServer.build(
            base_model, storage_config or settings.storage_config(), overrides=settings.models,
            dtype=dtype, max_batch=max_batch, threads=threads,
            max_pending=settings.chat_max_concurrency,
            default_max_tokens=settings.max_tokens_cap, device=settings.chat_device,
            engine=settings.chat_engine, vllm_python=settings.vllm_python,
            max_adapters=max_adapters or settings.max_adapters_per_replica,
            max_full_models=settings.max_full_models_per_replica)
        self.max_adapters = max_adapters or settings.max_adapters_per_replica
        # Per request: where the adapter loader notes its time. ``@serve.multiplexed`` calls
        # the loader in the requesting task (under its lock), so only the request that caused
        # the load sees it; requests that waited on that load, or found the adapter loaded,
        # see nothing. (Made here, not at module level: Serve pickles this class by value,
        # and a ContextVar does not pickle.)
        self._hot_load: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar(
            "tuneserve_hot_load", default=None)

        async def load_adapter_by_id(adapter_id: str) -> _Adapter:
            started = time.perf_counter()
            await asyncio.to_thread(self.server.load_adapter, adapter_id)
            noted = self._hot_load.get()
            if noted is not None:
                noted.append(time.perf_counter() - started)
            return _Adapter(self.server, adapter_id)

        # Decorated here, not on a method, so the LRU size can come from the constructor.
        self._load_adapter = serve.multiplexed(max_num_models_per_replica=self.max_adapters)(
            load_adapter_by_id)

    async def _ensure_adapter(self, call: ChatCall) -> None:
        if call.adapter_id is None:
            return
        routed = serve.get_multiplexed_model_id()
        if routed and routed != call.adapter_id:
            raise ValueError(f"request routed for {routed!r} but asks for {call.adapter_id!r}")
        await self._load_adapter(call.adapter_id)

    async def _start(self, call: ChatCall) -> tuple[Any, ReplicaStats]:
        noted: list[float] = []
        self._hot_load.set(noted)  # this request's own context: Serve runs each call in a task
        # An eviction running in Serve's executor can drop the adapter between loading and
        # submitting, and the server unloads full fine-tunes beyond its own cap while Serve's
        # LRU still lists them; loading again is cheap next to that, so retry once.
        for attempt in range(2):
            await self._ensure_adapter(call)
            try:
                generation = self.server.start(call)
                break
            except AdapterNotLoaded:
                if attempt:
                    raise
                await self.evict(call.adapter_id)  # so the LRU loads it again
        return generation, self._stats(sum(noted) if noted else None)

    def _stats(self, load_seconds: float | None) -> ReplicaStats:
        return ReplicaStats(self._replica, len(self.server.loaded), load_seconds)

    @property
    def _replica(self) -> str:
        try:
            context = serve.get_replica_context()
        except Exception:  # noqa: BLE001 - RayServeException outside a replica: no context
            return "unknown"
        return f"{context.deployment}#{context.replica_tag}"

    async def evict(self, adapter_id: str) -> bool:
        """Drop ``adapter_id`` from this replica; False if it did not hold it."""
        wrapper = getattr(self._load_adapter.__wrapped__, _MULTIPLEX_ATTR, None)
        adapter = wrapper.models.pop(adapter_id, None) if wrapper is not None else None
        if adapter is None:
            return self.server.unload_adapter(adapter_id)
        wrapper._push_multiplexed_replica_info = True  # tell the router at once
        await asyncio.to_thread(adapter.__del__)
        return True

    def loaded_adapters(self) -> list[str]:
        return self.server.loaded

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests in the engine."""
        return self.server.engine.load

    def __del__(self) -> None:
        # Serve calls this when it stops the replica: end the generation thread, drop the
        # local adapter copies.
        server = getattr(self, "server", None)
        if server is not None:
            server.close()

    async def ready(self) -> bool:
        """Whether this replica can answer: its generation thread runs (the API's ``/readyz``
        asks, with a short timeout)."""
        return self.server.engine.healthy

    def check_health(self) -> None:
        if not self.server.engine.healthy:
            raise RuntimeError(f"the generation loop of {self.base_model} stopped")
