"""What a recipe does differently on its device: the CPU's accelerations, or nothing.

A recipe asks its strategy four things (``training.recipes.base.Recipe.setup``): how many torch
threads it runs, whether bf16 autocast is fast here, what to change in the loaded model, and
whether a step's frozen layers can run ahead (``training.cpu.lookahead``). ``DeviceStrategy``
answers as torch would by itself (a GPU worker gets it); ``CPUStrategy`` is where everything
that only pays on a CPU lives, so none of it reaches a GPU worker.
"""

from __future__ import annotations

import logging
import os

import torch

from training.cpu.info import cpu_has_bf16
from training.cpu.lookahead import Lookahead
from training.model.attention import attend_in_fp32_below

log = logging.getLogger(__name__)

FP32_ATTENTION_BELOW = 512
"""Packed-attention spans (with their prefix) shorter than this attend in fp32 on a CPU."""


class DeviceStrategy:
    """No device-specific acceleration: torch's own thread count, bf16 where CUDA has it."""

    def set_threads(self, n: int) -> int:
        """The torch threads the worker runs (``n``: the CPUs Ray gave it, unused here)."""
        return torch.get_num_threads()

    def bf16_fast(self, device: torch.device) -> bool:
        """Whether bf16 autocast speeds training up on ``device``."""
        return device.type == "cuda" and torch.cuda.is_bf16_supported()

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Adjust the loaded model (before the adapter goes on) for this device."""

    def lookahead(self, decoder: torch.nn.Module, use_bf16: bool, threads: int
                  ) -> Lookahead | None:
        """A ``Lookahead`` over ``decoder``'s frozen lower layers, where one pays."""
        return None


class CPUStrategy(DeviceStrategy):
    """The accelerations that pay on a CPU only."""

    def set_threads(self, n: int) -> int:
        """Make torch use exactly the ``n`` CPUs Ray gave this worker."""
        torch.set_num_threads(n)
        used = torch.get_num_threads()
        if used != n:
            raise RuntimeError(f"torch uses {used} threads, expected cpus_per_worker={n}")
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else n
        if available < n:
            log.warning("worker may run on %d CPUs only, but was given %d", available, n)
        return used

    def bf16_fast(self, device: torch.device) -> bool:
        return cpu_has_bf16()

    def prepare_model(self, model: torch.nn.Module) -> None:
        # CPU's bf16 flash-attention backward costs 2-4x its fp32 one on short sequences
        # (measured at 48-300 tokens; even at ~500, slower beyond).
        attend_in_fp32_below(model, FP32_ATTENTION_BELOW)

    def lookahead(self, decoder: torch.nn.Module, use_bf16: bool, threads: int
                  ) -> Lookahead | None:
        n_frozen = Lookahead.usable(decoder, torch.device("cpu"), threads)
        return Lookahead(decoder, n_frozen, use_bf16, threads) if n_frozen else None


def strategy_for(device: torch.device) -> DeviceStrategy:
    """``CPUStrategy`` on a CPU, the plain strategy elsewhere."""
    return CPUStrategy() if device.type == "cpu" else DeviceStrategy()
