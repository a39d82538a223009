"""How the API reaches the chat engines: through Ray Serve, or in process for tests.

Both back ends take a ``ChatCall`` (what to run, already checked by ``service.api.routes.chat``) and give
back ``ChatOutput``s, one for a plain completion or a stream of pieces. This module stays free
of torch: ``LocalChatBackend`` imports the engine only when it is built.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Protocol

from service.core.errors import RateLimited, TuneserveError
from service.core.names import deployment_name
from service.core.settings import Settings
from serving.protocol import AnswersChat, ChatCall, ChatOutput, ReplicaStats

log = logging.getLogger(__name__)


class ChatUnavailable(TuneserveError):
    """The chat deployment did not answer in time or is not running."""

    status = 503

GENERATION_STOPPED = "its generation loop stopped"

CALL_TIMEOUT_S = 600.0
"""Upper bound on one completion through Serve (a 2048-token answer on CPU takes minutes)."""
REPLICA_LOST_RETRIES = 2
"""How often a call is sent again when the chat replica died under it (see ``_replica_lost``)."""


class ChatBackend(Protocol):
    async def ready(self, timeout_s: float) -> dict[str, str]:
        """Each chat deployment (by name) that should answer now: "ok", or why it cannot."""
        ...

    async def complete(self, call: ChatCall) -> ChatOutput: ...
    def stream(self, call: ChatCall) -> AsyncIterator[ChatOutput]: ...
    async def evict(self, adapter_id: str, base_model: str | None = None) -> None: ...


class LocalChatBackend(AnswersChat):
    """The chat engines in this process, one per base model, built on first use; no Ray.

    Adapters are kept in an LRU of ``settings.max_adapters_per_replica`` per base model,
    the same policy ``@serve.multiplexed`` applies per replica.
    """

    def __init__(self, settings: Settings, *, dtype: str = "auto", max_batch: int = 16):
        from serving.server import ChatServer  # noqa: F401  (fail early if torch is missing)

        self.settings = settings
        self.dtype = dtype
        self.max_batch = max_batch
        self._servers: dict[str, Any] = {}
        self._caches: dict[str, Any] = {}
        self._building: dict[str, asyncio.Task[Any]] = {}

    async def ready(self, timeout_s: float) -> dict[str, str]:
        # Engines are built on first use: one not built yet is not expected to answer.
        return {deployment_name(base): "ok" if server.engine.healthy else GENERATION_STOPPED
                for base, server in self._servers.items()}

    async def _server(self, base_model: str) -> tuple[Any, Any]:
        if base_model not in self._servers:
            task = self._building.get(base_model)
            if task is None:
                task = asyncio.create_task(asyncio.to_thread(self._build, base_model))
                self._building[base_model] = task
            await asyncio.shield(task)
        return self._servers[base_model], self._caches[base_model]

    def _build(self, base_model: str) -> None:
        from serving.adapters import AdapterCache
        from serving.server import ChatServer

        server = ChatServer.from_settings(base_model, self.settings, dtype=self.dtype,
                                          max_batch=self.max_batch)
        self._caches[base_model] = AdapterCache(self.settings.max_adapters_per_replica,
                                                server.load_adapter, server.unload_adapter)
        self._servers[base_model] = server

    async def _start(self, call: ChatCall) -> tuple[Any, ReplicaStats]:
        server, cache = await self._server(call.base_model)
        load_seconds = None
        if call.adapter_id is not None:
            load_seconds = await cache.get(call.adapter_id)
        stats = ReplicaStats("local", len(cache.loaded), load_seconds)
        # No await since cache.get: the adapter cannot be evicted before it is submitted.
        from serving.engine.native import AdapterNotLoaded

        try:
            return server.start(call), stats
        except AdapterNotLoaded:  # a full fine-tune the server unloaded beyond its own cap
            cache.evict(call.adapter_id)
            load_seconds = await cache.get(call.adapter_id)
            return server.start(call), ReplicaStats("local", len(cache.loaded), load_seconds)

    async def evict(self, adapter_id: str, base_model: str | None = None) -> None:
        for base, cache in self._caches.items():
            if base_model in (None, base):
                cache.evict(adapter_id)

    def close(self) -> None:
        for server in self._servers.values():
            server.close()


class ServeChatBackend:
    """Calls the ``Chat-<slug>`` deployments of the running Serve application.

    Requests for a tuned model carry the adapter id as multiplexed model id, so Serve routes
    them to a replica that already holds the adapter. Base-model requests carry none: they
    then spread over all replicas instead of piling onto the ones that hold some adapter.
    """

    def __init__(self, settings: Settings, *, app_name: str | None = None):
        self.settings = settings
        self._app_name = app_name
        self._handles: dict[str, Any] = {}

    async def ready(self, timeout_s: float) -> dict[str, str]:
        """Asks every chat deployment's ``ready()`` at once, each bounded by ``timeout_s``."""
        from service.core.names import base_model_ids

        bases = base_model_ids(self.settings)
        answers = await asyncio.gather(*(self._ready(base, timeout_s) for base in bases))
        return {deployment_name(base): answer for base, answer in zip(bases, answers, strict=True)}

    async def _ready(self, base_model: str, timeout_s: float) -> str:
        response = None
        try:
            # Routed like a base-model request, to any replica; with none running, Serve holds it.
            response = self._handle(base_model).ready.remote()
            healthy = await asyncio.wait_for(response, timeout_s)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the deployment cannot answer
            if isinstance(exc, asyncio.TimeoutError) and response is not None:
                response.cancel()
                why = f"no replica answered within {timeout_s:g} s"
            else:
                why = f"its replica failed to answer: {_first_line(exc)}"
            return f"{why} ({await self._replicas(base_model, timeout_s)})"
        return "ok" if healthy else GENERATION_STOPPED

    async def _replicas(self, base_model: str, timeout_s: float) -> str:
        """The deployment's replicas by state, as Serve's controller sees them."""
        from ray import serve

        try:
            app = self._app_name or serve.get_replica_context().app_name
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), timeout_s)
            deployment = status.applications[app].deployments[deployment_name(base_model)]
        except Exception as exc:  # noqa: BLE001 - the status is only a detail of the answer
            return f"replicas unknown: {_first_line(exc)}"
        states = ", ".join(f"{n} {state.lower()}" for state, n in
                           sorted(deployment.replica_states.items()) if n)
        return f"replicas: {states or 'none'}"

    def _handle(self, base_model: str) -> Any:
        handle = self._handles.get(base_model)
        if handle is None:
            from ray import serve

            app = self._app_name or serve.get_replica_context().app_name
            handle = serve.get_deployment_handle(deployment_name(base_model), app_name=app)
            self._handles[base_model] = handle
        return handle

    def _routed(self, call: ChatCall, *, stream: bool = False) -> Any:
        handle = self._handle(call.base_model)
        if call.adapter_id is not None:
            handle = handle.options(multiplexed_model_id=call.adapter_id)
        return handle.options(stream=True) if stream else handle

    # A chat call has no side effects, so when its replica dies under it (SIGKILL, OOM, a
    # node lost) it is sent again: Serve's router has then marked that replica dead and routes
    # the call to another one, or holds it until the controller has started the replacement.
    # A stream that has already sent text is resumed only if its answer is reproducible
    # (greedy, or seeded sampling): the new generation must first repeat what the caller has,
    # which is skipped (``Replay``); one that is not reproducible, or that diverges, fails.

    async def complete(self, call: ChatCall) -> ChatOutput:
        for attempt in range(REPLICA_LOST_RETRIES + 1):
            response = self._routed(call).complete.remote(call)
            try:
                return await asyncio.wait_for(response, CALL_TIMEOUT_S)
            except Exception as exc:
                if not (_replica_lost(exc) and attempt < REPLICA_LOST_RETRIES):
                    raise _unwrap(exc) from None
                log.warning("chat replica lost during a completion; sending it again: %s",
                            _first_line(exc))
        raise AssertionError("unreachable")

    async def stream(self, call: ChatCall) -> AsyncIterator[ChatOutput]:
        sent = ""  # the text the caller has
        for attempt in range(REPLICA_LOST_RETRIES + 1):
            responses = self._routed(call, stream=True).stream.remote(call)
            replay = Replay(sent)
            try:
                while True:
                    try:
                        output = await asyncio.wait_for(responses.__anext__(), CALL_TIMEOUT_S)
                    except StopAsyncIteration:
                        return
                    except Exception as exc:
                        if (not _replica_lost(exc) or attempt >= REPLICA_LOST_RETRIES
                                or (sent and not reproducible(call))):
                            raise _unwrap(exc) from None
                        log.warning("chat replica lost after %d characters of a stream; sending "
                                    "the call again: %s", len(sent), _first_line(exc))
                        break
                    output = replay.new_part(output)
                    if output is not None:
                        sent += output.text
                        yield output
            finally:
                responses.cancel()  # propagates to the replica, which frees the batch row
        raise AssertionError("unreachable")

    async def evict(self, adapter_id: str, base_model: str | None = None) -> None:
        """Drop the adapter from the replicas that hold it.

        Serve routes a call with the adapter's multiplexed id to a replica holding it, so we
        evict until a replica answers that it held nothing (bounded). A replica we miss keeps
        an unreachable copy until its LRU drops it: the API refuses deleted models itself.
        """
        from service.core.names import base_model_ids

        bases = [base_model] if base_model else base_model_ids(self.settings)
        for base in bases:
            handle = self._handle(base).options(multiplexed_model_id=adapter_id)
            for _ in range(8):
                try:
                    if not await asyncio.wait_for(handle.evict.remote(adapter_id), 30):
                        break
                except Exception as exc:
                    log.warning("evicting %s from %s failed: %s", adapter_id, base, exc)
                    break


