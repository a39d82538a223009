"""What this CPU is: its model, whether it multiplies bf16 natively, how many CPUs we may use.

The recipes pick their precision by ``cpu_has_bf16``; every benchmark records
``cpu_description`` of the machine it ran on. No torch here, so a benchmark that only talks to a
service can say what it ran on without loading it.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """This CPU's model name and flags, from the first processor in /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU", frozenset()
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields.get("model name", "unknown CPU"), frozenset(fields.get("flags", "").split())


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-bf16 or AMX); elsewhere bf16 matmuls
    are emulated and fp32 is the fast path."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpuinfo()[1])


def cpu_description() -> str:
    """The CPU as a benchmark records it, e.g. ``AMD EPYC (AVX512-bf16, no AMX), 2 CPUs``: its
    model, its bf16 path (which decides the fast precision) and how many CPUs this process has."""
    name, flags = _cpuinfo()
    kind = ("AMX-bf16" if "amx_bf16" in flags else "AVX512-bf16, no AMX" if "avx512_bf16" in flags
            else "AVX2, no bf16" if "avx2" in flags else "no AVX2")
    return f"{name} ({kind}), {len(os.sched_getaffinity(0))} CPUs"
