"""Attention over packed rows, one causal SDPA call per example (``attn_implementation=PACKED``).

A packed row holds several examples that must not attend to each other. transformers builds a
block-diagonal (T, T) mask for that and SDPA then computes every score of the row, the masked
ones included: on CPU, where there is no varlen flash kernel, a row of 8 examples costs about
8× the attention it needs and attention took a quarter of a training step. Here each example
gets its own ``is_causal`` SDPA call on its slice of the row, which does only the causal half of
its own block; the row can then be long (fewer, larger matmuls elsewhere) at no quadratic cost.

The example boundaries come from ``cu_seq_lens_q`` (cumulative lengths, as flash-attention's
varlen kernels take them), which ``training.data.packing.collate_packed`` puts in the batch and the
model forwards to every attention layer. With ``segment_parents`` a segment also attends to its
parent segment (a prefix its examples share, computed once): its queries see the parent's keys
and then its own, causally, as if the parent's tokens stood in front of it. With ``prefix_kv``
(a ``PrefixKV``) the prefix is not in the row at all: its keys and values were kept from an
earlier forward of the same frozen layers, and every segment attends to them. Without the bounds
(padded batches, generation), or where a model needs what SDPA alone cannot do per slice (logit
soft-capping; a sliding window shorter than an example), this falls back to transformers' SDPA
path with its mask.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED = "tuneserve_packed_sdpa"
FP32_ATTRIBUTE = "fp32_attention_below"
"""Set on a model's attention modules by ``attend_in_fp32_below``; absent means never."""
CACHED_MASKS_BELOW = 512
"""Masks of rows shorter than this come from a cache (``after_prefix_mask``)."""


@dataclass
class PrefixKV:
    """The keys and values (per layer index) of a prefix, for rows that continue it.

    A forward with ``prefix_kv=PrefixKV(record=True)`` over a row holding the prefix alone
    stores them; a later forward of the same layers with ``prefix_kv=that`` over rows without
    it attends every segment to them, as if the prefix stood in front of each. Only exact where
    the layers are the same and unchanged (frozen) between the two: ``training.cpu.lookahead``.
    """

    record: bool = False
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: torch.Tensor | None,
                        dropout: float = 0.0, scaling: float | None = None, **kwargs
                        ) -> tuple[torch.Tensor, None]:
    """(B=1, H, T, D) query/key/value → (1, T, H, D), attending within each example only."""
    bounds = kwargs.get("cu_seq_lens_q")
    spans = []
    if bounds is not None and query.shape[0] == 1 and kwargs.get("softcap") is None:
        edges = bounds.tolist()
        spans = [(s, e) for s, e in zip(edges, edges[1:], strict=False) if e > s]
        window = kwargs.get("sliding_window")
        if window is not None and max(e - s for s, e in spans) > window:
            spans = []
    prefix_kv = kwargs.get("prefix_kv")
    if not spans:
        if kwargs.get("segment_parents") is not None or prefix_kv is not None:
            raise ValueError("shared-prefix rows need the per-example path (see shares_prefixes)")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    parents = kwargs.get("segment_parents")
    parents = parents.tolist() if parents is not None else [-1] * len(spans)
    kept = None  # the keys and values of a prefix kept from before, in front of every segment
    if prefix_kv is not None and prefix_kv.record:
        prefix_kv.layers[module.layer_idx] = (key, value)
    elif prefix_kv is not None:
        kept = prefix_kv.layers[module.layer_idx]
    lengths = [e - s for s, e in spans]
    befores = [lengths[p] if p >= 0 else kept[0].shape[2] if kept is not None else 0
               for p in parents]
    # Spans shorter than the model's ``FP32_ATTRIBUTE`` attend in fp32, outside autocast (which
    # would cast them back to bf16); a row whose spans all do is cast once.
    below = getattr(module, FP32_ATTRIBUTE, 0)
    fp32 = [before + length < below for before, length in zip(befores, lengths)]
    dtype, whole = query.dtype, all(fp32)
    if whole:
        query, key, value = query.float(), key.float(), value.float()
        kept = (kept[0].float(), kept[1].float()) if kept is not None else None
    # One split per tensor, not a slice per example: a slice's backward writes its gradient into
    # a zeroed copy of the whole row, so n examples cost n full-row buffers per tensor and layer
    # (a tenth of a DPO step); split's backward is one concatenation. The spans cover the row.
    qs, ks, vs = (t.split(lengths, dim=2) for t in (query, key, value))
    outputs = []
    with (torch.autocast(query.device.type, enabled=False) if any(fp32)
          else contextlib.nullcontext()):
        for q, k, v, length, parent, short in zip(qs, ks, vs, lengths, parents, fp32, strict=True):
            mask = None
            if parent >= 0 or kept is not None:
                before_k, before_v = (ks[parent], vs[parent]) if parent >= 0 else kept
                k = torch.cat([before_k, k], dim=2)
                v = torch.cat([before_v, v], dim=2)
                mask = after_prefix_mask(length, before_k.shape[2], q.device)
            if short and not whole:
                q, k, v = q.float(), k.float(), v.float()
            elif not short and not q.dtype == k.dtype == v.dtype:
                # Autocast is off here, and rotary leaves query and key in fp32 beside a bf16
                # value (a frozen layer's): one dtype, the widest, as for the short spans.
                common = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
                q, k, v = q.to(common), k.to(common), v.to(common)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 scale=scaling, is_causal=mask is None)
            outputs.append(out if whole else out.to(dtype))
    return torch.cat(outputs, dim=2).to(dtype).transpose(1, 2).contiguous(), None


