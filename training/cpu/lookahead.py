"""The frozen lower decoder layers of the next step, run ahead on a thread of their own.

With LoRA on the last N decoder layers only (``lora.layers``), the layers below carry no
gradient, so their output for a batch depends on the batch alone, never on the training so far.
A CPU worker with two or more CPUs runs them for step n+1 on a thread of its own while step n's
forward runs on the other threads; the backward and the optimizer step then have every thread.

Why: a step of 4 sort examples is ~4,500 small ops, each split over the worker's OpenMP threads
and joined. Inside the service ~20 Ray and Serve processes wake ~2,000 times a second, and every
preemption of either thread stalls both at the next join. A forward on one thread beside the
frozen layers on the other is two streams that lose only the time taken from each, and the
frozen layers (two thirds of the forward here) leave the critical path. SmolLM2, 4 sort
examples, last 10 of 30 layers adapted, median step of 200-step jobs in the service: 0.360 s
against 0.411 s (``bench/results/quality.md``); a bare process: 0.309 against 0.330 s.

A row's shared prefix (``training.data.packing.shared_prefix_length``: the template's system prompt,
a fixed instruction) gives the frozen layers the same output in every step, so they compute it
once per prefix and keep it: its hidden state, and its keys and values in each layer
(``training.model.attention.PrefixKV``), which the rest of each later row attends to. For the sort
task the prefix is 32 of a row's ~230 tokens: the frozen layers' share of a step falls by as much.

The loss reads the last hidden state only where a label follows (a response's tokens: 90 of a
sort row's ~230), so the last layer runs its MLP, three quarters of its weights, only there
(``LastLayerAtLabels``); attention still runs at every position, whose keys the others need.

The split reuses the decoder's own ``forward``: a slice module shares every weight and runs some
of the layers; the upper slice takes the lower one's output as ``inputs_embeds``. That is exact
only for decoders whose forward does nothing to ``inputs_embeds`` before the first layer and
treats every layer alike (no per-layer attention types), hence ``SUPPORTED``.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from training.data import packing
from training.losses.cross_entropy import shifted_labels
from training.model.attention import PrefixKV
from training.model.chat import IGNORE_INDEX

SUPPORTED = ("LlamaModel",)
"""Decoder classes whose layers can be split as above (SmolLM2 and the tiny test model)."""

KEPT_PREFIXES = 16
"""Prefixes whose frozen layers' output is kept (the least recently used goes first)."""


