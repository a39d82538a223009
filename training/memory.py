"""What a training step really peaks at: the bytes held by tensors, measured.

A GPU has ``torch.cuda.max_memory_allocated``; a CPU has no allocator statistics, and a
process's resident size mixes tensors with the interpreter, libraries and allocator slack. So
the step is run under torch's profiler with ``profile_memory``: every tensor allocation and
free is an event, and their running sum from the start of the step, plus what tensors held when
it started (weights, optimizer state, the loss's scratch buffers), is the step's peak. The same
quantity ``torch.cuda.max_memory_allocated`` reports on a GPU, which is what the estimate
(``training.estimate``) predicts and is checked against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.profiler import ProfilerActivity, profile


@contextlib.contextmanager
def peak_bytes(held_before: int) -> Iterator[dict[str, int]]:
    """Profile the block; afterwards the dict holds ``peak`` (bytes: ``held_before`` plus the
    highest running sum of the block's allocations less its frees)."""
    result: dict[str, int] = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    result["peak"] = held_before + peak
    result["held_before"] = held_before


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of distinct storages among ``tensors`` (local shards of DTensors)."""
    seen: dict[int, int] = {}
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        storage = local.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