def after_prefix_mask(length: int, prefix: int, device: torch.device) -> torch.Tensor:
    """(length, prefix + length) bool: every query sees the whole prefix, then its own segment
    causally (SDPA's ``is_causal`` aligns top-left, which would be wrong here). Short ones come
    from a cache: each layer asks for the same few (SDPA never writes them)."""
    if prefix + length < CACHED_MASKS_BELOW:
        return _short_mask(length, prefix, device)
    return _mask(length, prefix, device)


def _mask(length: int, prefix: int, device: torch.device) -> torch.Tensor:
    own = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(length, prefix, dtype=torch.bool, device=device), own], dim=1)


_short_mask = functools.lru_cache(maxsize=128)(_mask)  # at most 128 × 256 KB


def shares_prefixes(model: torch.nn.Module) -> bool:
    """Whether rows with shared prefixes (``segment_parents``) are computed right for ``model``:
    only on the per-example path, so not where that path falls back to a mask (soft-capping,
    sliding windows) or is not used at all."""
    config = model.config
    return (config._attn_implementation == PACKED
            and getattr(config, "attn_logit_softcapping", None) is None
            and getattr(config, "sliding_window", None) is None)


AttentionInterface.register(PACKED, packed_sdpa_forward)
# The mask is SDPA's (used only by the fallback; the per-example path ignores it).
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, sdpa_mask)


def attend_in_fp32_below(model: torch.nn.Module, tokens: int) -> None:
    """Make the ``PACKED`` attention of ``model`` compute every span shorter than ``tokens``
    (with its prefix) in fp32, even under bf16 autocast (``training.cpu.strategy`` says where
    that is faster). A plain attribute of each attention module: no weight, nothing saved."""
    for module in model.modules():
        if hasattr(module, "layer_idx"):  # transformers' attention modules carry their index
            setattr(module, FP32_ATTRIBUTE, tokens)


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch ``model`` (loaded with SDPA) to ``PACKED`` where it dispatches attention through
    transformers' ``AttentionInterface``; others (Falcon has its own attention classes) keep
    SDPA with the block-diagonal mask. Returns whether it switched."""
    if not getattr(model, "_supports_attention_backend", False):
        return False
    model.set_attn_implementation(PACKED)
    return True
