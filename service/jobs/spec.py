"""A job's training spec: built and checked once, from the job's request (as its record holds
it) and the descriptions its training files got at upload; stored in the job record and read,
not rebuilt, by the driver and the Ray Train workers.

``POST /v1/fine_tuning/jobs`` builds it, so a spec that cannot run is a 400 naming the request's
field, never a failed job. A record written before records held a spec gets one from the same
function, once, when the scheduler first meets it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.core import limits, names
from service.core.errors import InvalidRequest
from service.core.storage import Storage
from service.files.store import describe_for_training
from service.jobs.store import JobRecord
from training.spec import TrainSpec, weighted_size

FileSize = tuple[int, int]
"""``(examples, tokens)`` of one file, from its description."""

HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
"""The request's hyperparameters that may be "auto"; the spec holds them resolved."""

CHECKPOINT_EXTENSIONS = ("checkpoint_every_steps", "checkpoint_every_seconds")
"""Spec fields a request may set (``CreateJobRequest``), kept in the record's ``extensions``."""

OPERATOR_EXTENSIONS = ("max_length", "pack_length", "max_failures", "packing")
"""Spec fields no request sets, which an operator may put in a record's ``extensions``."""


def build_spec(record: JobRecord, sizes: Mapping[str, FileSize]) -> TrainSpec:
    """The spec ``record``'s run trains, with "auto" resolved from every training file.

    Args:
        record: the job as created from its request (``hyperparameters``, ``method`` and
            ``extensions`` as the caller gave them).
        sizes: ``(examples, tokens)`` of each training file, by id (``training_file_sizes``).
            "auto" counts each file as often as its weight makes one epoch draw from it.

    Raises:
        InvalidRequest: the spec cannot run; ``param`` names the request's field.
    """
    method = record.method.get("type", "supervised")
    hp = record.hyperparameters
    ext = record.extensions
    fields: dict[str, Any] = dict(
        job_id=record.id, method=method, training_files=training_files(record),
        validation_file=record.validation_file, seed=record.seed, tenant=record.organization_id,
        **{name: hp[name] for name in HYPERPARAMETERS if name in hp},
        **{name: ext[name] for name in (*CHECKPOINT_EXTENSIONS, *OPERATOR_EXTENSIONS)
           if name in ext},
    )
    for name in ("num_workers", "use_gpu", "full_finetune", "activation_checkpointing",
                 "parallelism"):
        if ext.get(name) is not None:
            fields[name] = ext[name]
    fields.update(_base_model(record.model, method))
    fields.update(_lora(ext.get("lora") or {}))
    if method == "dpo":
        if hp.get("beta", "auto") != "auto":
            fields["beta"] = float(hp["beta"])
        if hp.get("rpo_alpha") is not None:
            fields["rpo_alpha"] = float(hp["rpo_alpha"])
    if method == "reinforcement":
        fields.update(_reinforcement(record.method.get("reinforcement") or {}))
        if fields.get("full_finetune"):
            # The reference would be a second full copy of the model: no KL term then.
            fields["kl_beta"] = 0.0
    try:
        spec = TrainSpec(**fields).validate()
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, param=_request_param(exc.param, method),
                             code=exc.code) from None
    n_examples, n_tokens = weighted_size(
        [(*sizes[file_id], weight) for file_id, weight in spec.training_files])
    return spec.resolved(n_examples, n_tokens).validate()


def _reinforcement(section: Mapping[str, Any]) -> dict[str, Any]:
    """The spec fields of OpenAI's ``method.reinforcement`` (``reasoning_effort`` is ignored)."""
    hp = section.get("hyperparameters") or {}
    fields: dict[str, Any] = {"grader": section.get("grader")}
    multiplier = hp.get("compute_multiplier", "auto")
    if multiplier != "auto":
        fields["group_size"] = min(limits.MAX_RFT_GROUP_SIZE,
                                   max(2, round(limits.RFT_GROUP_SIZE * float(multiplier))))
    if hp.get("eval_interval", "auto") != "auto":
        fields["eval_interval"] = int(hp["eval_interval"])
    if hp.get("eval_samples", "auto") != "auto":
        fields["eval_samples"] = int(hp["eval_samples"])
    if hp.get("temperature", "auto") != "auto":
        fields["temperature"] = float(hp["temperature"])
    if hp.get("scale_rewards") is not None:
        fields["scale_rewards"] = bool(hp["scale_rewards"])
    if hp.get("hard_prompt_samples"):
        fields["hard_prompt_samples"] = int(hp["hard_prompt_samples"])
    return fields


