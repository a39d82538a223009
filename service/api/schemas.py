"""The body of ``POST /v1/fine_tuning/jobs``: OpenAI's fields, then ours under clear names."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.core import limits
from service.evals.jobs import JobEval

Auto = Literal["auto"]
_SUFFIX = re.compile(r"^[A-Za-z0-9._-]*$")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SupervisedHyperparameters(Strict):
    n_epochs: Annotated[int, Field(ge=1, le=limits.MAX_EPOCHS)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=limits.MAX_BATCH_SIZE)] | Auto = "auto"
    learning_rate_multiplier: Annotated[
        float, Field(gt=0, le=limits.MAX_LEARNING_RATE_MULTIPLIER)] | Auto = "auto"


class DpoHyperparameters(SupervisedHyperparameters):
    beta: Annotated[float, Field(gt=0, le=limits.MAX_BETA)] | Auto = "auto"
    rpo_alpha: Annotated[float, Field(ge=0, le=limits.MAX_RPO_ALPHA)] = 0.0
    """Adds this weight × the chosen answers' mean token NLL to the loss (RPO; 0 = plain DPO)."""


class ReinforcementHyperparameters(SupervisedHyperparameters):
    """OpenAI's ``FineTuneReinforcementHyperparameters``."""

    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"
    """Accepted and ignored: the models served here have no reasoning mode."""
    compute_multiplier: Annotated[float, Field(gt=0, le=10)] | Auto = "auto"
    """Scales the completions sampled per prompt (the group size, 4 at 1)."""
    eval_interval: Annotated[int, Field(ge=1)] | Auto = "auto"
    eval_samples: Annotated[int, Field(ge=1)] | Auto = "auto"
    temperature: Annotated[float, Field(gt=0, le=2)] | Auto = "auto"
    """Our extension: the rollouts' sampling temperature ("auto": 1); their log-probs in the
    loss are taken at it too."""
    scale_rewards: bool = True
    """Our extension (TRL's name): divide each group's advantages by its rewards' standard
    deviation; False is Dr. GRPO's (``training.losses.grpo.group_advantages``)."""
    hard_prompt_samples: Annotated[int, Field(ge=0, le=limits.MAX_RFT_GROUP_SIZE)] = 0
    """Our extension: this many more completions for a prompt whose group scored alike and
    below the step's mean reward, so a prompt the policy rarely gets right can still teach
    (``training.recipes.grpo.hard_groups``); 0: none."""


class ReinforcementMethod(Strict):
    grader: dict
    """Any grader of ``/v1/fine_tuning/alpha/graders`` (checked by ``training.graders``)."""
    hyperparameters: ReinforcementHyperparameters = Field(
        default_factory=ReinforcementHyperparameters)


class SupervisedMethod(Strict):
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class DpoMethod(Strict):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None

    @model_validator(mode="after")
    def _matching_section(self) -> Method:
        for other in ("supervised", "dpo", "reinforcement"):
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(f"method.{other} is given but method.type is {self.type!r}")
        if self.type == "reinforcement" and self.reinforcement is None:
            raise ValueError("method.reinforcement with a grader is required when method.type "
                             "is 'reinforcement'")
        return self