def frozen_layers(decoder: torch.nn.Module) -> int:
    """How many decoder layers, from the bottom, have nothing to train (0 if any below does)."""
    if any(p.requires_grad for p in decoder.get_input_embeddings().parameters()):
        return 0
    for index, layer in enumerate(decoder.layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return len(decoder.layers)


def decoder_slice(decoder: torch.nn.Module, start: int, stop: int | None, *,
                  final_norm: bool) -> torch.nn.Module:
    """A module running ``decoder.layers[start:stop]`` with the decoder's own forward; it shares
    every weight with ``decoder`` (a shallow copy with its own table of submodules)."""
    part = copy.copy(decoder)
    part._modules = dict(decoder._modules)  # replacing layers below leaves the decoder alone
    part.layers = torch.nn.ModuleList(decoder.layers[start:stop])
    if not final_norm:
        part.norm = torch.nn.Identity()
    return part


class LastLayerAtLabels(torch.nn.Module):
    """A decoder's last layer (Llama's) that, given ``at_labels`` (B, T) bool, returns its output
    only there, (1, N, C): attention at every position, the MLP at those N alone."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, *, at_labels: torch.Tensor,
                **kwargs) -> torch.Tensor:
        layer = self.layer
        # LlamaDecoderLayer.forward, the rows cut after attention
        attended, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
        hidden = (hidden_states + attended)[at_labels][None]
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


class Lookahead:
    """Runs the frozen layers of a step's micro-batches ahead, on one thread."""

    def __init__(self, decoder: torch.nn.Module, n_frozen: int, use_bf16: bool, threads: int):
        self.lower = decoder_slice(decoder, 0, n_frozen, final_norm=False)
        self.upper = decoder_slice(decoder, n_frozen, None, final_norm=True)
        self.upper.layers[-1] = LastLayerAtLabels(self.upper.layers[-1])
        self.use_bf16 = use_bf16
        self.threads = threads
        # One torch thread: it shares the worker's CPUs with the training thread(s).
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="frozen-layers",
                                       initializer=torch.set_num_threads, initargs=(1,))
        self.pending: deque[tuple[list[packing.Example], list[dict], list[Future]]] = deque()
        # prefix token ids → (its output of the frozen layers, its keys and values in each)
        self.prefixes: OrderedDict[tuple[int, ...], tuple[torch.Tensor, PrefixKV]] = OrderedDict()

    @staticmethod
    def usable(decoder: torch.nn.Module, device: torch.device, cpus: int) -> int:
        """The number of frozen layers to run ahead, or 0 where looking ahead does not apply."""
        if device.type != "cpu" or cpus < 2 or type(decoder).__name__ not in SUPPORTED:
            return 0
        n = frozen_layers(decoder)
        return n if 0 < n < len(decoder.layers) else 0

    def submit(self, examples: list[packing.Example], micro: list[dict[str, torch.Tensor]]) -> None:
        """Start the frozen layers of ``examples`` (collated as ``micro``), after those already
        submitted."""
        self.pending.append((examples, micro, [self.pool.submit(self._lower, b) for b in micro]))

    def take(self, examples: list[packing.Example]
             ) -> tuple[list[dict[str, torch.Tensor]], list[Future]] | None:
        """The micro-batches of ``examples`` and their frozen layers' futures, if they were
        submitted (anything submitted before them is dropped); otherwise None."""
        for index, (submitted, micro, below) in enumerate(self.pending):
            if len(submitted) == len(examples) and all(
                    a is b for a, b in zip(submitted, examples, strict=True)):
                for _ in range(index + 1):
                    self.pending.popleft()
                return micro, below
        return None

    @contextlib.contextmanager
    def sharing_threads(self) -> Iterator[None]:
        """Run the block (a step's forward, while the next step's frozen layers run) on all
        threads but the lookahead's; then wait for the lookahead and take its thread back."""
        torch.set_num_threads(self.threads - 1)
        try:
            yield
            for _, _, futures in self.pending:
                for future in futures:
                    future.result()
        finally:
            torch.set_num_threads(self.threads)

    def upper_hidden(self, below: Future, batch: dict[str, Any], labels: torch.Tensor
                     ) -> torch.Tensor:
        """The decoder's last hidden state (N, C) at the N positions that predict one of
        ``labels``, from the frozen layers' output (under autocast)."""
        inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
        at = torch.zeros_like(labels, dtype=torch.bool)
        at[:, :-1] = shifted_labels(labels) != IGNORE_INDEX
        hidden = self.upper(inputs_embeds=below.result(), **inputs, at_labels=at,
                            use_cache=False).last_hidden_state
        return hidden[0]

    def _lower(self, batch: dict[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.use_bf16):
            length = row_prefix_length(inputs)
            if not length:
                return self.lower(**inputs, use_cache=False).last_hidden_state
            prefix_hidden, prefix_kv = self._prefix(inputs["input_ids"][:, :length])
            rest = self.lower(input_ids=inputs["input_ids"][:, length:],
                              position_ids=inputs["position_ids"][:, length:],
                              cu_seq_lens_q=inputs["cu_seq_lens_q"][1:] - length,
                              prefix_kv=prefix_kv, use_cache=False).last_hidden_state
            return torch.cat([prefix_hidden, rest], dim=1)

    def _prefix(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, PrefixKV]:
        """The frozen layers' output for a prefix (1, L) alone, and its keys and values: kept
        from the last time, else computed now."""
        key = tuple(input_ids[0].tolist())
        if key in self.prefixes:
            self.prefixes.move_to_end(key)
            return self.prefixes[key]
        length = input_ids.shape[1]
        kv = PrefixKV(record=True)
        hidden = self.lower(input_ids=input_ids, position_ids=torch.arange(length)[None],
                            cu_seq_lens_q=torch.tensor([0, length], dtype=torch.int32),
                            prefix_kv=kv, use_cache=False).last_hidden_state
        kv.record = False
        self.prefixes[key] = hidden, kv
        if len(self.prefixes) > KEPT_PREFIXES:
            self.prefixes.popitem(last=False)
        return hidden, kv

    def close(self) -> None:
        self.pending.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.prefixes.clear()


def row_prefix_length(batch: dict[str, Any]) -> int:
    """The length of the prefix that every example of a packed row continues (the row's first
    segment, see ``training.data.packing.collate_groups``), or 0 if the row has none."""
    parents = batch.get("segment_parents")
    if parents is None or parents[0] != -1 or bool((parents[1:] != 0).any()):
        return 0
    return int(batch["cu_seq_lens_q"][1])
