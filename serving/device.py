"""Where a chat replica runs and with which engine: ``TUNESERVE_CHAT_DEVICE`` and
``TUNESERVE_CHAT_ENGINE`` (``service.core.settings``), decided once when the replica starts.

A replica configured for a GPU that has none refuses to start: serving from the CPU while the
deployment pays for a GPU is the failure this module exists to prevent.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_VLLM_VENV = Path(__file__).resolve().parent.parent / ".venv-vllm"
"""A source checkout's vLLM venv (the Makefile builds it: vLLM's pins clash with ours)."""


class ChatConfigError(RuntimeError):
    """The chat settings cannot be honoured on this machine; the replica does not start."""


@dataclass(frozen=True)
class Placement:
    device: str
    """``cpu`` or ``cuda``."""
    dtype: str
    """A torch dtype name: ``float32``, ``bfloat16`` or ``float16``."""
    engine: str
    """``native`` or ``vllm``."""
    vllm_python: str | None = None
    """The interpreter that runs the vLLM engine process (engine ``vllm`` only)."""


def pick_device(setting: str) -> str:
    """``auto``: ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one raises."""
    import torch

    if setting not in ("auto", "cpu", "cuda"):
        raise ChatConfigError(f"TUNESERVE_CHAT_DEVICE={setting!r}: use auto, cpu or cuda")
    has_gpu = torch.cuda.is_available()
    if setting == "cuda" and not has_gpu:
        raise ChatConfigError(
            "TUNESERVE_CHAT_DEVICE=cuda, but this replica sees no CUDA GPU (torch "
            f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            "; give the replica a GPU (num_gpus: 1) or set TUNESERVE_CHAT_DEVICE=cpu or auto")
    if setting == "auto":
        return "cuda" if has_gpu else "cpu"
    return setting


def pick_dtype(device: str, dtype: str = "auto") -> str:
    """``auto``: bf16 on a GPU that supports it (fp16 on older ones); on the CPU, bf16 where
    the CPU has native bf16 matmuls (AMX, AVX512-bf16), else fp32."""
    if dtype != "auto":
        return dtype
    if device == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    from serving.engine import packed_linear

    return "bfloat16" if packed_linear.native_bf16() else "float32"


def find_vllm_python(configured: str | None) -> str | None:
    """The interpreter with vLLM: the configured one, this one, or a checkout's ``.venv-vllm``."""
    if configured:
        return configured if Path(configured).is_file() else None
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    candidate = REPO_VLLM_VENV / "bin" / "python"
    return str(candidate) if candidate.is_file() else None


def place(*, device: str = "auto", engine: str = "auto", dtype: str = "auto",
          vllm_python: str | None = None) -> Placement:
    """Decide device, dtype and engine from the settings; raise ``ChatConfigError`` naming the
    setting that this machine cannot honour."""
    if engine not in ("auto", "native", "vllm"):
        raise ChatConfigError(f"TUNESERVE_CHAT_ENGINE={engine!r}: use auto, native or vllm")
    chosen_device = pick_device(device)
    python = find_vllm_python(vllm_python) if engine != "native" else None
    if engine == "vllm" and python is None:
        where = f"TUNESERVE_VLLM_PYTHON={vllm_python!r} is not a file" if vllm_python else \
            f"this Python has no vllm and there is no {REPO_VLLM_VENV}"
        raise ChatConfigError(f"TUNESERVE_CHAT_ENGINE=vllm, but vLLM is not installed: {where}; "
                              "install it (docs/gpu.md) or set TUNESERVE_CHAT_ENGINE=native")
    if engine == "auto":
        # vLLM's CPU build loses to ours on the CPU (bench/results/serving-vllm.md): it is
        # chosen on its own only where a GPU is.
        engine = "vllm" if chosen_device == "cuda" and python is not None else "native"
    return Placement(chosen_device, pick_dtype(chosen_device, dtype), engine,
                     python if engine == "vllm" else None)
