"""A job's fit, time and cost, estimated at ``POST`` (``training.estimate``) from its spec, its
base model's config and its training files' descriptions.

Picks the default parallelism (``ddp`` while the model, its gradients and optimizer state fit one
worker with room for activations, else ``fsdp``), and refuses a job that cannot fit the largest
worker configured (``Settings.worker_memory_gb``) with a 400 that names what to change.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from service.core.errors import InvalidRequest
from service.core.settings import Settings
from service.core.storage import Storage
from service.files.store import get_file
from service.jobs.store import JobRecord
from training import estimate as est
from training.spec import TrainSpec, examples_per_epoch


def data_shape(storage: Storage, record: JobRecord, spec: TrainSpec) -> est.DataShape:
    """Examples and tokens one epoch sees (weights applied), the longest example and the share
    of supervised tokens, from the files' descriptions made at upload."""
    examples = tokens = supervised = 0.0
    longest = 0
    for file_id, weight in spec.training_files:
        description = get_file(storage, record.organization_id, file_id,
                               param="training_file").get("description") or {}
        n = int(description.get("examples") or 0)
        stats = description.get("tokens") or {}
        sup = description.get("supervised_tokens") or {}
        seen = examples_per_epoch(n, weight)
        mean = float(stats.get("mean") or 0)
        examples += seen
        tokens += seen * mean
        supervised += seen * float(sup.get("mean") or mean)
        longest = max(longest, int(stats.get("max") or spec.max_length))
    return est.DataShape(examples=int(examples), tokens=max(int(tokens), 1),
                         longest=longest or spec.max_length,
                         supervised_fraction=min(1.0, supervised / tokens) if tokens else 1.0)


def plan(storage: Storage, record: JobRecord, spec: TrainSpec, settings: Settings,
         asked_parallelism: str | None) -> tuple[TrainSpec, est.Estimate | None]:
    """The spec with its parallelism decided, and its estimate (None for a model whose config
    is not at hand). Raises ``InvalidRequest`` when it cannot fit the largest worker."""
    shape = est.model_shape(spec.base_model, settings.models)
    if shape is None:
        return spec, None
    data = data_shape(storage, record, spec)
    bf16 = spec.bf16
    memory = (int(settings.worker_memory_gb * 1e9) if settings.worker_memory_gb is not None
              else None)
    if asked_parallelism is None and est.needs_sharding(shape, spec, data, bf16=bf16,
                                                        worker_memory_bytes=memory):
        spec = dataclasses.replace(spec, parallelism="fsdp")
    estimate = est.estimate(shape, spec, data, bf16=bf16,
                            gpu_price_per_hour=settings.gpu_price_per_hour)
    if memory is not None and not est.fits(estimate, memory):
        raise InvalidRequest(
            f"This job does not fit the largest training worker ({settings.worker_memory_gb:g} "
            f"GB): the estimate is {estimate.describe()}. {_advice(shape, spec, data, memory)}",
            param=_param(spec), code="job_too_large")
    return spec, estimate


def _advice(shape: est.ModelShape, spec: TrainSpec, data: est.DataShape, memory: int) -> str:
    """What to change, each option checked against the estimate."""
    tries: list[tuple[str, dict[str, Any]]] = []
    if spec.full_finetune:
        tries.append(("train a LoRA adapter (full_finetune false)", {"full_finetune": False}))
    if spec.parallelism != "fsdp" and spec.method == "supervised":
        tries.append(("set parallelism to 'fsdp'",
                      {"parallelism": "fsdp", "num_workers": max(spec.num_workers, 2)}))
    if spec.method == "supervised":
        for workers in (2, 4, 8, 16):
            if workers > spec.num_workers:
                tries.append((f"use num_workers={workers} with parallelism 'fsdp'",
                              {"parallelism": "fsdp", "num_workers": workers}))
    if not spec.activation_checkpointing:
        tries.append(("set activation_checkpointing", {"activation_checkpointing": True}))
    batch = spec.batch_size if isinstance(spec.batch_size, int) else 32
    for smaller in (batch // 4, 1):
        if 1 <= smaller < batch:  # a worker's share of a step is packed into shorter rows
            tries.append((f"use batch_size={smaller} (shorter rows)", {"batch_size": smaller}))
    fixes = []
    for words, change in tries:
        candidate = dataclasses.replace(spec, **change)
        if est.fits(est.estimate(shape, candidate, data, bf16=spec.bf16), memory):
            fixes.append(words)
        if len(fixes) == 3:
            break
    if not fixes:
        return ("No single change fits it: use fewer trainable weights (LoRA), more workers "
                "with parallelism 'fsdp', shorter examples, or a smaller model.")
    return "It would fit if you " + "; or ".join(fixes) + "."


def _param(spec: TrainSpec) -> str:
    if spec.full_finetune:
        return "full_finetune"
    return "parallelism" if spec.parallelism != "fsdp" else "num_workers"