class LoraSettings(Strict):
    """LoRA adapter shape (our extension)."""

    r: int = Field(default=16, ge=1, le=limits.MAX_LORA_RANK)
    alpha: float | None = Field(default=None, gt=0)
    """Scaling numerator; None means 2·r."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | None = None
    """Module names to adapt; None means every linear layer of the model family."""
    layers: int | None = Field(default=None, ge=1, le=limits.MAX_LORA_LAYERS)
    """Adapt only the last N decoder layers (faster steps: the backward pass stops below them);
    None means all."""

    @field_validator("target_modules")
    @classmethod
    def _names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value or any(not re.fullmatch(r"[A-Za-z0-9_.]{1,64}", m) for m in value):
                raise ValueError("target_modules must be a non-empty list of module names")
        return value


class WeightedFile(Strict):
    file: str = Field(max_length=64)
    weight: float = Field(default=1.0, gt=0, le=limits.MAX_FILE_WEIGHT)


class CreateJobRequest(Strict):
    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    hyperparameters: SupervisedHyperparameters | None = None
    """Deprecated by OpenAI in favour of ``method``; still accepted for supervised jobs."""
    method: Method | None = None
    suffix: str | None = Field(default=None, max_length=64)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[dict] | None = None

    # Our extensions.
    lora: LoraSettings | None = None
    full_finetune: bool = False
    """Train every weight instead of a LoRA adapter (small models only)."""
    num_workers: int = Field(default=1, ge=1, le=limits.MAX_WORKERS)
    use_gpu: bool = False
    activation_checkpointing: bool = False
    """Recompute each layer in the backward pass: ~0.6x the memory for ~0.7x the speed."""
    parallelism: Literal["ddp", "fsdp"] | None = None
    """``fsdp`` shards the weights, gradients and optimizer state over the workers (supervised
    jobs); None: ``ddp`` while one worker fits the job, else ``fsdp``."""
    dry_run: bool = False
    """Return the job's estimate (memory per worker, tokens, seconds, cost) and create nothing."""
    training_files: list[WeightedFile] | None = Field(default=None,
                                                      max_length=limits.MAX_TRAINING_FILES)
    """Extra training files mixed with ``training_file`` by weight."""
    checkpoint_every_steps: int | None = Field(default=None, ge=1,
                                               le=limits.MAX_CHECKPOINT_EVERY_STEPS)
    checkpoint_every_seconds: float | None = Field(
        default=None, ge=limits.MIN_CHECKPOINT_EVERY_SECONDS,
        le=limits.MAX_CHECKPOINT_EVERY_SECONDS)
    """A checkpoint every this many steps or seconds, whichever comes first (defaults: 50
    steps, 300 s): a lost worker costs at most the work since the last one."""
    webhook_url: str | None = Field(default=None, max_length=2048)
    """Also announce this job's end here: a signed webhook (``service.jobs.webhooks``)."""
    evaluation: JobEval | None = Field(default=None, alias="eval")
    """An eval run before training and after it (``service.evals.jobs``)."""

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value is not None and not _SUFFIX.match(value):
            raise ValueError("suffix may hold only letters, digits, '.', '_' and '-'")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError("metadata holds at most 16 key-value pairs")
        for key, item in value.items():
            if not key or len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys are 1-64 characters, values at most 512")
            if not (_is_text(key) and _is_text(item)):
                # A lone surrogate ("\\ud800") is stored fine but cannot be sent back as UTF-8.
                raise ValueError("metadata holds an unpaired UTF-16 surrogate, which is not text")
        return value

    @field_validator("integrations")
    @classmethod
    def _integrations(cls, value: list[dict] | None) -> list[dict] | None:
        if value:
            raise ValueError("integrations are not supported by this service")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, value: str | None) -> str | None:
        # The shape only; where it resolves is checked with the settings (SSRF) by the route.
        if value is not None and not re.match(r"^https?://[^/?#\s]+[^\s]*$", value):
            raise ValueError("webhook_url must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _one_source_of_hyperparameters(self) -> CreateJobRequest:
        if self.hyperparameters is not None and self.method is not None:
            raise ValueError("give hyperparameters inside method, not both at the top level and in method")
        return self

    def resolved_method(self) -> dict:
        """The method as OpenAI reports it, with the deprecated top-level form folded in."""
        if self.method is None:
            hp = self.hyperparameters or SupervisedHyperparameters()
            return {"type": "supervised", "supervised": {"hyperparameters": hp.model_dump()}}
        section = getattr(self.method, self.method.type) or (
            SupervisedMethod() if self.method.type == "supervised" else DpoMethod())
        if self.method.type == "reinforcement":
            return {"type": "reinforcement", "reinforcement": section.model_dump(mode="json")}
        return {"type": self.method.type, self.method.type: section.model_dump()}
