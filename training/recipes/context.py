"""Where a recipe runs: its rank and device, where its reports go, whether it is asked to stop.

``WorkerContext()`` is a plain process (rank 0 of 1); Ray Train's is
``training.worker.RayTrainContext``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class WorkerContext:
    """Where a recipe runs. This one is a plain process: rank 0 of 1, reported metrics kept in
    ``reports``, never preempted. Ray Train's is ``training.worker.RayTrainContext``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reports: list[dict[str, Any]] = field(default_factory=list)
    judge: Any = None
    """A ``training.graders.Judge`` for model graders' rewards (a reinforcement run); None:
    none is reachable from here."""

    def report(self, metrics: dict[str, Any]) -> None:
        """The metrics of a checkpoint (its files are already on their way to storage)."""
        self.reports.append(metrics)

    def stop_requested(self) -> bool:
        """Whether this worker is asked to stop (a preemption notice, SIGTERM): the run then
        saves a checkpoint after the current step and ends, to be resumed from it."""
        return False
