"""Batched LoRA: many adapters live beside one base model, each batch row picks its own.

Every target ``nn.Linear`` of the base model is swapped for a ``LoraLinear`` that computes
``y = x W^T + Σ_segments (x_seg A_s^T) B_s^T`` where a segment is a run of batch rows that use
adapter slot ``s``. The engine keeps rows sorted by slot, so a segment is a contiguous slice:
no gathers, no copies. A batch that mixes several adapters runs them all at once instead
(``MixedPlan``).

Sibling modules that read the same input (``q_proj``/``k_proj``/``v_proj``, and
``gate_proj``/``up_proj``) form a ``LoraGroup``: the first one called casts the input to fp32
once and multiplies it by the members' A factors stacked along the rank; each member then only
multiplies its columns by its B and adds the result to its output in place. Per decoder block
that is 4 casts and 4 A matmuls instead of 7 each.

Why not PEFT: PEFT's unmerged LoRA wraps each Linear in several Python layers (dropout, scaling,
adapter-name dispatch) and is about 3.5× slower per decoded token on this CPU; its mixed-batch
``adapter_names`` path groups rows with boolean masks on every call.

The LoRA product runs in fp32 even when the base model runs in bf16: on CPU, bf16 matmuls
of these tiny shapes (1×576 @ 576×16) cost ~17 µs each against ~2 µs in fp32, while the base
model's large matmuls are faster in bf16.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from serving.engine import packed_linear

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The Linear layers of a decoder block that can carry an adapter ("all-linear")."""

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Targets under one parent module that are called on the same input tensor."""

Segment = tuple[int, int, int]
"""(slot, first row, end row) of a run of batch rows that share adapter slot ``slot``."""

Factors = tuple[torch.Tensor, torch.Tensor]
"""(A [r, in], B [out, r] with the LoRA scaling folded in), fp32 (PEFT layout)."""

_Product = tuple[slice | None, torch.Tensor, torch.Tensor]
"""(rows of the flattened [B·T, out] output or None for all, x A^T [rows, r] for one member,
that member's B^T [r, out])."""


@dataclass(frozen=True)
class MixedPlan:
    """How a batch with several adapters runs: all of them in one pair of matmuls.

    Every LoraGroup multiplies the batch by its members' factors of ``slots`` stacked along the
    rank (rebuilt only when ``slots`` change) and ``mask`` zeroes the rank columns of the
    adapters a row does not use. That is a fixed number of ops per group whatever the number
    of adapters, against several per adapter for segments: with several adapters the per-op
    cost on CPU (tens of µs under load) outweighs the few extra FLOPs.
    """

    slots: tuple[int, ...]
    mask: torch.Tensor
    """[rows, 1, ΣR] fp32: 1 where the column belongs to the row's adapter (broadcast over the
    tokens of a row)."""
    _tiled: dict[int, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, row_slots: list[int], ranks: Mapping[int, int]) -> MixedPlan:
        slots = tuple(sorted({s for s in row_slots if s >= 0}))
        offsets, total = {}, 0
        for slot in slots:
            offsets[slot], total = total, total + ranks[slot]
        mask = torch.zeros(len(row_slots), 1, total)
        for i, slot in enumerate(row_slots):
            if slot >= 0:
                mask[i, :, offsets[slot]:offsets[slot] + ranks[slot]] = 1.0
        return cls(slots, mask)

    def tiled(self, copies: int) -> torch.Tensor:
        """``mask`` repeated for ``copies`` group members side by side: [rows, 1, copies·ΣR]."""
        mask = self._tiled.get(copies)
        if mask is None:
            mask = self._tiled[copies] = self.mask.repeat(1, 1, copies)
        return mask


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
    """A frozen base Linear plus per-slot LoRA factors, applied through its ``LoraGroup``."""

    def __init__(self, base: nn.Linear, batch: BatchAdapters):
        super().__init__()
        self.packed = packed_linear.pack(base.weight)
        # Once packed the plain copy is dead weight (as large as the model): keep one of them.
        self.weight = base.weight if self.packed is None else None
        self.bias = base.bias
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.batch = batch
        self.factors: dict[int, Factors] = {}
        """slot -> factors; set through ``set_factors`` and ``drop_factors``."""
        self.group = LoraGroup([self])
        self.index = 0
        """This module's place in ``group.members``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            y = packed_linear.linear(x, self.packed, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        batch = self.batch
        if batch.mixed is None and not batch.segments:
            return y
        y2 = y.view(-1, self.out_features)
        for rows, xa, b_t in self.group.products(x, batch)[self.index]:
            out = y2 if rows is None else y2[rows]
            if out.dtype == xa.dtype:  # fp32 base: the add rides in the matmul (one op, no temp)
                out.addmm_(xa, b_t)
            else:  # bf16 base: addmm needs one dtype, and bf16 is slow at these shapes
                out.add_(torch.mm(xa, b_t))
        return y


class LoraGroup:
    """``LoraLinear``s fed the same input tensor: one fp32 cast and one A matmul for all.

    The products are cached for the last input, held by reference and compared by identity
    together with the batch plan, so a member called on another tensor (or with another plan)
    recomputes rather than reuses: grouping never changes results, only saves work.
    """

    def __init__(self, members: list[LoraLinear]):
        self.members = members
        self._last: tuple[torch.Tensor, object, list[list[_Product]]] | None = None
        self._by_slot: dict[int, tuple[torch.Tensor, list[int], list[torch.Tensor | None]]] = {}
        """slot -> (the members' A^T stacked [in, ΣR], each member's rank (0 if it has none),
        each member's B^T [r, out] or None)."""
        self._mixed: tuple[tuple[int, ...], torch.Tensor, list[int], list[torch.Tensor]] | None
        self._mixed = None
        """(slots, A^T of every member and slot stacked, ranks, B^T per member)."""

    def products(self, x: torch.Tensor, batch: BatchAdapters) -> list[list[_Product]]:
        """Per member, the (rows, x A^T, B) it adds to its output; computed once per input."""
        plan = batch.mixed if batch.mixed is not None else batch.segments
        last = self._last
        if last is not None and last[0] is x and last[1] is plan:
            return last[2]
        out = self._mixed_products(x, batch.mixed) if batch.mixed is not None \
            else self._segment_products(x, batch.segments)
        self._last = (x, plan, out)
        return out

    def forget(self, slot: int) -> None:
        """Drop what is cached for an unloaded adapter (may run on another thread)."""
        self._by_slot.pop(slot, None)
        mixed = self._mixed
        if mixed is not None and slot in mixed[0]:
            self._mixed = None
        self._last = None

    def _segment_products(self, x: torch.Tensor, segments: list[Segment]) -> list[list[_Product]]:
        out: list[list[_Product]] = [[] for _ in self.members]
        x2 = x.reshape(-1, x.shape[-1])
        tokens = x2.shape[0] // x.shape[0]  # per batch row: a prefill feeds several
        for slot, start, end in segments:
            stacked = self._by_slot.get(slot)
            if stacked is None:
                stacked = self._by_slot[slot] = self._stack_slot(slot)
            a_t, ranks, b_ts = stacked
            if not b_ts:  # this adapter touches none of the members
                continue
            rows = None if start == 0 and end == x.shape[0] else \
                slice(start * tokens, end * tokens)
            xs = x2 if rows is None else x2[rows]
            parts = torch.mm(xs.to(a_t.dtype), a_t).split(ranks, dim=1)
            for i, part in enumerate(parts):
                if b_ts[i] is not None:
                    out[i].append((rows, part, b_ts[i]))
        return out

    def _stack_slot(self, slot: int) -> tuple[torch.Tensor, list[int], list[torch.Tensor | None]]:
        """A^T of the members stacked [in, ΣR], their ranks (0: no factors), their B^T."""
        factors = [m.factors.get(slot) for m in self.members]
        a = [f[0] for f in factors if f is not None]
        ranks = [0 if f is None else f[0].shape[0] for f in factors]
        b_ts = [None if f is None else f[1].t() for f in factors]
        if not a:
            return torch.zeros(self.members[0].in_features, 0), ranks, []
        # Transposed once here, not per call: aten::t costs several µs per matmul.
        return torch.cat(a).t(), ranks, b_ts

    def _mixed_products(self, x: torch.Tensor, plan: MixedPlan) -> list[list[_Product]]:
        mixed = self._mixed
        if mixed is None or mixed[0] != plan.slots:
            mixed = self._mixed = self._stack_mixed(plan.slots)
        _, a_t, ranks, b_ts = mixed
        out: list[list[_Product]] = [[] for _ in self.members]
        if not any(ranks):
            return out
        xa = torch.mm(x.reshape(-1, x.shape[-1]).to(a_t.dtype), a_t)
        mask = plan.tiled(sum(1 for r in ranks if r))  # [rows, 1, columns]: same for each token
        xa.view(mask.shape[0], -1, xa.shape[1]).mul_(mask)
        for i, part in enumerate(xa.split(ranks, dim=1)):
            if ranks[i]:
                out[i].append((None, part, b_ts[i]))
        return out

    def _stack_mixed(self, slots: tuple[int, ...]) -> tuple[tuple[int, ...], torch.Tensor,
                                                            list[int], list[torch.Tensor]]:
        """Members without factors for any of ``slots`` are left out (rank 0); the others get
        zero factors for the slots they lack, so every member's columns line up with the mask."""
        a_parts, ranks, b_ts = [], [], []
        for member in self.members:
            if not any(s in member.factors for s in slots):
                ranks.append(0)
                b_ts.append(torch.zeros(0, member.out_features))
                continue
            pairs = [member.factors.get(s) or _zeros(member, s) for s in slots]
            a_parts += [a for a, _ in pairs]
            b_ts.append(torch.cat([b for _, b in pairs], dim=1).t())
            ranks.append(sum(a.shape[0] for a, _ in pairs))
        a = torch.cat(a_parts) if a_parts else torch.zeros(0, self.members[0].in_features)
        return slots, a.t(), ranks, b_ts


def _zeros(module: LoraLinear, slot: int) -> Factors:
    rank = module.batch.ranks[slot]
    return torch.zeros(rank, module.in_features), torch.zeros(module.out_features, rank)


def set_factors(batch: BatchAdapters, modules: Mapping[str, LoraLinear], slot: int,
                factors: Mapping[str, Factors]) -> None:
    """Give adapter slot ``slot`` its factors (module path -> factors); modules not named keep
    no adapter for it. Call before any batch row uses the slot."""
    for path, pair in factors.items():
        modules[path].factors[slot] = pair
    batch.ranks[slot] = next(iter(factors.values()))[0].shape[0]


def drop_factors(batch: BatchAdapters, modules: Mapping[str, LoraLinear], slot: int) -> None:
    """Forget adapter slot ``slot`` once no batch row uses it."""
    for module in modules.values():
        module.factors.pop(slot, None)
        module.group.forget(slot)
    batch.ranks.pop(slot, None)


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
        for names in SIBLINGS:
            members = [m for n in names if isinstance(m := getattr(module, n, None), LoraLinear)]
            if len(members) > 1:
                group = LoraGroup(members)
                for index, member in enumerate(members):
                    member.group, member.index = group, index
    if not wrapped:
        raise ValueError(f"no Linear layers named {', '.join(TARGET_MODULES)} in the model")
    return batch, wrapped
