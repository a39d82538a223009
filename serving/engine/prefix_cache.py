"""The keys and values of recent prompts, so that a prompt starting the same way skips that part.

Chat prompts share their openings: the template's system prompt (SmolLM2's template puts its
default one in front of every conversation: 24 of the ~37 tokens of a one-line question), a
caller's fixed instructions, the earlier turns of a conversation. A causal model's keys and
values for a prompt's first ``n`` tokens depend on those tokens alone, so the KV computed for one
prompt serves every later prompt that shares its first ``n`` tokens, and the prefill only
computes what follows (vLLM's automatic prefix caching, without its paged memory). An adapter
changes every layer's keys and values, so entries belong to one adapter slot.

Entries are whole prompts, kept least-recently-used first within a token budget; a lookup takes
the longest match over the slot's entries (a binary search of tuple-slice comparisons per entry,
done in C). Used by the engine's generation thread; ``forget`` may come from another thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

LayerKV = tuple[torch.Tensor, torch.Tensor]
"""(keys, values) of one layer for one prompt: [1, kv heads, tokens, head dim] each."""

MIN_MATCH = 8
"""Shorter matches are not worth the bookkeeping (and are mostly the chat template's first
few tokens, which cost little to recompute)."""


class PrefixCache:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        """Budget: the prompt tokens whose KV is kept, over all entries (0 turns the cache off)."""
        self._entries: OrderedDict[tuple[int, tuple[int, ...]], list[LayerKV]] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()
        self.reused_tokens = 0
        """Prompt tokens not computed because a cached prefix covered them."""

    def match(self, slot: int, prompt: Sequence[int]) -> tuple[int, list[LayerKV] | None]:
        """The longest cached prefix of ``prompt`` for adapter ``slot`` (at most all but its last
        token, whose logits the prefill must compute): (its length, its KV per layer), or
        (0, None) below ``MIN_MATCH``."""
        prompt = tuple(prompt)
        limit = len(prompt) - 1
        if limit < MIN_MATCH or not self.max_tokens:
            return 0, None
        with self._lock:
            best, best_key = 0, None
            for key in self._entries:
                if key[0] != slot or key[1][:MIN_MATCH] != prompt[:MIN_MATCH]:
                    continue
                length = common_prefix(key[1], prompt, min(limit, len(key[1])))
                if length > best:
                    best, best_key = length, key
            if best_key is None:
                return 0, None
            self._entries.move_to_end(best_key)
            self.reused_tokens += best
            return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[best_key]]

    def store(self, slot: int, prompt: Sequence[int], kv: Callable[[], list[LayerKV]]) -> None:
        """Keep the KV of ``prompt`` (``kv()`` is called only if it is not cached already)."""
        key = (slot, tuple(prompt))
        if not 0 < len(key[1]) <= self.max_tokens:
            return
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
        layers = kv()
        with self._lock:
            self._entries[key] = layers
            self._tokens += len(key[1])
            while self._tokens > self.max_tokens:
                (_, old), _ = self._entries.popitem(last=False)
                self._tokens -= len(old)

    def forget(self, slot: int) -> None:
        """Drop the entries of an adapter slot that is being unloaded."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == slot]:
                del self._entries[key]
                self._tokens -= len(key[1])

    def __len__(self) -> int:
        return len(self._entries)


def common_prefix(a: tuple[int, ...], b: tuple[int, ...], limit: int) -> int:
    """Length of the longest common prefix of ``a`` and ``b``, at most ``limit``."""
    low, high = 0, limit  # a[:low] == b[:low] holds; the answer is at most high
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low