def reproducible(call: ChatCall) -> bool:
    """Whether sending ``call`` again gives the same answer: greedy, or sampled with a seed,
    with one choice (the pieces of several interleave in no fixed order) whose text is sent as
    it comes (held tool-call text could end as calls the caller has not seen)."""
    return (call.temperature <= 0 or call.seed is not None) and call.n == 1 \
        and not call.calls_tools


class Replay:
    """The pieces of a stream sent again after its replica died, minus what the caller has.

    ``new_part`` takes each piece of the new stream: while it repeats ``sent`` it returns
    None (a piece reaching past ``sent`` comes back with only its new text); if it says
    anything else, or ends before repeating all of ``sent``, the stream cannot go on
    (``ChatUnavailable``, as if it had not been resumed). Replica stats of skipped pieces
    ride on the next piece returned, so ``/metrics`` still sees the replica that answered.
    """

    def __init__(self, sent: str):
        self.left = sent
        self.replica: ReplicaStats | None = None

    def new_part(self, output: ChatOutput) -> ChatOutput | None:
        if self.left:
            text, self.replica = output.text, output.replica or self.replica
            common = min(len(text), len(self.left))
            if text[:common] != self.left[:common] or (
                    output.finish_reason is not None and len(text) < len(self.left)):
                raise ChatUnavailable("The chat replica serving this request stopped; retry "
                                      "shortly.", code="replica_lost")
            self.left = self.left[common:]
            output = replace(output, text=text[common:])
            if not output.text and output.finish_reason is None:
                return None
        if self.replica is not None:
            output, self.replica = replace(output, replica=output.replica or self.replica), None
        return output


def _replica_lost(exc: BaseException) -> bool:
    """The replica's process died or is unreachable (not: our code in it raised)."""
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError) or isinstance(getattr(exc, "cause", None),
                                                        RayActorError)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _unwrap(exc: BaseException) -> BaseException:
    """Our errors raised in a replica arrive wrapped by Ray; give the API the original."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, TuneserveError):
        return cause
    if isinstance(exc, TuneserveError):
        return exc
    if _replica_lost(exc):
        return ChatUnavailable("The chat replica serving this request stopped; retry shortly.",
                               code="replica_lost")
    if isinstance(exc, asyncio.TimeoutError):
        return ChatUnavailable("The chat deployment did not answer in time.", code="timeout")
    if type(exc).__name__ == "BackPressureError":  # Serve's own queue bound (max_queued_requests)
        return RateLimited("The chat deployment is at capacity; retry shortly.", retry_after=1,
                           code="capacity_exceeded")
    return exc
