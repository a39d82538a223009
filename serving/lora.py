"""Batched LoRA: many adapters live beside one base model, each batch row picks its own.

Every target ``nn.Linear`` of the base model is swapped for a ``LoraLinear`` that computes
``y = x W^T + Σ_segments (x_seg A_s^T) B_s^T`` where a segment is a run of batch rows that use
adapter slot ``s``. The engine keeps rows sorted by slot, so a segment is a contiguous slice:
no gathers, no copies, two small matmuls per segment and module. A batch that mixes several
adapters runs them all at once instead (``MixedPlan``).

Why not PEFT: PEFT's unmerged LoRA wraps each Linear in several Python layers (dropout, scaling,
adapter-name dispatch) and is about 3.5× slower per decoded token on this CPU; its mixed-batch
``adapter_names`` path groups rows with boolean masks on every call. Here the per-call cost is
one base ``F.linear`` plus ~8 µs per segment.

The LoRA product runs in fp32 even when the base model runs in bf16: on CPU, bf16 matmuls
of these tiny shapes (1×576 @ 576×16) cost ~17 µs each against ~2 µs in fp32, while the base
model's large matmuls are faster in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The Linear layers of a decoder block that can carry an adapter ("all-linear")."""

Segment = tuple[int, int, int]
"""(slot, first row, end row) of a run of batch rows that share adapter slot ``slot``."""


@dataclass(frozen=True)
class MixedPlan:
    """How a batch with several adapters runs: all of them in one pair of matmuls.

    Every LoraLinear multiplies the batch by its factors of ``slots`` stacked along the rank
    (``[ΣR, in]`` and ``[out, ΣR]``, rebuilt only when ``slots`` change) and ``mask`` zeroes
    the rank columns of the adapters a row does not use. That is five ops per module whatever
    the number of adapters, against four per adapter for segments: with several adapters the
    per-op cost on CPU (tens of µs under load) outweighs the few extra FLOPs.
    """

    slots: tuple[int, ...]
    mask: torch.Tensor
    """[rows × tokens per row, ΣR] fp32: 1 where the column belongs to the row's adapter."""

    @classmethod
    def build(cls, row_slots: list[int], ranks: dict[int, int],
              tokens_per_row: int = 1) -> MixedPlan:
        slots = tuple(sorted({s for s in row_slots if s >= 0}))
        offsets, total = {}, 0
        for slot in slots:
            offsets[slot], total = total, total + ranks[slot]
        mask = torch.zeros(len(row_slots), total)
        for i, slot in enumerate(row_slots):
            if slot >= 0:
                mask[i, offsets[slot]:offsets[slot] + ranks[slot]] = 1.0
        # A prefill feeds tokens_per_row tokens per row, flattened row-major.
        return cls(slots, mask.repeat_interleave(tokens_per_row, dim=0))


@dataclass
class BatchAdapters:
    """Which adapter each batch row uses in the forward pass about to run.

    One instance is shared by every ``LoraLinear`` of a model; the engine sets it before each
    forward: ``segments`` (contiguous runs of rows per adapter) or, for a batch mixing several
    adapters, a ``mixed`` plan. Rows on the bare base model belong to no segment.
    """

    segments: list[Segment] = field(default_factory=list)
    mixed: MixedPlan | None = None
    ranks: dict[int, int] = field(default_factory=dict)
    """LoRA rank of each loaded slot."""


class LoraLinear(nn.Module):
    """A frozen base Linear plus per-slot LoRA factors applied per batch segment."""

    def __init__(self, base: nn.Linear, batch: BatchAdapters):
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.batch = batch
        # slot -> (A [r, in], B [out, r] with the LoRA scaling folded in), fp32 (PEFT layout).
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stacked: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.batch.mixed is not None:
            return self._mixed(x, y, self.batch.mixed)
        segments = self.batch.segments
        if not segments:
            return y
        rows_per_item = x.shape[1] if x.dim() == 3 else 1  # (B, T, in): T tokens per batch row
        x2 = x.reshape(-1, self.in_features)
        y2 = y.view(-1, self.out_features)
        for slot, start, end in segments:
            factors = self.factors.get(slot)
            if factors is None:  # this adapter does not touch this module
                continue
            a, b = factors
            rows = slice(start * rows_per_item, end * rows_per_item)
            y2[rows] += F.linear(F.linear(x2[rows].to(a.dtype), a), b)
        return y

    def _mixed(self, x: torch.Tensor, y: torch.Tensor, plan: MixedPlan) -> torch.Tensor:
        if self._stacked is None or self._stacked[0] != plan.slots:
            a, b = zip(*(self.factors.get(s) or self._zeros(s) for s in plan.slots))
            self._stacked = (plan.slots, torch.cat(a), torch.cat(b, dim=1))
        _, a_all, b_all = self._stacked
        xa = F.linear(x.reshape(-1, self.in_features).to(a_all.dtype), a_all)
        y.view(-1, self.out_features).add_(F.linear(xa.mul_(plan.mask), b_all))
        return y

    def _zeros(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        rank = self.batch.ranks[slot]
        return torch.zeros(rank, self.in_features), torch.zeros(self.out_features, rank)


def attach_lora(model: nn.Module) -> tuple[BatchAdapters, dict[str, LoraLinear]]:
    """Swap every target Linear in ``model`` for a ``LoraLinear`` (in place).

    Returns the shared batch descriptor and the wrapped modules by their module path as PEFT
    writes it in adapter files, e.g. ``model.layers.0.self_attn.q_proj``.
    """
    batch = BatchAdapters()
    wrapped: dict[str, LoraLinear] = {}
    for path, module in list(model.named_modules()):
        for name in TARGET_MODULES:
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear):
                lora = LoraLinear(child, batch)
                setattr(module, name, lora)
                wrapped[f"{path}.{name}" if path else name] = lora
    if not wrapped:
        raise ValueError(f"no Linear layers named {', '.join(TARGET_MODULES)} in the model")
    return batch, wrapped
