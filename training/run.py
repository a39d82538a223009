"""Drive one training run with Ray Train, and ``tuneserve train spec.json`` without the API.

``run_training`` builds a ``TorchTrainer`` (Ray Train V2, the default in Ray 2.60) named after the
job, with its storage under ``jobs/<job_id>/run`` in the service's storage.
``FailureConfig(max_failures)`` restarts failed workers within one call; every start of the
workers (that one, a new driver, a cluster restart) resumes from the newest complete checkpoint
in that storage (``training.recipes.checkpointing``). A run stopped by a preemption notice
ends with a checkpoint at its last step and is started again here, not charged to
``max_failures``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs
import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from service.core.errors import TuneserveError
from service.core.logs import job_logging
from service.core.names import run_key
from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from training.model.adapter import MANIFEST, adapter_prefix
from training.spec import TrainSpec

log = logging.getLogger(__name__)

# What the workers need from the driver's environment: S3 credentials (boto3 and pyarrow read
# the standard variables), the model cache and offline switches. Passed explicitly because a
# local Ray started earlier does not see variables set after it.
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "TUNESERVE_MODEL_CACHE")


def run_storage(config: StorageConfig, job_id: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for ``RunConfig``: ``jobs/<job_id>/run``."""
    if not config.uri.startswith("s3://"):
        root = Path(config.uri.removeprefix("file://")).expanduser().resolve()
        return str(root / run_key(job_id)), None
    parsed = urlparse(config.uri)
    path = "/".join(p for p in (parsed.netloc, parsed.path.strip("/"), run_key(job_id)) if p)
    options: dict[str, Any] = {
        "access_key": os.environ.get("AWS_ACCESS_KEY_ID"),
        "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
        "session_token": os.environ.get("AWS_SESSION_TOKEN"),
        "region": (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                   or "us-east-1"),
    }
    if config.endpoint_url:
        endpoint = urlparse(config.endpoint_url)
        options.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme or "https")
    return path, pyarrow.fs.S3FileSystem(**{k: v for k, v in options.items() if v is not None})


TRAINING_PRINT_ENV = {
    # Ray Train makes every print() in a worker an INFO line of the root logger, even one that a
    # library makes to capture it: dill disassembles a function (dis.dis into a captured stdout)
    # to find its globals when datasets fingerprints the tokenised table, ~40 lines of bytecode
    # in every job's log. The training code logs; nothing of ours prints.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
"""Ray Train's print redirection, off in training workers (the environment wins)."""


CPU_WORKER_ENV = "TUNESERVE_CPU_WORKER_ENV"
"""Names a JSON object of environment variables for CPU training workers: how a launcher that
tunes the processes of its machine reaches them (``service.ray.embedded``: glibc's allocator
settings). Unset on a cluster; never applied to GPU workers."""


def worker_env(use_gpu: bool) -> dict[str, str]:
    """The training workers' environment: ``TRAINING_PRINT_ENV``, on CPU workers what
    ``CPU_WORKER_ENV`` names, and the ``FORWARDED_ENV`` variables of this process (whose
    environment wins)."""
    defaults = dict(TRAINING_PRINT_ENV)
    if not use_gpu:
        defaults.update(json.loads(os.environ.get(CPU_WORKER_ENV) or "{}"))
    names = (*FORWARDED_ENV, *defaults)
    return {**defaults, **{name: os.environ[name] for name in names if name in os.environ}}


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """What each Ray Train worker runs: ``training.worker.train_loop_per_worker``, imported here.

    Ray pickles this function by reference, so the job driver, which builds the trainer, imports
    only this module: the training loop's peft, transformers and datasets (~2.5 s of imports)
    would otherwise delay every job's start in a process that never trains."""
    from training.worker import train_loop_per_worker

    return train_loop_per_worker(config)


def build_trainer(spec: TrainSpec, storage_config: StorageConfig) -> TorchTrainer:
    storage_path, filesystem = run_storage(storage_config, spec.job_id)
    return TorchTrainer(
        train_worker,
        # The spec itself, pickled: the worker reads it as the job record holds it.
        train_loop_config={"spec": spec, "storage": storage_config},
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                     resources_per_worker={"CPU": spec.cpus_per_worker}),
        run_config=RunConfig(
            name=spec.job_id, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=spec.max_failures),
            worker_runtime_env={"env_vars": worker_env(spec.use_gpu)}),
    )


def run_training(spec: TrainSpec, storage_config: StorageConfig) -> dict[str, Any]:
    """Train to the end (resuming the run's last checkpoint if there is one); return the final
    metrics. Raises the worker's ``TuneserveError`` (e.g. no trainable example) when there is
    one, so the job fails with its message and ``param``."""
    spec.validate()
    with job_logging(spec.job_id):  # the job's driver: its lines name the job too
        while True:
            try:
                result = build_trainer(spec, storage_config).fit()
            except ray.train.TrainingFailedError as exc:
                raise _user_error(exc) or exc
            last_report = result.return_value or {}
            if not last_report.get("preempted"):
                break
            # Every worker stopped after a complete checkpoint at its last step: start again.
            log.warning("job %s: preempted at step %s; starting the run again", spec.job_id,
                        last_report.get("step"))
    storage = open_storage(storage_config)
    manifest = json.loads(storage.get(f"{adapter_prefix(spec.job_id)}/{MANIFEST}"))
    return {**manifest["metrics"], "total_steps": last_report.get("total_steps"),
            "resumed_from_step": last_report.get("resumed_from_step"),
            "hyperparameters": manifest["hyperparameters"],
            "trained_tokens": manifest["metrics"].get("trained_tokens", 0)}


def _user_error(exc: BaseException) -> TuneserveError | None:
    """The first ``TuneserveError`` among the workers' failures (through Ray's wrappers)."""
    failures = getattr(exc, "worker_failures", {}) or {}
    for error in failures.values():
        seen = set()
        while error is not None and id(error) not in seen:
            if isinstance(error, TuneserveError):
                return error
            seen.add(id(error))
            error = getattr(error, "cause", None) or error.__cause__
    return None


def main(argv: list[str] | None = None) -> int:
    """``tuneserve train spec.json``: the spec's fields plus ``storage`` (a directory or
    ``s3://…``) and ``s3_endpoint_url``; prints the final metrics as JSON."""
    parser = argparse.ArgumentParser(prog="tuneserve train")
    parser.add_argument("spec", help="a JSON file with TrainSpec fields and 'storage'")
    args = parser.parse_args(argv)
    fields = json.loads(Path(args.spec).read_text())
    storage_config = StorageConfig(uri=fields.pop("storage"),
                                   endpoint_url=fields.pop("s3_endpoint_url", None))
    spec = TrainSpec.from_dict(fields).validate()
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    metrics = run_training(spec, storage_config)
    sys.stdout.write(json.dumps(metrics, indent=2) + "\n")
    return 0
