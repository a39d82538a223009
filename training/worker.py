"""What each Ray Train worker runs: the job's recipe, with Ray Train's few touch points.

Ray Train is the launcher, not a dependency of the step: the recipe (``training.recipes``) runs
as well in a plain process. What Ray Train gives it, and nothing else, comes from here:

  [1] rank, world size and device   (``ray.train.get_context``, ``ray.train.torch.get_device``)
  [2] the gradient all-reduce       (the gloo/NCCL group Ray set up, used by ``torch.distributed``)
  [3] report metrics                (``RayTrainContext.report`` → ``ray.train.report``)
  [4] preemption                    (``RayTrainContext.stop_requested``: SIGTERM to this worker,
                                     or Ray Train's notice that this worker's node is draining)

Checkpoints are not reported to Ray Train: the recipe stores them itself and resumes from the
newest complete one in storage (``training.recipes.checkpointing``), whatever the controller
had registered.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch

from service.core.logs import job_logging
from service.core.storage.config import StorageConfig
from training.judge import ActorJudge, judge_actor_name
from training.recipes import run_recipe
from training.recipes.context import WorkerContext
from training.spec import TrainSpec

log = logging.getLogger(__name__)

SIGTERM_RECEIVED = threading.Event()
"""Set by this worker process's SIGTERM handler (``_on_sigterm``)."""
TRAINING = threading.Event()
"""Set while this process runs a training loop: outside one, SIGTERM ends the worker as Ray's
handler does (a worker kept after its run must not outlive Ray's shutdown)."""
_ray_sigterm_handler: Any = None


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """``TorchTrainer``'s loop: ``config`` holds the job's ``spec`` (a ``TrainSpec``) and its
    ``storage`` (a ``StorageConfig``), both as ``training.run.build_trainer`` passes them.

    Returns the last step's metrics and whether the run stopped on a preemption notice (Ray
    Train hands rank 0's to the launcher as ``Result.return_value``: its ``Result.metrics`` are
    those of reported checkpoints, and checkpoints are not reported to it)."""
    spec: TrainSpec = config["spec"]
    storage: StorageConfig = config["storage"]
    TRAINING.set()
    try:
        with job_logging(spec.job_id):  # every line of this worker names its job
            context = RayTrainContext.current()
            context.judge = ActorJudge(judge_actor_name(spec.job_id))  # used by model graders
            recipe = run_recipe(spec, storage, context)
    finally:
        TRAINING.clear()
    return {**recipe.report_metrics(), "preempted": recipe.stopping}


@dataclass
class RayTrainContext(WorkerContext):
    """A Ray Train worker's place in the run, its reports and its preemption notices."""

    @classmethod
    def current(cls) -> RayTrainContext:
        context = ray.train.get_context()  # [1]
        catch_sigterm()
        return cls(rank=context.get_world_rank(), world_size=context.get_world_size(),
                   device=ray.train.torch.get_device())

    def report(self, metrics: dict[str, Any]) -> None:  # [3]
        """``ray.train.report`` (a barrier over all ranks)."""
        ray.train.report(metrics)

    def stop_requested(self) -> bool:  # [4]
        return SIGTERM_RECEIVED.is_set() or _node_draining()


def _node_draining() -> bool:
    """Ray Train's preemption notice for this worker (its node is being drained), read locally.

    ``ray.train.get_preemption_info()`` is a barrier over all workers, one round trip to the
    controller per call; the recipe all-reduces this answer with the step's gradients anyway,
    so the worker's own copy (what Ray Train's watcher set on it) is read instead.
    """
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info is not None
    except Exception:  # noqa: BLE001 - a Ray without the notice: SIGTERM still works
        return False


def catch_sigterm() -> None:
    """Make SIGTERM to this worker a request to stop after the current step and a checkpoint
    (Ray's own handler exits at once, losing the steps since the last checkpoint).

    Python installs signal handlers from the main thread only, and Ray Train runs this loop in
    another thread of the worker actor: the actor's main thread installs it, through the
    worker's own ``execute`` method. A second SIGTERM goes to Ray's handler (exit now).
    """
    try:
        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(_install_sigterm_handler), timeout=30)
    except Exception:  # noqa: BLE001 - without it, SIGTERM ends the worker as before
        log.warning("could not catch SIGTERM in this worker", exc_info=True)


def _install_sigterm_handler() -> None:
    global _ray_sigterm_handler
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        _ray_sigterm_handler = signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    if SIGTERM_RECEIVED.is_set() or not TRAINING.is_set():
        # A second SIGTERM, or one outside a run: what Ray (or the default) would have done.
        signal.signal(signal.SIGTERM, _ray_sigterm_handler or signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    log.warning("SIGTERM: stopping after this step and a checkpoint")
    SIGTERM_RECEIVED.set()
