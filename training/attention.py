"""Attention over packed rows, one causal SDPA call per example (``attn_implementation=PACKED``).

A packed row holds several examples that must not attend to each other. transformers builds a
block-diagonal (T, T) mask for that and SDPA then computes every score of the row, the masked
ones included: on CPU, where there is no varlen flash kernel, a row of 8 examples costs about
8× the attention it needs and attention took a quarter of a training step. Here each example
gets its own ``is_causal`` SDPA call on its slice of the row, which does only the causal half of
its own block; the row can then be long (fewer, larger matmuls elsewhere) at no quadratic cost.

The example boundaries come from ``cu_seq_lens_q`` (cumulative lengths, as flash-attention's
varlen kernels take them), which ``training.packing.collate_packed`` puts in the batch and the
model forwards to every attention layer. Without them (padded batches, generation), or where a
model needs what SDPA alone cannot do per slice (logit soft-capping; a sliding window shorter
than an example), this falls back to transformers' SDPA path with its mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED = "tuneserve_packed_sdpa"


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
    if not spans:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    outputs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                              dropout_p=dropout, scale=scaling, is_causal=True)
               for s, e in spans]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED, packed_sdpa_forward)
# The mask is SDPA's (used only by the fallback; the per-example path ignores it).
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, sdpa_mask)


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch ``model`` (loaded with SDPA) to ``PACKED`` where it dispatches attention through
    transformers' ``AttentionInterface``; others (Falcon has its own attention classes) keep
    SDPA with the block-diagonal mask. Returns whether it switched."""
    if not getattr(model, "_supports_attention_backend", False):
        return False
    model.set_attn_implementation(PACKED)
    return True
