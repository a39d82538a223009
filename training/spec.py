"""The one typed object a training run takes (``TrainSpec``) and the resolution of "auto".

Built and validated once at the edge: for a job, by ``service.jobs.spec.build_spec`` when the job
is created, then stored in the job record (``to_dict``, versioned) and read from there by the
driver; for ``tuneserve train spec.json``, from the file (``from_dict``). Ray Train workers get
the object itself in ``train_loop_config["spec"]``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from service.core import limits
from service.core.errors import InvalidRequest

Auto = Literal["auto"]
Method = Literal["supervised", "dpo", "reinforcement"]

_JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
_FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")

# Peak learning rates before the caller's multiplier. LoRA adapters start at zero and tolerate
# (and need) a much larger step than full fine-tuning of pretrained weights.
BASE_LR_LORA = 1e-3
BASE_LR_FULL = 2e-5
# DPO needs rates ~20-40x lower: its loss keeps falling by pushing the rejected answers' likelihood
# down without bound, and at the SFT rate the chosen answers fall with them (measured on SmolLM2:
# preference accuracy 1.0 but every answer ran to the length cap). TRL's LoRA DPO recipes use
# 5e-6..5e-5; full-model DPO uses ~5e-7.
BASE_LR_DPO_LORA = 5e-5
BASE_LR_DPO_FULL = 5e-7
# Reinforcement (GRPO) moves the policy by its own samples: a step that changes the answers'
# likelihoods a lot makes the next rollouts off-policy. TRL's LoRA GRPO recipes use 1e-5..1e-4.
BASE_LR_RFT_LORA = 5e-5
BASE_LR_RFT_FULL = 1e-6
WARMUP_FRACTION = 0.05
MIN_LR_FRACTION = 0.1
"""Cosine decay ends at this fraction of the peak learning rate."""
SPEC_VERSION = 1
"""The version of ``TrainSpec.to_dict``'s form (its ``version`` key). Raise it when a field's
meaning changes, and teach ``from_dict`` to read the older form."""


@dataclass(frozen=True)
class Hyperparameters:
    """Resolved hyperparameters: numbers only, recorded on the job and in the manifest."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    """Peak learning rate = base rate (LoRA or full) × multiplier."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainSpec:
    job_id: str
    """``ftjob-<24 hex>``; names the Ray run, the events and the adapter folder."""
    base_model: str
    """A base model id known to ``training.model.registry.resolve_model``."""
    training_files: tuple[tuple[str, float], ...]
    """``(file_id, weight)`` pairs. A weight is how often each example of that file is seen per
    epoch: 2.0 doubles it, 0.5 samples half of it (a new seeded half every epoch)."""
    method: Method = "supervised"
    validation_file: str | None = None
    n_epochs: int | Auto = "auto"
    batch_size: int | Auto = "auto"
    """Examples per optimizer step, over all workers (the global batch)."""
    learning_rate_multiplier: float | Auto = "auto"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    """Module names that get adapters; None means every linear layer of the model family."""
    lora_layers: int | None = None
    """Adapt only the last N decoder layers (None: all). Nothing below the lowest adapted layer
    needs a gradient, so the backward pass stops there: adapting the top half of SmolLM2-135M
    makes a step a third faster. More than the model has means all of them."""
    full_finetune: bool = False
    """Train all weights instead of a LoRA adapter (small models only)."""
    max_length: int = 2048
    """Tokens per example; longer examples are truncated (never silently: see data.py)."""
    packing: bool = True
    """Pack several examples per row (they do not attend to each other)."""
    pack_length: int = 2048
    """Tokens per packed row (= one micro-batch); an example longer than this gets its own row.
    Attention within a row is per example (``training.model.attention``), so a long row costs no
    quadratic attention: it means fewer, larger matmuls (2048 measured ~8 % faster per token
    than 512 here). Activation memory grows with it; lower it on small-memory GPUs."""
    micro_batch_size: int = 8
    """Examples per micro-batch when packing is off."""
    seed: int = 42
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    """CPUs each worker reserves in Ray; torch uses exactly this many threads."""
    checkpoint_every_steps: int = 50
    """A checkpoint every this many steps (0: none by steps)."""
    checkpoint_every_seconds: float = 300.0
    """And one every this many seconds, whichever comes first (0: none by time): what a lost
    worker can cost stays under ~5 minutes however slow a step is."""
    max_failures: int = 2
    """Worker failures Ray Train recovers from (from the last checkpoint); -1 is unlimited."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = True
    """bf16 autocast where the hardware supports it (AMX/AVX512-bf16 CPUs, bf16 GPUs)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass: activation memory no longer grows
    with the layers (a long example then costs little), for about a third more compute."""
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """``ddp``: every worker holds the whole model and the gradients are summed by hand;
    ``fsdp``: each holds a 1/num_workers shard of the weights, gradients and optimizer state
    (torch's FSDP2, ``training.recipes.sharding``), for models that do not fit one worker."""
    tenant: str = ""
    # Room for DPO (issue 7): used only when method == "dpo".
    beta: float = 0.1
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    """Weight of the chosen answers' mean token NLL added to the DPO loss (RPO, TRL's
    ``rpo_alpha``): DPO alone may lower the chosen answers' likelihood along with the rejected
    ones'; this term holds it up. 0 is plain DPO."""
    # Reinforcement fine-tuning (GRPO, ``training.recipes.grpo``): used only when method ==
    # "reinforcement".
    grader: dict[str, Any] | None = None
    """The reward: an OpenAI grader as JSON (``training.graders``), validated at the edge."""
    group_size: int = 4
    """Completions sampled per prompt; advantages are normalised within each group."""
    max_completion_tokens: int = 128
    """A rollout stops at end-of-turn or after this many tokens."""
    kl_beta: float = 0.04
    """Weight of the KL penalty to the reference (the starting model); 0 skips the reference."""
    clip_epsilon: float = 0.2
    """PPO clip range of the policy ratio."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (their log-probs are taken at it too)."""
    scale_rewards: bool = True
    """Divide each group's advantages by its rewards' standard deviation (False: Dr. GRPO)."""
    hard_prompt_samples: int = 0
    """More completions sampled for a prompt whose group scored alike and below the step's mean
    reward (``training.recipes.grpo.hard_groups``); 0: none."""
    eval_interval: int = 0
    """Grade greedy answers to the validation prompts every this many steps (0: at
    checkpoints only)."""
    eval_samples: int | None = None
    """Validation prompts graded each time (None: all)."""
    init_adapter: str | None = None
    """Storage prefix of an adapter to start from (e.g. ``adapters/<job>/final``)."""
    reference_adapter: str | None = None
    """Storage prefix of the frozen DPO reference adapter; None = the base model."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form settings for later methods; recorded, never interpreted here."""

    # -- derived numbers ---------------------------------------------------------------------

    @property
    def base_learning_rate(self) -> float:
        if self.method == "dpo":
            return BASE_LR_DPO_FULL if self.full_finetune else BASE_LR_DPO_LORA
        if self.method == "reinforcement":
            return BASE_LR_RFT_FULL if self.full_finetune else BASE_LR_RFT_LORA
        return BASE_LR_FULL if self.full_finetune else BASE_LR_LORA

    @property
    def file_ids(self) -> list[str]:
        ids = [file_id for file_id, _ in self.training_files]
        return ids + ([self.validation_file] if self.validation_file else [])

    # -- transport ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus ``version`` (``SPEC_VERSION``): the form a job record stores."""
        return {"version": SPEC_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSpec:
        """Rebuild from ``to_dict`` or from a JSON spec (whose ``version`` may be left out);
        unknown keys and a newer version are errors."""
        values = dict(data)
        version = values.pop("version", SPEC_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version > SPEC_VERSION:
            raise InvalidRequest(f"training spec version {version!r} is not one this tuneserve "
                                 f"reads (1..{SPEC_VERSION})", param="version")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidRequest(f"unknown training spec field(s): {', '.join(unknown)}",
                                 param=unknown[0])
        files = values.get("training_files", ())
        if isinstance(files, str):
            files = [(files, 1.0)]
        values["training_files"] = tuple(
            (f, 1.0) if isinstance(f, str) else (str(f[0]), float(f[1])) for f in files)
        if values.get("target_modules") is not None:
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)

    def resolved(self, n_examples: int, n_tokens: int) -> TrainSpec:
        """This spec with numbers for every "auto" (``resolve_hyperparameters``)."""
        hp = resolve_hyperparameters(self, n_examples, n_tokens)
        return dataclasses.replace(self, n_epochs=hp.n_epochs, batch_size=hp.batch_size,
                                   learning_rate_multiplier=hp.learning_rate_multiplier)

    # -- checks ------------------------------------------------------------------------------

    def validate(self) -> TrainSpec:
        """Raise one ``InvalidRequest`` listing every problem (``param`` names the first)."""
        problems = list(self._problems())
        if problems:
            raise InvalidRequest("invalid training spec: " + "; ".join(m for _, m in problems),
                                 param=problems[0][0])
        return self

    def _problems(self):  # -> Iterator[tuple[param, message]]
        if not _JOB_ID.match(self.job_id):
            yield "job_id", f"job_id {self.job_id!r} is not ftjob-<24 hex>"
        if self.method not in ("supervised", "dpo", "reinforcement"):
            yield "method", ("method must be 'supervised', 'dpo' or 'reinforcement', not "
                             f"{self.method!r}")
        if not self.training_files:
            yield "training_files", "at least one training file is needed"
        for file_id, weight in self.training_files:
            if not _FILE_ID.match(file_id):
                yield "training_file", f"file id {file_id!r} is not file-<24 hex>"
            if not weight > 0 or math.isinf(weight):
                yield "training_files", f"weight of {file_id} must be a finite number > 0"
        if self.validation_file is not None and not _FILE_ID.match(self.validation_file):
            yield "validation_file", f"file id {self.validation_file!r} is not file-<24 hex>"
        yield from _check_auto_int("n_epochs", self.n_epochs, 1, limits.MAX_EPOCHS)
        yield from _check_auto_int("batch_size", self.batch_size, 1, limits.MAX_BATCH_SIZE)
        lrm = self.learning_rate_multiplier
        high = limits.MAX_LEARNING_RATE_MULTIPLIER
        if lrm != "auto" and not (isinstance(lrm, (int, float)) and 0 < lrm <= high):
            yield ("learning_rate_multiplier",
                   f"learning_rate_multiplier must be > 0 (≤ {high:g}) or 'auto'")
        yield from self._lora_problems()
        yield from self._run_problems()
        if self.method == "dpo" and not 0 < self.beta <= limits.MAX_BETA:
            yield "beta", f"beta must be in (0, {limits.MAX_BETA:g}], not {self.beta}"
        if self.method == "dpo" and self.full_finetune:
            # The reference is the policy with its adapter disabled: there must be an adapter.
            yield "full_finetune", "DPO trains a LoRA adapter; full_finetune is not supported"
        if self.parallelism not in ("ddp", "fsdp"):
            yield "parallelism", f"parallelism must be 'ddp' or 'fsdp', not {self.parallelism!r}"
        elif self.parallelism == "fsdp" and self.method != "supervised":
            # A sharded model gathers its weights in every pass, on every rank at once; only
            # the supervised recipe keeps its passes in step across ranks (``even_batches``).
            yield "parallelism", f"parallelism 'fsdp' trains supervised jobs only, not {self.method}"
        if self.dpo_loss not in ("sigmoid", "ipo"):
            yield "dpo_loss", f"dpo_loss must be 'sigmoid' or 'ipo', not {self.dpo_loss!r}"
        if not 0 <= self.label_smoothing < 0.5:
            yield "label_smoothing", "label_smoothing must be in [0, 0.5)"
        if not 0 <= self.rpo_alpha <= limits.MAX_RPO_ALPHA:
            yield "rpo_alpha", f"rpo_alpha must be in [0, {limits.MAX_RPO_ALPHA:g}], not {self.rpo_alpha}"
        if self.method == "reinforcement":
            yield from self._reinforcement_problems()

    def _reinforcement_problems(self):
        if not isinstance(self.grader, dict):
            yield "grader", "a reinforcement run needs a grader"
        if not 2 <= self.group_size <= limits.MAX_RFT_GROUP_SIZE:
            yield "group_size", (f"group_size must be in 2..{limits.MAX_RFT_GROUP_SIZE}, "
                                 f"not {self.group_size}")
        if not 1 <= self.max_completion_tokens <= limits.MAX_TOKENS:
            yield "max_completion_tokens", f"max_completion_tokens must be in 1..{limits.MAX_TOKENS}"
        if not 0 <= self.kl_beta <= limits.MAX_BETA:
            yield "kl_beta", f"kl_beta must be in [0, {limits.MAX_BETA:g}]"
        if self.full_finetune and self.kl_beta:
            # The reference is the policy with its adapter disabled: there must be an adapter.
            yield "full_finetune", "full fine-tuning with reinforcement needs kl_beta 0"
        if not 0 < self.clip_epsilon < 1:
            yield "clip_epsilon", "clip_epsilon must be in (0, 1)"
        if not 0 < self.temperature <= 2:
            yield "temperature", "temperature must be in (0, 2]"
        if not 0 <= self.hard_prompt_samples <= limits.MAX_RFT_GROUP_SIZE:
            yield "hard_prompt_samples", ("hard_prompt_samples must be in "
                                          f"0..{limits.MAX_RFT_GROUP_SIZE}")
        if self.eval_interval < 0:
            yield "eval_interval", "eval_interval must be ≥ 0"
        if self.eval_samples is not None and self.eval_samples < 1:
            yield "eval_samples", "eval_samples must be ≥ 1"

    def _lora_problems(self):
        if not self.full_finetune:
            if not 1 <= self.lora_r <= limits.MAX_LORA_RANK:
                yield "lora.r", f"lora r must be in 1..{limits.MAX_LORA_RANK}, not {self.lora_r}"
            if not self.lora_alpha > 0:
                yield "lora.alpha", "lora alpha must be > 0"
            if not 0 <= self.lora_dropout < 1:
                yield "lora.dropout", "lora dropout must be in [0, 1)"
            if self.target_modules is not None and not self.target_modules:
                yield "lora.target_modules", "target_modules must name at least one module"
            if self.lora_layers is not None and not 1 <= self.lora_layers <= limits.MAX_LORA_LAYERS:
                yield "lora.layers", (f"lora layers must be in 1..{limits.MAX_LORA_LAYERS}, "
                                      f"not {self.lora_layers}")

    def _run_problems(self):
        low, high = limits.MIN_CONTEXT_LENGTH, limits.MAX_CONTEXT_LENGTH
        if not low <= self.max_length <= high:
            yield "max_length", f"max_length must be in {low}..{high}, not {self.max_length}"
        if not low <= self.pack_length <= high:
            yield "pack_length", f"pack_length must be in {low}..{high}, not {self.pack_length}"
        if self.micro_batch_size < 1:
            yield "micro_batch_size", "micro_batch_size must be ≥ 1"
        if not 1 <= self.num_workers <= limits.MAX_WORKERS:
            yield "num_workers", f"num_workers must be in 1..{limits.MAX_WORKERS}, not {self.num_workers}"
        if self.cpus_per_worker < 1:
            yield "cpus_per_worker", "cpus_per_worker must be ≥ 1"
        if self.checkpoint_every_steps < 0:
            yield "checkpoint_every_steps", "checkpoint_every_steps must be ≥ 0"
        if not 0 <= self.checkpoint_every_seconds <= limits.MAX_CHECKPOINT_EVERY_SECONDS:
            yield ("checkpoint_every_seconds", "checkpoint_every_seconds must be in "
                   f"0..{limits.MAX_CHECKPOINT_EVERY_SECONDS}")
        if self.max_failures < -1:
            yield "max_failures", "max_failures must be ≥ -1 (-1 = unlimited)"
        if self.max_grad_norm <= 0:
            yield "max_grad_norm", "max_grad_norm must be > 0"


def _check_auto_int(name: str, value: object, low: int, high: int):
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        yield name, f"{name} must be an integer in {low}..{high} or 'auto', not {value!r}"


def resolve_hyperparameters(spec: TrainSpec, n_examples: int, n_tokens: int) -> Hyperparameters:
    """Turn "auto" into numbers from the size of the (weighted) training set.

    The rules follow OpenAI's documented behaviour and aim for a useful adapter in a short run:
    - n_epochs: 3, raised for tiny sets so at least ~400 examples are seen, lowered for large
      sets so about 25k examples (or 10M tokens) are seen at most; never outside 1..50.
    - batch_size: ~1% of the set rounded to a power of two, within 4..32 (fewer than 4 only for
      sets smaller than 4): small enough for many optimizer steps, large enough for packed rows
      that keep the matmuls busy.
    - learning_rate_multiplier: 1 (peak rate 1e-3 for LoRA, 2e-5 for full fine-tuning; for DPO
      5e-5 and 5e-7).
    """
    n_examples = max(n_examples, 1)
    if spec.method == "reinforcement":
        return _rft_hyperparameters(spec, n_examples)
    if spec.n_epochs == "auto":
        epochs = 3
        if n_examples * epochs < 400:
            epochs = min(limits.MAX_EPOCHS, math.ceil(400 / n_examples))
        tokens_per_example = max(n_tokens / n_examples, 1.0)
        cap = min(25_000, 10_000_000 / tokens_per_example)
        if n_examples * epochs > cap:
            epochs = max(1, int(cap // n_examples))
    else:
        epochs = int(spec.n_epochs)
    if spec.batch_size == "auto":
        batch = 2 ** round(math.log2(max(n_examples * 0.01, 1)))
        batch = min(max(batch, 4), 32, n_examples)
    else:
        batch = int(spec.batch_size)
    lrm = 1.0 if spec.learning_rate_multiplier == "auto" else float(spec.learning_rate_multiplier)
    return Hyperparameters(n_epochs=epochs, batch_size=batch, learning_rate_multiplier=lrm,
                           learning_rate=spec.base_learning_rate * lrm)


def _rft_hyperparameters(spec: TrainSpec, n_prompts: int) -> Hyperparameters:
    """Reinforcement's "auto": one epoch of 8 prompts a step. A step costs group_size rollouts
    per prompt, so RFT sets are small and each prompt is seen once or twice."""
    epochs = 1 if spec.n_epochs == "auto" else int(spec.n_epochs)
    batch = min(8, n_prompts) if spec.batch_size == "auto" else int(spec.batch_size)
    lrm = 1.0 if spec.learning_rate_multiplier == "auto" else float(spec.learning_rate_multiplier)
    return Hyperparameters(n_epochs=epochs, batch_size=batch, learning_rate_multiplier=lrm,
                           learning_rate=spec.base_learning_rate * lrm)


def examples_per_epoch(n_examples: int, weight: float) -> int:
    """How many examples of a file of ``n_examples`` one epoch sees at ``weight``: each example
    ``weight // 1`` times, plus a sample of ``round(weight % 1 × n)`` (``packing.epoch_order``)."""
    return int(weight // 1) * n_examples + round((weight % 1.0) * n_examples)


def weighted_size(files: Sequence[tuple[int, int, float]]) -> tuple[int, int]:
    """``(examples, tokens)`` one epoch sees of ``(examples, tokens, weight)`` files, what
    "auto" is resolved from: each file counts as often as the data plan draws from it, and
    brings its tokens in proportion."""
    n_examples = n_tokens = 0
    for examples, tokens, weight in files:
        seen = examples_per_epoch(examples, weight)
        n_examples += seen
        n_tokens += round(tokens * seen / examples) if examples else 0
    return n_examples, n_tokens
