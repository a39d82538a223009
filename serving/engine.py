"""A generation engine for one base model: continuous batching over a KV cache, mixed adapters.

One background thread owns the model. Each turn of its loop admits waiting requests (a batch-1
prefill each, so a new request's first token does not wait for a batch to drain), merges their
KV caches into the running batch (left-padded), and decodes one token for every running row in
one forward pass. Rows are kept sorted by adapter slot so that ``LoraLinear`` applies each
adapter to a contiguous slice of the batch. Finished or cancelled rows leave the batch at once,
freeing their place for the next waiting request.

Requests reach the engine through ``submit``, which returns a ``Generation``: a stream of
``Chunk``s that can be read from plain threads or from an asyncio event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache

from service.errors import InvalidRequest, RateLimited
from serving.adapters import DEFAULT_MAX_RANK, LoadedAdapter, read_adapter
from serving.lora import Segment, attach_lora
from serving.sampling import SamplingParams, StopText, make_generator, sample_token

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
_END = object()


class AdapterNotLoaded(KeyError):
    """``submit`` named an adapter that is not (or no longer) loaded in this engine."""


@dataclass
class Chunk:
    """A piece of an answer; the last one of a request carries ``finish_reason`` and usage."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Generation:
    """The stream of one request's ``Chunk``s. Iterate it (sync or async) or ``cancel`` it."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
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
        while (item := self._queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            while (item := await self._async_queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()  # a consumer that stops listening frees the row (no-op when done)


@dataclass(eq=False)
class _Row:
    generation: Generation
    prompt: list[int]
    params: SamplingParams
    adapter_id: str | None
    slot: int
    """Adapter slot, -1 for the bare base model; rows are sorted by it."""
    max_tokens: int
    generator: torch.Generator
    stop: StopText
    tokens: list[int] = field(default_factory=list)
    pos: int = 0
    """Position of the newest token, the one the next decode step feeds."""
    done: bool = False


@dataclass
class _Slot:
    slot: int
    users: int = 0
    retired: bool = False


class Engine:
    """Generates for one base model with any number of loaded adapters at once."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, base_model: str,
                 fingerprint: Mapping[str, str], eot_ids: Iterable[int], max_batch: int = 16,
                 max_pending: int = 64, default_max_tokens: int = 2048,
                 max_rank: int = DEFAULT_MAX_RANK):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_model = base_model
        self.fingerprint = dict(fingerprint)
        self.eot_ids = frozenset(eot_ids)
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.default_max_tokens = default_max_tokens
        self.max_rank = max_rank
        self.max_context = int(model.config.max_position_embeddings)
        self.batch, self.modules = attach_lora(model)
        self._lock = threading.Condition()
        self._waiting: deque[_Row] = deque()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, L] 1 = real token, 0 = left padding
        self._adapters: dict[str, _Slot] = {}
        self._next_slot = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    @classmethod
    def for_base_model(cls, base_model: str, storage: Any = None, *,
                       overrides: dict[str, str] | None = None, dtype: str = "auto",
                       **kwargs: Any) -> Engine:
        """Load ``base_model`` with the same loader and chat template as training."""
        from training import chat, models

        path = models.resolve_model(base_model, storage, overrides)
        tokenizer = models.load_tokenizer(path)
        model = models.load_model(path, dtype=getattr(torch, pick_dtype(dtype)))
        return cls(model, tokenizer, base_model=base_model,
                   fingerprint=models.model_fingerprint(path),
                   eot_ids=chat.end_of_turn_ids(tokenizer), **kwargs)

    # -- adapters -------------------------------------------------------------------------

    def load_adapter(self, adapter_id: str, path: Path) -> None:
        """Check the adapter folder at ``path`` against this base model and make it usable."""
        self.add_adapter(read_adapter(path, adapter_id, self.modules, base_model=self.base_model,
                                      fingerprint=self.fingerprint, max_rank=self.max_rank))

    def add_adapter(self, adapter: LoadedAdapter) -> None:
        with self._lock:
            known = self._adapters.get(adapter.adapter_id)
            if known is not None:  # adapters are immutable: reuse the slot
                known.retired = False
                return
            slot, self._next_slot = self._next_slot, self._next_slot + 1
            # A new slot is in no running segment yet, so the loop thread never sees it half set.
            for path, factors in adapter.factors.items():
                self.modules[path].factors[slot] = factors
            self._adapters[adapter.adapter_id] = _Slot(slot)

    def remove_adapter(self, adapter_id: str) -> bool:
        """Unload an adapter; requests already using it finish first."""
        with self._lock:
            known = self._adapters.get(adapter_id)
            if known is None:
                return False
            known.retired = True
            if known.users == 0:
                self._drop_slot(adapter_id)
            return True

    @property
    def adapters(self) -> list[str]:
        with self._lock:
            return [a for a, s in self._adapters.items() if not s.retired]

    def _drop_slot(self, adapter_id: str) -> None:
        slot = self._adapters.pop(adapter_id).slot
        for module in self.modules.values():
            module.factors.pop(slot, None)

    # -- requests -------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False once the generation thread has stopped (closed, or died)."""
        return self._thread is None or self._thread.is_alive()

    @property
    def load(self) -> tuple[int, int]:
        """(running rows, waiting requests)."""
        with self._lock:
            return len(self._rows), len(self._waiting)

    def submit(self, prompt: list[int], params: SamplingParams,
               adapter_id: str | None = None) -> Generation:
        """Queue a request (from the event loop that will read the ``Generation``, if any).

        Raises:
            InvalidRequest: the prompt (plus ``params.max_tokens``) does not fit the context.
            RateLimited: ``max_pending`` requests are already running or waiting.
            AdapterNotLoaded: ``adapter_id`` is not loaded.
        """
        budget = self._token_budget(len(prompt), params.max_tokens)
        generation = Generation(prompt_tokens=len(prompt))
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._rows) + len(self._waiting) >= self.max_pending:
                raise RateLimited(f"The {self.base_model} deployment is at capacity "
                                  f"({self.max_pending} requests in flight); retry shortly.",
                                  retry_after=1, code="capacity_exceeded")
            slot = -1
            if adapter_id is not None:
                known = self._adapters.get(adapter_id)
                if known is None or known.retired:
                    raise AdapterNotLoaded(adapter_id)
                known.users += 1
                slot = known.slot
            self._waiting.append(_Row(generation, list(prompt), params, adapter_id, slot,
                                      budget, make_generator(params.seed), StopText(params.stop)))
            self._start_thread()
            self._lock.notify()
        return generation

    def _token_budget(self, prompt_len: int, max_tokens: int | None) -> int:
        if prompt_len == 0:
            raise InvalidRequest("The prompt is empty.", param="messages")
        room = self.max_context - prompt_len
        if room <= 0:
            raise InvalidRequest(
                f"The messages are {prompt_len} tokens long; this model's context is "
                f"{self.max_context} tokens. Shorten the conversation.",
                param="messages", code="context_length_exceeded")
        if max_tokens is None:
            return min(self.default_max_tokens, room)
        if max_tokens > room:
            raise InvalidRequest(
                f"max_tokens is {max_tokens}, but the messages take {prompt_len} of this model's "
                f"{self.max_context} context tokens, leaving {room}. Lower max_tokens.",
                param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def generate(self, prompt: list[int], params: SamplingParams,
                 adapter_id: str | None = None) -> Chunk:
        """Blocking convenience: the whole answer as one ``Chunk``."""
        chunks = list(self.submit(prompt, params, adapter_id))
        last = chunks[-1]
        return Chunk("".join(c.text for c in chunks), last.finish_reason, last.prompt_tokens,
                     last.completion_tokens)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- the loop -------------------------------------------------------------------------

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"engine-{self.base_model}",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._closed and not self._waiting and not self._rows:
                        self._lock.wait()
                    if self._closed:
                        break
                    admitted = [self._waiting.popleft() for _ in
                                range(min(len(self._waiting), self.max_batch - len(self._rows)))]
                try:
                    for row in admitted:
                        self._prefill(row)
                    if self._rows:
                        self._decode_step()
                except Exception as exc:  # a bug or OOM: fail the batch, keep serving
                    log.exception("generation step failed")
                    for row in self._rows + [r for r in admitted if r not in self._rows]:
                        self._finish(row, None, error=exc)
                    self._rows, self._cache, self._mask = [], None, None

    def _prefill(self, row: _Row) -> None:
        if row.generation.cancelled:
            self._finish(row, None)
            return
        cache = DynamicCache(config=self.model.config)
        self.batch.segments = [(row.slot, 0, 1)] if row.slot >= 0 else []
        out = self.model(input_ids=torch.tensor([row.prompt]), cache=cache, use_cache=True,
                         logits_to_keep=1)
        row.pos = len(row.prompt)
        self._join_batch(row, cache)
        self._accept(row, sample_token(out.logits[0, -1], row.params, row.generator))
        self._drop_finished()

    def _decode_step(self) -> None:
        rows = self._rows
        for row in rows:
            if row.generation.cancelled:
                self._finish(row, None)
        self._drop_finished()
        rows = self._rows
        if not rows:
            return
        assert self._mask is not None
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        padded = not bool(self._mask.all())
        self.batch.segments = _segments(rows)
        out = self.model(input_ids=torch.tensor([[r.tokens[-1]] for r in rows]),
                         position_ids=torch.tensor([[r.pos] for r in rows]),
                         attention_mask=self._mask if padded else None,
                         cache=self._cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        for i, row in enumerate(rows):
            row.pos += 1
            self._accept(row, sample_token(logits[i], row.params, row.generator))
        self._drop_finished()

    def _accept(self, row: _Row, token: int) -> None:
        """Record a sampled token and send whatever text it settles."""
        if token in self.eot_ids and not row.params.ignore_eot:
            self._finish(row, "stop", completion_tokens=len(row.tokens) + 1)
            return
        row.tokens.append(token)
        delta = row.stop.update(self.tokenizer.decode(row.tokens, skip_special_tokens=True))
        if row.stop.stopped:
            self._finish(row, "stop", delta)
        elif len(row.tokens) >= row.max_tokens or row.pos + 1 >= self.max_context:
            self._finish(row, "length", delta)
        elif delta:
            row.generation._put(Chunk(delta))

    def _finish(self, row: _Row, reason: FinishReason | None, delta: str = "", *,
                completion_tokens: int | None = None, error: BaseException | None = None) -> None:
        if row.done:
            return
        row.done = True
        if row.adapter_id is not None:  # before the last chunk: a reader sees the slot freed
            with self._lock:
                known = self._adapters.get(row.adapter_id)
                if known is not None:
                    known.users -= 1
                    if known.retired and known.users == 0:
                        self._drop_slot(row.adapter_id)
        if error is not None:
            row.generation._put(error)
        elif reason is not None:
            if not row.stop.stopped:  # flush text held back for a stop string that never came
                delta += row.stop.update(self.tokenizer.decode(row.tokens,
                                                               skip_special_tokens=True),
                                         final=True)
            row.generation._put(Chunk(delta, reason, len(row.prompt),
                                      completion_tokens or len(row.tokens)))
        row.generation._put(_END)

    # -- the batch's KV cache ------------------------------------------------------------

    def _join_batch(self, row: _Row, cache: DynamicCache) -> None:
        """Append a prefilled row to the running batch, left-padding the shorter cache."""
        mask = torch.ones(1, len(row.prompt), dtype=torch.long)
        if not self._rows:
            self._rows, self._cache, self._mask = [row], cache, mask
            return
        assert self._cache is not None and self._mask is not None
        length = max(self._mask.shape[1], mask.shape[1])
        for big, small in zip(self._cache.layers, cache.layers, strict=True):
            big.keys = torch.cat([_left_pad(big.keys, length), _left_pad(small.keys, length)])
            big.values = torch.cat([_left_pad(big.values, length),
                                    _left_pad(small.values, length)])
        self._mask = torch.cat([_left_pad(self._mask, length), _left_pad(mask, length)])
        self._rows.append(row)
        order = sorted(range(len(self._rows)), key=lambda i: self._rows[i].slot)
        if order != list(range(len(self._rows))):
            self._select(order)

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.done]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        self._select(keep)
        # Columns that are padding for every remaining row are dead weight: cut them.
        assert self._mask is not None and self._cache is not None
        first = int(self._mask.any(dim=0).int().argmax())
        if first > 0:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    def _select(self, order: list[int]) -> None:
        assert self._cache is not None and self._mask is not None
        index = torch.tensor(order)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._rows = [self._rows[i] for i in order]


def pick_dtype(dtype: str) -> str:
    """``auto``: bf16 where the CPU has native bf16 matmuls (AMX, AVX512-bf16), else fp32."""
    if dtype != "auto":
        return dtype
    try:
        fast_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        fast_bf16 = False
    return "bfloat16" if fast_bf16 else "float32"


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pad dim -2 of a cache tensor [B, H, L, D] (or dim -1 of a mask [B, L]) on the left."""
    missing = length - (t.shape[-2] if t.dim() == 4 else t.shape[-1])
    if missing == 0:
        return t
    pad = (0, 0, missing, 0) if t.dim() == 4 else (missing, 0)
    return torch.nn.functional.pad(t, pad)


def _segments(rows: list[_Row]) -> list[Segment]:
    """Runs of rows sharing an adapter slot; rows on the bare base model need none."""
    segments: list[Segment] = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i].slot != rows[start].slot:
            if rows[start].slot >= 0:
                segments.append((rows[start].slot, start, i))
            start = i
    return segments
