"""``POST /v1/fine_tuning/alpha/graders/run`` and ``/validate``: OpenAI's grader endpoints.

Grading runs here, in the API replica, because it is one answer: string and similarity checks
take microseconds, and a model grader's judge is a chat request to the chat deployment through
the app's chat back end (so it is batched there and counted in ``/metrics``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from service.api.auth import get_tenant
from service.core.errors import InvalidRequest, NotFound
from service.evals.judge import ChatJudge
from service.evals.store import Target
from training import graders
from training.graders import Sample, TemplateError
from training.graders.grade import GRADER, judge_models

router = APIRouter(tags=["graders"])
Tenant = Annotated[str, Depends(get_tenant)]


class ValidateGraderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any]


class RunGraderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any]
    item: dict[str, Any] = Field(default_factory=dict)
    model_sample: str


def parse_grader(raw: dict[str, Any], param: str = "grader") -> graders.Grader:
    try:
        return graders.parse(raw, param)
    except graders.GraderInvalid as exc:
        raise InvalidRequest(str(exc), param=exc.param, code="invalid_grader") from None


def resolve_judges(request: Request, grader: graders.Grader, tenant: str,
                   param: str) -> dict[str, Target]:
    """Every judge model of ``grader`` as this tenant may use it (404 naming the field)."""
    from service.api.routes.models import resolve_model

    targets = {}
    for model in judge_models(grader):
        try:
            target = resolve_model(request, model, tenant)
        except NotFound as exc:
            raise NotFound(exc.message, param=f"{param}.model", code=exc.code) from None
        targets[model] = Target(base_model=target.base_model, adapter_id=target.adapter_id)
    return targets


@router.post("/fine_tuning/alpha/graders/validate")
async def validate_grader(body: ValidateGraderRequest, request: Request,
                          tenant: Tenant) -> dict[str, Any]:
    grader = parse_grader(body.grader)
    await run_in_threadpool(resolve_judges, request, grader, tenant, "grader")
    return {"grader": GRADER.dump_python(grader, mode="json", exclude_unset=True)}


@router.post("/fine_tuning/alpha/graders/run")
async def run_grader(body: RunGraderRequest, request: Request, tenant: Tenant) -> dict[str, Any]:
    grader = parse_grader(body.grader)
    targets = await run_in_threadpool(resolve_judges, request, grader, tenant, "grader")
    chat = request.app.state.chat
    if targets and chat is None:
        raise InvalidRequest(f"{grader.type} needs chat completions, which are not enabled on "
                             "this server.", param="grader.model", code="chat_disabled")
    judge = ChatJudge(chat, targets, request.app.state.settings.max_tokens_cap)
    started = time.perf_counter()
    try:
        result = await graders.grade(grader, body.item, Sample(body.model_sample), judge)
    except TemplateError as exc:
        raise InvalidRequest(str(exc), param=exc.path, code="invalid_template") from None
    tokens = sum(u["total_tokens"] for u in result.usage.values())
    return {
        "reward": result.score,
        "metadata": {"name": result.name, "type": result.type, "errors": result.errors,
                     "execution_time": time.perf_counter() - started,
                     "scores": {result.name: result.score, **result.sub_scores},
                     "token_usage": tokens if result.usage else None,
                     "sampled_model_name": next(iter(result.usage), None),
                     "passed": result.passed},
        "sub_rewards": result.sub_scores,
        "model_grader_token_usage_per_model": result.usage,
    }
