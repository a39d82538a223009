"""The rows decoded together and their KV cache: left-padded, sorted by adapter slot.

Rows join after their own prefill (their cache is left-padded to the batch's length) and leave
as soon as they finish; padding columns that no remaining row needs are cut off. Keeping rows
sorted by adapter slot lets ``LoraLinear`` apply each adapter to one contiguous slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from serving.engine.lora import Segment
from serving.engine.sampling import IncrementalText, SamplingParams, StopText


@dataclass(eq=False)
class Row:
    """One request in the engine, from the queue to its last token."""

    generation: Any
    """The request's ``Generation`` (its output stream)."""
    prompt: list[int]
    params: SamplingParams
    adapter_id: str | None
    slot: int
    """Adapter slot, -1 for the bare base model."""
    max_tokens: int
    generator: torch.Generator
    stop: StopText
    text: IncrementalText
    tokens: list[int] = field(default_factory=list)
    pos: int = 0
    """Position of the newest token, the one the next decode step feeds."""
    done: bool = False
    index: int = 0
    """Which of the request's ``n`` choices this row generates."""
    matcher: Any = None
    """The llguidance matcher of a constrained answer (``params.grammar``), else None."""
    logprobs: list[dict] = field(default_factory=list)
    """Log-prob entries of tokens whose text has not been sent yet."""


class RunningBatch:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        """[B, L]: 1 for a real token, 0 for left padding."""

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        self.rows, self.cache, self.mask = [], None, None

    def join(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add prefilled rows (``cache`` and ``mask`` [n, L] hold their left-padded prompts),
        left-padding the shorter side."""
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        assert self.cache is not None and self.mask is not None
        length = max(self.mask.shape[1], mask.shape[1])
        for big, small in zip(self.cache.layers, cache.layers, strict=True):
            big.keys = torch.cat([left_pad(big.keys, length), left_pad(small.keys, length)])
            big.values = torch.cat([left_pad(big.values, length),
                                    left_pad(small.values, length)])
        self.mask = torch.cat([left_pad(self.mask, length), left_pad(mask, length)])
        self.rows.extend(rows)
        order = sorted(range(len(self.rows)), key=lambda i: self.rows[i].slot)
        if order != list(range(len(self.rows))):
            self._select(order)

    def step_inputs(self) -> dict[str, Any]:
        """Model inputs for one decode step: each row's newest token at its own position."""
        assert self.mask is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        padded = not bool(self.mask.all())
        return {"input_ids": torch.tensor([[r.tokens[-1]] for r in self.rows]),
                "position_ids": torch.tensor([[r.pos] for r in self.rows]),
                # Without padding SDPA takes its plain causal path: the bare model's speed.
                "attention_mask": self.mask if padded else None,
                "cache": self.cache}

    def drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        self._select(keep)
        # Columns that are padding for every remaining row are dead weight: cut them.
        assert self.mask is not None and self.cache is not None
        first = int(self.mask.any(dim=0).int().argmax())
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    def _select(self, order: list[int]) -> None:
        assert self.cache is not None and self.mask is not None
        index = torch.tensor(order)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.rows = [self.rows[i] for i in order]


def segments_of(row_slots: list[int]) -> list[Segment]:
    """Runs of rows (sorted by slot) sharing an adapter; rows on the bare base need none."""
    segments: list[Segment] = []
    start = 0
    for i in range(1, len(row_slots) + 1):
        if i == len(row_slots) or row_slots[i] != row_slots[start]:
            if row_slots[start] >= 0:
                segments.append((row_slots[start], start, i))
            start = i
    return segments


def left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pad dim -2 of a cache tensor [B, H, L, D] (or dim -1 of a mask [B, L]) on the left."""
    missing = length - (t.shape[-2] if t.dim() == 4 else t.shape[-1])
    if missing == 0:
        return t
    pad = (0, 0, missing, 0) if t.dim() == 4 else (missing, 0)
    return torch.nn.functional.pad(t, pad)
