"""What a chat replica does, without Ray: one engine, adapters fetched from storage, chat calls.

A full fine-tune of the base model is fetched like an adapter (by its adapter id) but is a whole
model: it gets an engine of its own over its weights, with the base model's tokenizer and chat
template, and at most ``limits.FULL_MODELS_PER_REPLICA`` of them stay loaded (least recently used
goes first), as each costs the memory of the model.

The Serve deployment (``serving.deployment``) and the in-process back end
(``service.chat.backends.LocalChatBackend``) both wrap a ``ChatServer``.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from service.core import limits
from service.core.errors import InvalidRequest
from service.core.settings import Settings
from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from serving.adapters import MANIFEST_FILE, AdapterIncompatible, check_manifest, fetch_adapter
from serving.device import place
from serving.engine.grammar import json_object_grammar, json_schema_grammar
from serving.engine.native import Chunk, Engine, Generation
from serving.engine.sampling import SamplingParams
from serving.protocol import ChatCall, ChatOutput

log = logging.getLogger(__name__)


class ChatServer:
    def __init__(self, engine: Engine, storage: Any, *, cache_dir: Path | None = None,
                 max_full_models: int = limits.FULL_MODELS_PER_REPLICA):
        self.engine = engine
        self.storage = storage
        self.cache_dir = cache_dir or Path(tempfile.mkdtemp(prefix="tuneserve-adapters-"))
        self.max_full_models = max_full_models
        self.full_models: OrderedDict[str, Engine] = OrderedDict()
        """Full fine-tunes by adapter id, each its own engine; least recently used first."""
        self._full_lock = threading.Lock()

    @classmethod
    def from_settings(cls, base_model: str, settings: Settings, *, dtype: str = "auto",
                      max_batch: int = 16, threads: int | None = None) -> ChatServer:
        return cls.build(base_model, settings.storage_config(), overrides=settings.models,
                         dtype=dtype, max_batch=max_batch, threads=threads,
                         max_pending=settings.chat_max_concurrency,
                         default_max_tokens=settings.max_tokens_cap,
                         device=settings.chat_device, engine=settings.chat_engine,
                         vllm_python=settings.vllm_python,
                         max_adapters=settings.max_adapters_per_replica,
                         max_full_models=settings.max_full_models_per_replica)

    @classmethod
    def build(cls, base_model: str, storage_config: StorageConfig, *,
              overrides: dict[str, str] | None = None, dtype: str = "auto", max_batch: int = 16,
              max_pending: int = 64, default_max_tokens: int = limits.MAX_TOKENS,
              threads: int | None = None, device: str = "auto", engine: str = "auto",
              vllm_python: str | None = None,
              max_adapters: int = limits.ADAPTERS_PER_REPLICA,
              max_full_models: int = limits.FULL_MODELS_PER_REPLICA) -> ChatServer:
        """Start the engine the settings pick (``serving.device.place``); raises
        ``ChatConfigError`` naming the setting this machine cannot honour."""
        started = time.monotonic()
        placement = place(device=device, engine=engine, dtype=dtype, vllm_python=vllm_python)
        storage = open_storage(storage_config)
        common = {"overrides": overrides, "max_batch": max_batch, "max_pending": max_pending,
                  "default_max_tokens": default_max_tokens}
        if placement.engine == "vllm":
            from serving.engine.vllm_engine import VllmEngine

            chosen: Any = VllmEngine.for_base_model(
                base_model, storage, python=placement.vllm_python, device=placement.device,
                dtype=placement.dtype, max_adapters=max_adapters, **common)
        else:
            chosen = Engine.for_base_model(base_model, storage, dtype=placement.dtype,
                                           device=placement.device, threads=threads, **common)
        log.info("chat engine for %s ready in %.1f s (%s)", base_model,
                 time.monotonic() - started, placement)
        return cls(chosen, storage, max_full_models=max_full_models)

    def load_adapter(self, adapter_id: str) -> None:
        """Fetch an adapter (or a full fine-tune) from storage, check it and make it usable
        (blocking)."""
        started = time.monotonic()
        path = fetch_adapter(self.storage, adapter_id, self.cache_dir)
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        if manifest.get("full_finetune"):
            self._load_full_model(adapter_id, path, manifest)
        else:
            self.engine.load_adapter(adapter_id, path)
        log.info("adapter %s loaded in %.0f ms", adapter_id, (time.monotonic() - started) * 1e3)

    def _load_full_model(self, adapter_id: str, path: Path, manifest: dict[str, Any]) -> None:
        from training.model import registry

        base = self.engine
        if not isinstance(base, Engine):
            raise AdapterIncompatible(
                f"The model {adapter_id!r} is a full fine-tune; this deployment's engine "
                f"({type(base).__name__}) serves LoRA adapters only. Serve it with "
                "TUNESERVE_CHAT_ENGINE=native, or train a LoRA adapter.")
        check_manifest(manifest, base_model=base.base_model, fingerprint=base.fingerprint)
        with self._full_lock:
            if adapter_id in self.full_models:
                self.full_models.move_to_end(adapter_id)
                return
        model = registry.load_model(path, dtype=next(base.model.parameters()).dtype)
        engine = Engine(model.to(base.device), base.tokenizer, base_model=base.base_model,
                        fingerprint=base.fingerprint, eot_ids=base.eot_ids,
                        max_batch=base.max_batch, max_pending=base.max_pending,
                        default_max_tokens=base.default_max_tokens, threads=base.threads,
                        device=str(base.device))
        with self._full_lock:
            if adapter_id in self.full_models:  # a concurrent load of the same model won
                _close_when_idle(engine)
                return
            self.full_models[adapter_id] = engine
            while len(self.full_models) > self.max_full_models:
                evicted, old = self.full_models.popitem(last=False)
                log.info("unloading full fine-tune %s (at most %d per replica)", evicted,
                         self.max_full_models)
                _close_when_idle(old)

    def unload_adapter(self, adapter_id: str) -> bool:
        """Drop an adapter or full fine-tune; False if this server did not hold it."""
        with self._full_lock:
            full = self.full_models.pop(adapter_id, None)
        if full is not None:
            _close_when_idle(full)
        held = full is not None or self.engine.remove_adapter(adapter_id)
        shutil.rmtree(self.cache_dir / adapter_id, ignore_errors=True)
        return held

    @property
    def loaded(self) -> list[str]:
        """The adapters and full fine-tunes this server holds."""
        with self._full_lock:
            return self.engine.adapters + list(self.full_models)

    def _submit(self, prompt: list[int], params: SamplingParams, call: ChatCall) -> Generation:
        with self._full_lock:  # held while queueing, so an unloaded full model takes no more
            full = self.full_models.get(call.adapter_id) if call.adapter_id else None
            if full is not None:
                self.full_models.move_to_end(call.adapter_id)
                return full.submit(prompt, params, None, n=call.n)
        return self.engine.submit(prompt, params, call.adapter_id, n=call.n)

    def start(self, call: ChatCall) -> Generation:
        """Render the conversation (and tools) with the training template and queue it (from
        the loop that will read the result)."""
        from training.model.chat import ExampleError, render_prompt, tool_calls_text

        messages = [{"role": m["role"], "content": m["content"] or tool_calls_text(m["tool_calls"])}
                    if m.get("tool_calls") else m for m in call.messages]
        try:
            prompt = render_prompt(self.engine.tokenizer, messages,
                                   call.tools if call.calls_tools else None)
        except ExampleError as exc:
            raise InvalidRequest(str(exc), param="messages") from exc
        vocab = self.engine.vocab_size
        if any(token >= vocab for token, _ in call.logit_bias):
            raise InvalidRequest(f"logit_bias names a token id beyond this model's vocabulary "
                                 f"(ids 0 to {vocab - 1}).", param="logit_bias")
        params = SamplingParams(max_tokens=call.max_tokens, temperature=call.temperature,
                                top_p=call.top_p, seed=call.seed, stop=tuple(call.stop),
                                logprobs=call.logprobs, frequency_penalty=call.frequency_penalty,
                                presence_penalty=call.presence_penalty,
                                logit_bias=call.logit_bias, grammar=grammar_of(call))
        return self._submit(prompt, params, call)

    def close(self) -> None:
        with self._full_lock:
            full, self.full_models = list(self.full_models.values()), OrderedDict()
        for engine in [self.engine, *full]:
            engine.close()
        shutil.rmtree(self.cache_dir, ignore_errors=True)


def _close_when_idle(engine: Engine) -> None:
    """Close an engine no call can reach any more once the calls it runs have ended (closing
    cuts them), on a thread of its own."""
    def close() -> None:
        while engine.load != (0, 0):
            time.sleep(0.5)
        engine.close()
    threading.Thread(target=close, name="close-full-model", daemon=True).start()


def grammar_of(call: ChatCall) -> str | None:
    """The grammar the answer must follow: ``response_format``'s, or a tool call's when the
    call must call a tool (``tool_choice`` ``required`` or a named function)."""
    from training.model.chat import tool_calls_schema

    if call.calls_tools and call.tool_choice != "auto":
        name = call.tool_choice["function"]["name"] if isinstance(call.tool_choice, dict) \
            else None
        return json_schema_grammar(tool_calls_schema(call.tools or [], name,
                                                     parallel=call.parallel_tool_calls),
                                   param="tools")
    fmt = call.response_format
    if fmt is None or fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return json_object_grammar()
    return json_schema_grammar(fmt["schema"])


async def outputs(generation: Generation, call: ChatCall) -> AsyncIterator[ChatOutput]:
    """The pieces of all choices as they come; token counts are the request's so far.

    When the answer may be tool calls, each choice's text is held until it ends and then sent
    as one piece: as tool calls if it reads as them, else as text.
    """
    done_tokens = 0  # completion tokens of the choices that have ended
    held: dict[int, list[Chunk]] = {}
    async for chunk in generation:
        if chunk.finish_reason is not None:
            done_tokens += chunk.completion_tokens
        piece = ChatOutput(chunk.text, chunk.finish_reason, generation.prompt_tokens,
                           done_tokens, index=chunk.index,
                           logprobs=None if chunk.logprobs is None else tuple(chunk.logprobs))
        if not call.calls_tools:
            yield piece
            continue
        held.setdefault(chunk.index, []).append(chunk)
        if chunk.finish_reason is not None:
            yield _as_tool_calls(piece, held.pop(chunk.index), call)


def _as_tool_calls(last: ChatOutput, chunks: list[Chunk], call: ChatCall) -> ChatOutput:
    from training.model.chat import parse_tool_calls

    text = "".join(c.text for c in chunks)
    logprobs = None if last.logprobs is None else \
        tuple(e for c in chunks for e in (c.logprobs or ()))
    calls = parse_tool_calls(text, call.tools or []) if last.finish_reason == "stop" else None
    if not calls:
        return replace(last, text=text, logprobs=logprobs)
    if not call.parallel_tool_calls:
        calls = calls[:1]
    return replace(last, text="", logprobs=logprobs, finish_reason="tool_calls", tool_calls=tuple(
        {"id": f"call_{secrets.token_hex(12)}", "type": "function", "function": c}
        for c in calls))


async def collect(generation: Generation, call: ChatCall) -> ChatOutput:
    """The whole answer: every choice, each as one ``ChatOutput``."""
    parts: dict[int, list[ChatOutput]] = {}
    last = None
    async for last in outputs(generation, call):
        parts.setdefault(last.index, []).append(last)
    assert last is not None
    choices = tuple(_joined(parts[i]) for i in sorted(parts))
    return replace(choices[0], prompt_tokens=last.prompt_tokens,
                   completion_tokens=last.completion_tokens, choices=choices)


def _joined(pieces: list[ChatOutput]) -> ChatOutput:
    end = pieces[-1]
    assert end.finish_reason is not None
    logprobs = None if end.logprobs is None else \
        tuple(e for p in pieces for e in (p.logprobs or ()))
    return replace(end, text="".join(p.text for p in pieces), logprobs=logprobs)
