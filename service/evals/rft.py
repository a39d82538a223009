"""A reinforcement job's grader, checked against its files when the job is created.

At upload a prompts file (``openai_rft``: messages ending with the user's turn, plus any fields)
is checked alone, no grader being known yet; its description records the fields every line
has (``item_fields``). The job names the grader, so this is where a template ``{{item.…}}``
naming a field some line lacks becomes a 400 naming the grader's field, before any worker
starts (rather than every rollout of that line scoring an error).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from service.api.routes.models import resolve_model
from service.core.errors import InvalidRequest, NotFound
from service.evals.store import Target
from training.graders.grade import GraderInvalid, judge_models, parse, template_fields
from training.graders.specs import Grader, Multi
from training.graders.templates import paths

GRADER_PARAM = "method.reinforcement.grader"


def parse_grader(raw: dict[str, Any]) -> Grader:
    try:
        return parse(raw, GRADER_PARAM)
    except GraderInvalid as exc:
        raise InvalidRequest(str(exc), param=exc.param, code="invalid_grader") from None


def resolve_judges(request: Request, grader: Grader, tenant: str) -> dict[str, Target]:
    """Every judge model of ``grader`` as this tenant may use it (404 naming the field)."""
    targets = {}
    for model in judge_models(grader):
        try:
            target = resolve_model(request, model, tenant)
        except NotFound as exc:
            raise NotFound(exc.message, param=f"{GRADER_PARAM}.model", code=exc.code) from None
        targets[model] = Target(base_model=target.base_model, adapter_id=target.adapter_id)
    return targets


def item_paths(grader: Grader, param: str = GRADER_PARAM) -> list[tuple[str, str]]:
    """``(grader field, item.… path)`` of every item placeholder in the grader's templates."""
    found = [(f"{param}.{where}", path) for where, template in template_fields(grader)
             for path in paths(template) if path.startswith("item.")]
    if isinstance(grader, Multi):
        for name, sub in grader.named().items():
            found += item_paths(sub, f"{param}.graders.{name}")
    return found


def check_items(record: dict[str, Any], grader: Grader) -> None:
    """The file ``record`` (its description) has, on every line, each item field the grader
    reads (the first name of each ``item.…`` path)."""
    fields = set((record.get("description") or {}).get("item_fields") or [])
    for where, path in item_paths(grader):
        name = path.split(".")[1].split("[")[0]
        if name not in fields:
            raise InvalidRequest(
                f"The template {{{{{path}}}}} names the field {name!r}, which not every line of "
                f"file {record['id']} has (every line has: {', '.join(sorted(fields)) or 'none'}).",
                param=where, code="invalid_grader")
