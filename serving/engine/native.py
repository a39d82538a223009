"""A generation engine for one base model: continuous batching over a KV cache, mixed adapters.

One background thread owns the model. Each turn of its loop admits waiting requests (a batch-1
prefill each, so a new request's first token does not wait for a batch to drain), merges their
KV caches into the running batch (left-padded), and decodes one token for every running row in
one forward pass. Rows are kept sorted by adapter slot so that ``LoraLinear`` applies each
adapter to a contiguous slice of the batch. Finished or cancelled rows leave the batch at once,
freeing their place for the next waiting request.

Requests reach the engine through ``submit``, which returns a ``Generation``
(``serving.engine.generation``): a stream of ``Chunk``s that can be read from plain threads or
from an asyncio event loop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from service.core import limits
from service.core.errors import InvalidRequest, RateLimited
from serving.adapters import LoadedAdapter, read_adapter
from serving.engine import packed_linear
from serving.engine.batch import Row, RunningBatch, left_pad, segments_of
from serving.engine.generation import END, Chunk, FinishReason, Generation
from serving.engine.grammar import Grammars
from serving.engine.lora import MixedPlan, attach_lora, drop_factors, set_factors
from serving.engine.prefix_cache import LayerKV, PrefixCache
from serving.engine.sampling import (
    IncrementalText,
    SamplingParams,
    StopText,
    TokenBytes,
    adjust_logits,
    logprob_entry,
    make_generator,
    sample_token,
)

log = logging.getLogger(__name__)
__all__ = ["AdapterNotLoaded", "Chunk", "Engine", "Generation", "pick_dtype"]


class AdapterNotLoaded(KeyError):
    """``submit`` named an adapter that is not (or no longer) loaded in this engine."""


@dataclass
class _Slot:
    slot: int
    users: int = 0
    retired: bool = False


class Engine:
    """Generates for one base model with any number of loaded adapters at once."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, base_model: str,
                 fingerprint: Mapping[str, str], eot_ids: Iterable[int], max_batch: int = 16,
                 max_pending: int = 64, default_max_tokens: int = limits.MAX_TOKENS,
                 threads: int | None = None,
                 prefix_cache_tokens: int = 4096, device: str = "cpu"):
        self.model = model.eval()
        self.device = torch.device(device)
        """Where the model, adapters and KV cache live (``serving.device.pick_device``)."""
        self.threads = threads
        """Intra-op threads of the generation thread; None keeps torch's default."""
        self.tokenizer = tokenizer
        self.base_model = base_model
        self.fingerprint = dict(fingerprint)
        eot_ids = list(eot_ids)
        self.eot_ids = frozenset(eot_ids)
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.default_max_tokens = default_max_tokens
        self.max_context = int(model.config.max_position_embeddings)
        self.lora, self.modules = attach_lora(model)
        # A cached prefix goes in front of a prompt in plain cache layers only (a sliding-window
        # layer keeps just the window, which a prefix may not fit).
        plain = all(type(layer) is DynamicLayer
                    for layer in DynamicCache(config=model.config).layers)
        self.prefixes = PrefixCache(prefix_cache_tokens if plain else 0)
        """KV of recent prompts per adapter; 4,096 tokens are 190 MB for SmolLM2-135M in fp32."""
        use_vocab_head(model)
        self.token_bytes = TokenBytes(tokenizer)
        self.grammars = Grammars(tokenizer, next(iter(eot_ids)))
        self._lock = threading.Condition()
        self._waiting: deque[Row] = deque()
        self._batch = RunningBatch()  # touched by the generation thread only
        self._plan_key: list[int] = []
        self._in_flight = 0
        """Requests submitted and not finished (guarded by ``_lock``)."""
        self._adapters: dict[str, _Slot] = {}
        self._next_slot = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    @classmethod
    def for_base_model(cls, base_model: str, storage: Any = None, *,
                       overrides: dict[str, str] | None = None, dtype: str = "auto",
                       device: str = "cpu", **kwargs: Any) -> Engine:
        """Load ``base_model`` with the same loader and chat template as training."""
        from training.model import chat, registry

        path = registry.resolve_model(base_model, storage, overrides)
        tokenizer = registry.load_tokenizer(path)
        model = registry.load_model(path, dtype=getattr(torch, pick_dtype(dtype))).to(device)
        return cls(model, tokenizer, base_model=base_model,
                   fingerprint=registry.model_fingerprint(path),
                   eot_ids=chat.end_of_turn_ids(tokenizer), device=device, **kwargs)

    # -- adapters -------------------------------------------------------------------------

    def load_adapter(self, adapter_id: str, path: Path) -> None:
        """Check the adapter folder at ``path`` against this base model and make it usable."""
        self.add_adapter(read_adapter(path, adapter_id, self.modules, base_model=self.base_model,
                                      fingerprint=self.fingerprint))

    def add_adapter(self, adapter: LoadedAdapter) -> None:
        with self._lock:
            known = self._adapters.get(adapter.adapter_id)
            if known is not None:  # adapters are immutable: reuse the slot
                known.retired = False
                return
            slot, self._next_slot = self._next_slot, self._next_slot + 1
            # A new slot is in no running segment yet, so the loop thread never sees it half set.
            factors = adapter.factors if self.device.type == "cpu" else {
                path: (a.to(self.device), b.to(self.device))
                for path, (a, b) in adapter.factors.items()}
            set_factors(self.lora, self.modules, slot, factors)
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
        drop_factors(self.lora, self.modules, slot)
        self.prefixes.forget(slot)

    # -- requests -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def healthy(self) -> bool:
        """False once the generation thread has stopped (closed, or died)."""
        return self._thread is None or self._thread.is_alive()

    @property
    def load(self) -> tuple[int, int]:
        """(running rows, waiting requests)."""
        with self._lock:
            return self._in_flight - len(self._waiting), len(self._waiting)

    def submit(self, prompt: list[int], params: SamplingParams,
               adapter_id: str | None = None, n: int = 1) -> Generation:
        """Queue a request (from the event loop that will read the ``Generation``, if any).

        ``n`` choices are ``n`` rows admitted together: one prefill of the prompt, then decoded
        in the same batch. With a seed, choice ``i`` samples with ``seed + i``.

        Raises:
            InvalidRequest: the prompt (plus ``params.max_tokens``) does not fit the context,
                or ``params.grammar`` cannot be compiled.
            RateLimited: ``max_pending`` requests are already running or waiting.
            AdapterNotLoaded: ``adapter_id`` is not loaded.
        """
        budget = self._token_budget(len(prompt), params.max_tokens)
        matchers = [None] * n if params.grammar is None else \
            [self.grammars.matcher(params.grammar) for _ in range(n)]
        generation = Generation(prompt_tokens=len(prompt), choices=n)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            # Counted from submit to finish: rows being prefilled are in neither the queue nor
            # the batch for a moment.
            if self._in_flight + n > self.max_pending:
                raise at_capacity(self.base_model, self.max_pending)
            slot = -1
            if adapter_id is not None:
                known = self._adapters.get(adapter_id)
                if known is None or known.retired:
                    raise AdapterNotLoaded(adapter_id)
                known.users += n
                slot = known.slot
            for i, matcher in enumerate(matchers):
                seed = None if params.seed is None else params.seed + i
                self._waiting.append(Row(generation, list(prompt), params, adapter_id, slot,
                                          budget, make_generator(seed), StopText(params.stop),
                                          IncrementalText(self.tokenizer), index=i,
                                          matcher=matcher))
            self._in_flight += n
            self._start_thread()
            self._lock.notify()
        return generation

    def _token_budget(self, prompt_len: int, max_tokens: int | None) -> int:
        return token_budget(prompt_len, max_tokens, self.max_context, self.default_max_tokens)

    def generate(self, prompt: list[int], params: SamplingParams,
                 adapter_id: str | None = None) -> Chunk:
        """Blocking convenience: the whole answer (one choice) as one ``Chunk``."""
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
        if self.threads:
            torch.set_num_threads(self.threads)  # per thread: set it where the work runs
        # On a GPU every tensor the loop makes (inputs, masks, LoRA plans) is made there;
        # sampling goes back to the CPU (``_sample_and_accept``).
        on_device = contextlib.nullcontext() if self.device.type == "cpu" else self.device
        with torch.inference_mode(), on_device:
            while True:
                with self._lock:
                    while not self._closed and not self._waiting and not self._batch:
                        self._lock.wait()
                    if self._closed:
                        break
                    admitted = [self._waiting.popleft() for _ in
                                range(min(len(self._waiting), self.max_batch - len(self._batch)))]
                try:
                    if admitted:
                        self._prefill(admitted)
                    if self._batch:
                        self._decode_step()
                except Exception as exc:  # a bug or OOM: fail the batch, keep serving
                    log.exception("generation step failed")
                    for row in self._batch.rows + admitted:
                        self._finish(row, None, error=exc)
                    self._batch.clear()

    def _prefill(self, rows: list[Row]) -> None:
        """Run the new requests' prompts in one forward pass, join the batch.

        A row whose prompt starts like a recent one of its adapter (``PrefixCache``) feeds only
        the rest; the cached keys and values stand in front of it. Each row's cache is then
        [padding, cached prefix, padding, computed rest], the padding masked out."""
        for row in rows:
            if row.generation.cancelled:
                self._finish(row, None)
        rows = sorted((r for r in rows if not r.done), key=lambda r: r.slot)
        if not rows:
            return
        # Rows with the same prompt and adapter (a request's n choices) are computed once.
        firsts: dict[tuple, int] = {}
        source = [firsts.setdefault((r.slot, tuple(r.prompt)), len(firsts)) for r in rows]
        every = rows
        rows = [rows[source.index(k)] for k in range(len(firsts))]
        matches = [self.prefixes.match(r.slot, r.prompt) for r in rows]
        reused = [n for n, _ in matches]
        past = max(reused)
        width = max(len(r.prompt) - n for r, n in zip(rows, reused))
        ids, mask = [], []
        for row, n in zip(rows, reused):
            pad = width - (len(row.prompt) - n)
            ids.append([0] * pad + row.prompt[n:])
            mask.append([0] * (past - n) + [1] * n + [0] * pad + [1] * (len(row.prompt) - n))
        mask_t = torch.tensor(mask)
        self._plan_adapters(rows)
        cache = DynamicCache(config=self.model.config)
        if past:
            _fill_cache(cache, [kv for _, kv in matches], past)
        out = self.model(input_ids=torch.tensor(ids),
                         attention_mask=None if bool(mask_t.all()) else mask_t,
                         position_ids=(mask_t.cumsum(dim=1) - 1).clamp(min=0)[:, past:],
                         cache=cache, use_cache=True, logits_to_keep=1)
        for i, row in enumerate(rows):
            self.prefixes.store(row.slot, row.prompt, lambda i=i: _row_kv(cache, mask_t, i))
        logits = out.logits[:, -1]
        if len(every) > len(rows):
            index = torch.tensor(source)
            cache.batch_select_indices(index)
            mask_t, logits = mask_t[index], logits[index]
        self._batch.join(every, cache, mask_t)
        for row in every:
            row.pos = len(row.prompt)
        self._sample_and_accept(every, logits)
        self._batch.drop_finished()

    def _decode_step(self) -> None:
        for row in self._batch.rows:
            if row.generation.cancelled:
                self._finish(row, None)
        self._batch.drop_finished()
        if not self._batch:
            return
        self._plan_adapters(self._batch.rows)
        out = self.model(**self._batch.step_inputs(), use_cache=True, logits_to_keep=1)
        for row in self._batch.rows:
            row.pos += 1
        self._sample_and_accept(self._batch.rows, out.logits[:, -1])
        self._batch.drop_finished()

    def _sample_and_accept(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Pick each row's next token from its logits [B, V] and record it."""
        if all(row.params.plain for row in rows):
            if all(row.params.temperature <= 0 for row in rows):
                # All greedy: one argmax and one sync for the batch instead of one per row.
                tokens = logits.argmax(dim=-1).tolist()
            else:
                logits = logits.float().cpu()  # the rows' generators are CPU generators
                tokens = [sample_token(logits[i], r.params, r.generator)
                          for i, r in enumerate(rows)]
            for row, token in zip(rows, tokens, strict=True):
                self._accept(row, token)
            return
        if self.device.type != "cpu":
            # Seeded generators, the grammar's bitmask and the penalties work on the CPU.
            with torch.device("cpu"):
                return self._sample_processed(rows, logits.float().cpu())
        self._sample_processed(rows, logits.float())  # a copy: processed in place

    def _sample_processed(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Penalties, bias, grammar and log-probs on the CPU logits [B, V] (fp32)."""
        for i, row in enumerate(rows):
            adjust_logits(logits[i], row.params, row.tokens)
        constrained = [(i, row.matcher) for i, row in enumerate(rows) if row.matcher is not None]
        if constrained:
            self.grammars.mask(logits, constrained)
        for i, row in enumerate(rows):
            token = sample_token(logits[i], row.params, row.generator)
            entry = None
            if row.params.logprobs is not None:
                entry = logprob_entry(torch.log_softmax(logits[i], dim=-1), token,
                                      row.params.logprobs, self.token_bytes)
            self._accept(row, token, entry)

    def _plan_adapters(self, rows: list[Row]) -> None:
        """Segments for rows (sorted by slot) with at most one adapter, else a mixed plan."""
        row_slots = [row.slot for row in rows]
        if len({s for s in row_slots if s >= 0}) <= 1:
            self.lora.segments, self.lora.mixed = segments_of(row_slots), None
        elif self.lora.mixed is None or self._plan_key != row_slots:
            self.lora.mixed = MixedPlan.build(row_slots, self.lora.ranks)
            self._plan_key = row_slots

    def _accept(self, row: Row, token: int, entry: dict | None = None) -> None:
        """Record a sampled token and send whatever text it settles."""
        if row.matcher is not None:
            row.matcher.consume_token(token)
        if token in self.eot_ids and not row.params.ignore_eot:
            self._finish(row, "stop", completion_tokens=len(row.tokens) + 1)
            return
        row.tokens.append(token)
        if entry is not None:
            row.logprobs.append(entry)
        delta = row.stop.update(row.text.update(row.tokens))
        if row.stop.stopped:
            self._finish(row, "stop", delta)
        elif len(row.tokens) >= row.max_tokens or row.pos + 1 >= self.max_context:
            self._finish(row, "length", delta)
        elif delta:
            row.generation._put(Chunk(delta, index=row.index, logprobs=self._sent_logprobs(row)))

    @staticmethod
    def _sent_logprobs(row: Row) -> list[dict] | None:
        if row.params.logprobs is None:
            return None
        entries, row.logprobs = row.logprobs, []
        return entries

    def _finish(self, row: Row, reason: FinishReason | None, delta: str = "", *,
                completion_tokens: int | None = None, error: BaseException | None = None) -> None:
        if row.done:
            return
        row.done = True
        with self._lock:  # before the last chunk: a reader sees the slot and adapter freed
            self._in_flight -= 1
            known = self._adapters.get(row.adapter_id) if row.adapter_id else None
            if known is not None:
                known.users -= 1
                if known.retired and known.users == 0:
                    self._drop_slot(row.adapter_id)
        if error is not None:
            row.generation._put(error)
        elif reason is not None:
            if not row.stop.stopped:  # flush text held back for a stop string that never came
                delta += row.stop.update(row.text.update(row.tokens, final=True), final=True)
            row.generation._put(Chunk(delta, reason, len(row.prompt),
                                      completion_tokens or len(row.tokens), index=row.index,
                                      logprobs=self._sent_logprobs(row)))
        row.generation._put(END)


def at_capacity(base_model: str, max_pending: int) -> RateLimited:
    """The 429 of a replica with ``max_pending`` requests already in flight (either engine)."""
    return RateLimited(f"The {base_model} deployment is at capacity ({max_pending} requests "
                       "in flight); retry shortly.", retry_after=1, code="capacity_exceeded")


def token_budget(prompt_len: int, max_tokens: int | None, max_context: int,
                 default_max_tokens: int) -> int:
    """Completion tokens a request may take; ``InvalidRequest`` when it cannot fit."""
    if prompt_len == 0:
        raise InvalidRequest("The prompt is empty.", param="messages")
    room = max_context - prompt_len
    if room <= 0:
        raise InvalidRequest(
            f"The messages are {prompt_len} tokens long; this model's context is "
            f"{max_context} tokens. Shorten the conversation.",
            param="messages", code="context_length_exceeded")
    if max_tokens is None:
        return min(default_max_tokens, room)
    if max_tokens > room:
        raise InvalidRequest(
            f"max_tokens is {max_tokens}, but the messages take {prompt_len} of this model's "
            f"{max_context} context tokens, leaving {room}. Lower max_tokens.",
            param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _fill_cache(cache: DynamicCache, prefixes: list[list[LayerKV] | None], length: int) -> None:
    """Put each row's cached prefix (or nothing) into ``cache``, left-padded to ``length``."""
    sample = next(kv for kv in prefixes if kv is not None)
    for layer, (keys, _) in enumerate(sample):
        shape = (1, keys.shape[1], length, keys.shape[3])
        parts = [(torch.zeros(shape, dtype=keys.dtype), torch.zeros(shape, dtype=keys.dtype))
                 if kv is None else kv[layer] for kv in prefixes]
        cache.update(torch.cat([left_pad(k, length) for k, _ in parts]),
                     torch.cat([left_pad(v, length) for _, v in parts]), layer)


def _row_kv(cache: DynamicCache, mask: torch.Tensor, row: int) -> list[LayerKV]:
    """Row ``row``'s prompt KV out of a prefill's cache: its unmasked columns, copied."""
    columns = mask[row].nonzero().squeeze(1)
    return [(layer.keys[row:row + 1].index_select(2, columns),
             layer.values[row:row + 1].index_select(2, columns)) for layer in cache.layers]


class VocabHead(nn.Module):
    """The output projection (no bias), computed the fastest way we measured on CPU.

    bf16 on a CPU with native bf16: a ``packed_linear`` copy of the weight (7.3 → 2.6 ms for
    SmolLM2's 49k × 576 head at 8 rows; the plain weight stays, tied to the embeddings). fp32:
    ``W xᵀ`` rather than ``x Wᵀ``, the same product in the other operand order, for which MKL's
    GEMM is 1.8-3× faster at the few rows of a decode step (2 threads: 28 → 15 ms at 8 rows,
    27 → 9 ms at 4; equal at 1 row). Other cases keep ``F.linear``.
    """

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.weight = head.weight  # shared, so tied embeddings stay tied
        self.packed = packed_linear.pack(head.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dtype == torch.bfloat16:
            return packed_linear.linear(x, self.packed)
        if x.dtype != torch.float32 or self.weight.dtype != torch.float32:
            return nn.functional.linear(x, self.weight)
        flat = x.reshape(-1, x.shape[-1])
        return torch.mm(self.weight, flat.t()).t().unflatten(0, x.shape[:-1])


def use_vocab_head(model: nn.Module) -> None:
    """Swap the model's bias-free ``lm_head`` Linear (if it has one) for a ``VocabHead``."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear) and head.bias is None:
        model.lm_head = VocabHead(head)


def pick_dtype(dtype: str) -> str:
    """``auto``: bf16 where the CPU has native bf16 matmuls (AMX, AVX512-bf16), else fp32."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if packed_linear.native_bf16() else "float32"
