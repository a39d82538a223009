"""Model names as callers write them: base ids and ``ft:<base>:<suffix>:<job_id>[:ckpt-step-N]``.

Torch-free on purpose: the API replica parses names without loading any model code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.core.errors import NotFound
from service.core.settings import Settings

BUILTIN_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_MODEL_ID = "tuneserve/tiny-llama"

_JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
_CKPT = re.compile(r"^ckpt-step-(\d+)$")


def base_model_ids(settings: Settings) -> list[str]:
    builtin = ([BUILTIN_MODEL_ID] if settings.builtin_models else []) + (
        [TINY_MODEL_ID] if settings.tiny_model else [])
    return builtin + [m for m in settings.models if m not in builtin]


def deployment_name(base_model: str) -> str:
    """The Serve deployment serving a base model: ``Chat-<last path part, lower-case>``."""
    slug = re.sub(r"[^a-z0-9.-]+", "-", base_model.rsplit("/", 1)[-1].lower()).strip("-")
    return f"Chat-{slug}"


@dataclass(frozen=True)
class TunedModel:
    base_model: str
    suffix: str
    job_id: str
    step: int | None = None
    """The checkpoint's step, or None for the final adapter."""

    @property
    def name(self) -> str:
        name = f"ft:{self.base_model}:{self.suffix}:{self.job_id}"
        return name if self.step is None else f"{name}:ckpt-step-{self.step}"

    @property
    def adapter_id(self) -> str:
        """The adapter's folder under ``adapters/`` (its multiplexed model id in Serve)."""
        return f"{self.job_id}/final" if self.step is None else f"{self.job_id}/ckpt-step-{self.step}"


def parse_tuned_model(name: str) -> TunedModel | None:
    """Parse ``ft:…``; None for a name that is not a tuned-model name at all."""
    if not name.startswith("ft:"):
        return None
    parts = name.split(":")
    step = None
    if len(parts) == 5 and (m := _CKPT.match(parts[4])):
        step = int(m.group(1))
        parts = parts[:4]
    if len(parts) != 4 or not _JOB_ID.match(parts[3]) or not parts[1]:
        raise NotFound(f"The model {name!r} does not exist.", param="model",
                       code="model_not_found")
    return TunedModel(base_model=parts[1], suffix=parts[2], job_id=parts[3], step=step)
