"""The base model's matmuls with weights packed once for oneDNN (CPUs with native bf16).

``F.linear`` on a plain bf16 weight hands oneDNN a weight in PyTorch's layout on every call.
Packing each weight into oneDNN's layout once, as inductor's CPU weight freezing and IPEX do,
is faster: SmolLM2-135M's 210 decoder matmuls take 34 → 24 ms per decode step at batch 8 and
106 → 77 ms per 320-token prefill, its 49k-token vocabulary head 7.3 → 2.6 ms (one thread, an
AMX Xeon), with results bit-identical to ``F.linear``. Elsewhere (fp32, no native bf16) weights
stay as they are.
"""

from __future__ import annotations

import functools

import torch

_ROWS_HINT = 64
"""Batch rows oneDNN picks its blocking for. Results are the same for any number of rows
(checked at 1, 8 and 320) with this hint; with a hint of 1, long prefills round differently."""


@functools.cache
def native_bf16() -> bool:
    """True when oneDNN runs bf16 matmuls natively here (AMX or AVX512-bf16); asked once."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` [out, in] in oneDNN's layout, or None where packing does not pay."""
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or not native_bf16():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ROWS_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the weight as ``pack`` returned it."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