def training_files(record: JobRecord) -> tuple[tuple[str, float], ...]:
    """``(file_id, weight)``: ``training_file`` at weight 1, then our ``training_files``."""
    extra = record.extensions.get("training_files") or []
    return ((record.training_file, 1.0), *((f["file"], float(f["weight"])) for f in extra))


def training_file_sizes(storage: Storage, record: JobRecord) -> dict[str, FileSize]:
    """``(examples, tokens)`` of each training file of ``record``; NotFound naming the request's
    field when one is gone."""
    params = ["training_file"] + [f"training_files[{i}].file"
                                  for i in range(len(training_files(record)) - 1)]
    return {file_id: describe_for_training(storage, record.organization_id, file_id, param=param)
            for param, (file_id, _) in zip(params, training_files(record))}


def with_spec(record: JobRecord, spec: TrainSpec) -> JobRecord:
    """``record`` holding ``spec``, and reporting its resolved hyperparameters (top level and
    under ``method``, as OpenAI's job object does)."""
    hp: dict[str, Any] = {name: getattr(spec, name) for name in HYPERPARAMETERS}
    section: dict[str, Any] = {"hyperparameters": hp}
    if spec.method == "dpo":
        hp.update(beta=spec.beta, rpo_alpha=spec.rpo_alpha)
    if spec.method == "reinforcement":
        asked = (record.method.get("reinforcement") or {}).get("hyperparameters") or {}
        hp.update(compute_multiplier=asked.get("compute_multiplier", "auto"),
                  eval_interval=spec.eval_interval or "auto",
                  eval_samples=spec.eval_samples or "auto", temperature=spec.temperature,
                  scale_rewards=spec.scale_rewards, hard_prompt_samples=spec.hard_prompt_samples,
                  reasoning_effort=asked.get("reasoning_effort", "default"))
        section["grader"] = spec.grader
    method = {**record.method, "type": spec.method, spec.method: section}
    return record.model_copy(update={"spec": spec, "hyperparameters": hp, "method": method})


def _base_model(model: str, method: str) -> dict[str, Any]:
    tuned = names.parse_tuned_model(model)
    if tuned is None:
        return {"base_model": model}
    adapter = names.adapter_key(tuned.adapter_id)
    # Continuing from a tuned model: its adapter is the start, and for DPO, frozen, the reference.
    return {"base_model": tuned.base_model, "init_adapter": adapter,
            **({"reference_adapter": adapter} if method in ("dpo", "reinforcement") else {})}


def _lora(lora: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if lora.get("r"):
        fields["lora_r"] = lora["r"]
        fields["lora_alpha"] = lora.get("alpha") or 2 * lora["r"]
    if lora.get("dropout") is not None:
        fields["lora_dropout"] = lora["dropout"]
    if lora.get("target_modules"):
        fields["target_modules"] = tuple(lora["target_modules"])
    if lora.get("layers"):
        fields["lora_layers"] = lora["layers"]
    return fields


def _request_param(param: str | None, method: str) -> str | None:
    """The request's name for a spec field that failed its check (the others, ``lora.r`` or
    ``full_finetune``, are named alike in both)."""
    if param in (*HYPERPARAMETERS, "beta", "rpo_alpha"):
        return f"method.{method}.hyperparameters.{param}"
    if param == "grader":
        return "method.reinforcement.grader"
    if param in ("group_size", "eval_interval", "eval_samples", "temperature",
                 "hard_prompt_samples"):
        return "method.reinforcement.hyperparameters." + (
            "compute_multiplier" if param == "group_size" else param)
    return param
