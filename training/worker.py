"""What each Ray Train worker runs: the job's recipe, with Ray Train's few touch points.

Ray Train is the launcher, not a dependency of the step: the recipe (``training.recipes``) runs
as well in a plain process. What Ray Train gives it, and nothing else, comes from here:

  [1] rank, world size and device   (``ray.train.get_context``, ``ray.train.torch.get_device``)
  [2] the gradient all-reduce       (the gloo/NCCL group Ray set up, used by ``torch.distributed``)
  [3] report metrics + checkpoint   (``RayTrainContext.report`` → ``ray.train.report``)
  [4] resume                        (``RayTrainContext.stored_checkpoints``: the run's latest
                                     checkpoint and the older ones beside it)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import ray.train.torch

from service.core.logs import job_logging
from service.core.storage.config import StorageConfig
from training.checkpoints import checkpoint_name
from training.recipes import run_recipe
from training.recipes.base import WorkerContext
from training.spec import TrainSpec


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """``TorchTrainer``'s loop: ``config`` holds the job's ``spec`` (a ``TrainSpec``) and its
    ``storage`` (a ``StorageConfig``), both as ``training.run.build_trainer`` passes them."""
    spec: TrainSpec = config["spec"]
    storage: StorageConfig = config["storage"]
    with job_logging(spec.job_id):  # every line of this worker names its job
        run_recipe(spec, storage, RayTrainContext.current())


@dataclass
class RayTrainContext(WorkerContext):
    """A Ray Train worker's place in the run, its checkpoints and its reports."""

    @classmethod
    def current(cls) -> RayTrainContext:
        context = ray.train.get_context()  # [1]
        return cls(rank=context.get_world_rank(), world_size=context.get_world_size(),
                   device=ray.train.torch.get_device())

    def stored_checkpoints(self) -> list[ray.train.Checkpoint]:  # [4]
        """The reported checkpoint, then the older ones beside it in the run's folder."""
        latest = ray.train.get_checkpoint()
        if latest is None:
            return []
        found = [latest]
        parent, _, name = str(latest.path).rstrip("/").rpartition("/")
        try:
            infos = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
        except Exception:  # noqa: BLE001 - without a listing, only the reported one is known
            return found
        older = sorted((i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                        and i.base_name.startswith("checkpoint-step-") and i.base_name < name),
                       reverse=True)
        return found + [ray.train.Checkpoint(f"{parent}/{n}", filesystem=latest.filesystem)
                        for n in older]

    def report(self, metrics: dict[str, Any], folder: Path | None, step: int) -> None:  # [3]
        """``ray.train.report`` (a barrier over all ranks) with this rank's folder, if any."""
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder else None
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=checkpoint_name(step) if folder else None)
