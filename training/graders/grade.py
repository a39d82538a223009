"""Grade one answer: ``validate`` a grader once, then ``grade`` each (item, sample).

Pure and torch-free, so the API (grader endpoints), the eval runner and training (rewards in
Ray Train workers) share it. A model grader's judge is a ``Judge`` the caller passes: this
module never knows how a model is called (the service passes one that goes through its chat
engine).

Passing: ``string_check`` and ``label_model`` pass on 1.0; the others pass at
``pass_threshold`` if given, else at the top of their range (1.0, or ``range[1]``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import TypeAdapter

from training.graders import multi, templates, text
from training.graders.specs import (
    Grader,
    LabelModel,
    Message,
    Multi,
    SamplingParams,
    ScoreModel,
    StringCheck,
    TextSimilarity,
)

GRADER = TypeAdapter(Grader)
PYTHON_REFUSED = (
    "python graders are not run by this service: user code must run in a sandbox with no "
    "network, no file system beyond a temporary directory and CPU and memory limits, and "
    "rlimits alone give only the last two; namespaces and seccomp need privileges the service's "
    "processes (Ray workers, Kubernetes pods) do not have. Express the check as string_check, "
    "text_similarity, a model grader or a multi formula.")
JUDGE_MAX_TOKENS = 64
"""A judge's answer cap when its sampling_params give none: a score or a label is short."""


class GraderInvalid(ValueError):
    """The grader cannot run as given; ``param`` is the path of the field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class JudgeAnswer:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Judge(Protocol):
    async def __call__(self, model: str, messages: list[dict[str, str]],
                       params: SamplingParams,
                       response_format: dict[str, Any] | None = None) -> JudgeAnswer:
        """The judge ``model``'s answer to ``messages``; with ``response_format`` (the chat
        engine's ``{"type": "json_schema", "schema": …}``) the answer follows it."""
        ...


def label_format(labels: list[str]) -> dict[str, Any]:
    """A label judge answers with one of the labels, as a JSON string: constrained decoding
    makes an off-list or wordy answer impossible rather than a parse error."""
    return {"type": "json_schema", "schema": {"type": "string", "enum": list(labels)}}


ERROR_FLAGS = ("formula_parse_error", "sample_parse_error", "truncated_observation_error",
               "unresponsive_reward_error", "invalid_variable_error", "other_error",
               "python_grader_server_error", "python_grader_runtime_error",
               "model_grader_server_error", "model_grader_refusal_error",
               "model_grader_parse_error")


def no_errors() -> dict[str, Any]:
    return {**{flag: False for flag in ERROR_FLAGS}, "python_grader_server_error_type": None,
            "python_grader_runtime_error_details": None,
            "model_grader_server_error_details": None}


@dataclass
class Result:
    name: str
    type: str
    score: float
    passed: bool
    errors: dict[str, Any] = field(default_factory=no_errors)
    sub_scores: dict[str, float] = field(default_factory=dict)
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per judge model: invocations and tokens."""
    judge_output: str | None = None

    def count(self, model: str, answer: JudgeAnswer) -> None:
        seen = self.usage.setdefault(model, {"invocation_count": 0, "prompt_tokens": 0,
                                             "completion_tokens": 0, "total_tokens": 0,
                                             "cached_tokens": 0})
        seen["invocation_count"] += 1
        seen["prompt_tokens"] += answer.prompt_tokens
        seen["completion_tokens"] += answer.completion_tokens
        seen["total_tokens"] += answer.prompt_tokens + answer.completion_tokens

    @property
    def errored(self) -> bool:
        return any(self.errors[flag] for flag in ERROR_FLAGS)


# -- validation ------------------------------------------------------------------------------


def parse(raw: Any, param: str = "grader") -> Grader:
    """A grader from JSON, refused with the path of the first bad field."""
    from pydantic import ValidationError

    try:
        grader = GRADER.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        parts = [str(p) for p in first["loc"]]
        if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
            parts.append("type")  # the discriminator itself is the field at fault
        loc = ".".join(parts)
        raise GraderInvalid(f"Invalid grader: {first['msg']} at {param}.{loc}".rstrip("."),
                            f"{param}.{loc}".rstrip(".")) from None
    validate(grader, param)
    return grader


def validate(grader: Grader, param: str = "grader",
             item_fields: Callable[[str], bool] | None = None) -> None:
    """Check what the schema cannot: refused metrics and types, template namespaces, formulas.

    ``item_fields(path)`` tells whether an ``item.…`` path exists in the items' schema; None
    leaves item paths to be checked against each item.
    """
    if grader.type == "python":
        raise GraderInvalid(PYTHON_REFUSED, f"{param}.type")
    if isinstance(grader, TextSimilarity) and grader.evaluation_metric in text.UNSUPPORTED:
        raise GraderInvalid(text.UNSUPPORTED[grader.evaluation_metric],
                            f"{param}.evaluation_metric")
    if isinstance(grader, (ScoreModel, LabelModel)):
        for i, message in enumerate(grader.input):
            for j, part in enumerate(message.parts()):
                if part.type == "input_image":
                    raise GraderInvalid("Images are not supported: the models this service "
                                        "serves read text only.",
                                        f"{param}.input.{i}.content.{j}")
    for where, template in template_fields(grader):
        try:
            templates.check_namespaces(template)
        except templates.TemplateError as exc:
            raise GraderInvalid(str(exc), f"{param}.{where}") from None
        for path in templates.paths(template):
            if item_fields and path.startswith("item.") and not item_fields(path):
                raise GraderInvalid(f"The template {{{{{path}}}}} names a field the eval's "
                                    "item_schema does not have.", f"{param}.{where}")
    if isinstance(grader, Multi):
        named = grader.named()
        try:
            multi.parse(grader.calculate_output, set(named))
        except multi.FormulaError as exc:
            raise GraderInvalid(str(exc), f"{param}.calculate_output") from None
        for name, sub in named.items():
            validate(sub, f"{param}.graders.{name}", item_fields)


def judge_models(grader: Grader) -> list[str]:
    """The models a grader calls as judges (to check the caller may use them)."""
    if isinstance(grader, Multi):
        return [m for sub in grader.named().values() for m in judge_models(sub)]
    return [grader.model] if isinstance(grader, (ScoreModel, LabelModel)) else []


def template_fields(grader: Grader) -> list[tuple[str, str]]:
    if isinstance(grader, (StringCheck, TextSimilarity)):
        return [("input", grader.input), ("reference", grader.reference)]
    if isinstance(grader, (ScoreModel, LabelModel)):
        return [(f"input.{i}.content", m.text()) for i, m in enumerate(grader.input)]
    return []


# -- grading ---------------------------------------------------------------------------------


async def grade(grader: Grader, item: dict[str, Any], sample: templates.Sample,
                judge: Judge | None = None) -> Result:
    """Score one sample. A template naming a missing field raises ``TemplateError``."""
    space = {"item": item, "sample": sample.namespace()}
    kind = grader.type
    if isinstance(grader, StringCheck):
        score = text.string_check(grader, templates.render(grader.input, space),
                                  templates.render(grader.reference, space))
        return Result(grader.name, kind, score, score == 1.0)
    if isinstance(grader, TextSimilarity):
        score = text.text_similarity(grader.evaluation_metric,
                                     templates.render(grader.input, space),
                                     templates.render(grader.reference, space))
        return Result(grader.name, kind, score, _passes(score, grader.pass_threshold, 1.0))
    if isinstance(grader, (ScoreModel, LabelModel)):
        if judge is None:
            raise GraderInvalid(f"{kind} needs a judge model and none is available here.",
                                "grader.model")
        return await _model_grade(grader, space, judge)
    if isinstance(grader, Multi):
        return await _multi_grade(grader, item, sample, judge)
    raise GraderInvalid(PYTHON_REFUSED, "grader.type")


def _passes(score: float, threshold: float | None, top: float) -> bool:
    return score >= (top if threshold is None else threshold)


async def _model_grade(grader: ScoreModel | LabelModel, space: dict[str, Any],
                       judge: Judge) -> Result:
    messages = [_render_message(m, space) for m in grader.input]
    params = grader.sampling_params if isinstance(grader, ScoreModel) and \
        grader.sampling_params else SamplingParams()
    params = params.model_copy(update={
        "temperature": 0.0 if params.temperature is None else params.temperature,
        "max_completion_tokens": params.token_cap() or JUDGE_MAX_TOKENS})
    low = grader.bounds()[0] if isinstance(grader, ScoreModel) else 0.0
    result = Result(grader.name, grader.type, low, False)
    try:
        answer = await judge(grader.model, messages, params, response_format=None
                             if isinstance(grader, ScoreModel) else label_format(grader.labels))
    except Exception as exc:
        if isinstance(exc, GraderInvalid) or getattr(exc, "status", 500) < 500:
            raise  # the caller's mistake (a model it may not use): its 4xx, not a score
        result.errors.update(model_grader_server_error=True,
                             model_grader_server_error_details=str(exc)[:500])
        return result
    result.count(grader.model, answer)
    result.judge_output = answer.text
    if isinstance(grader, ScoreModel):
        score = parse_score(answer.text, *grader.bounds())
        if score is None:
            result.errors["model_grader_parse_error"] = True
            return result
        result.score = score
        result.passed = _passes(score, grader.pass_threshold, grader.bounds()[1])
        return result
    label = parse_label(answer.text, grader.labels)
    if label is None:
        result.errors["model_grader_parse_error"] = True
        return result
    result.score = 1.0 if label in grader.passing_labels else 0.0
    result.passed = result.score == 1.0
    return result


def _render_message(message: Message, space: dict[str, Any]) -> dict[str, str]:
    role = "system" if message.role == "developer" else message.role
    return {"role": role, "content": templates.render(message.text(), space)}


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(answer: str, low: float, high: float) -> float | None:
    """The judge's score: a JSON number or ``{"result"|"score": n}``, else the first number in
    the text; None when there is none or it lies outside [low, high]."""
    value: Any = None
    try:
        parsed = json.loads(answer)
        value = parsed.get("result", parsed.get("score")) if isinstance(parsed, dict) else parsed
    except ValueError:
        match = _NUMBER.search(answer)
        value = float(match.group()) if match else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if low <= value <= high else None


def parse_label(answer: str, labels: list[str]) -> str | None:
    """The label the judge gave: the whole answer (or the JSON string it is), else the label
    named first in it."""
    try:
        value = json.loads(answer)
        answer = value if isinstance(value, str) else answer
    except ValueError:
        pass
    said = answer.strip().strip(".\"'").casefold()
    for label in labels:
        if said == label.casefold():
            return label
    found = [(m.start(), label) for label in labels
             if (m := re.search(rf"\b{re.escape(label.casefold())}\b", said))]
    return min(found)[1] if found else None


async def _multi_grade(grader: Multi, item: dict[str, Any], sample: templates.Sample,
                       judge: Judge | None) -> Result:
    import asyncio

    named = grader.named()
    # One grade per distinct sub-grader (a listed one may go by two names).
    distinct = {id(sub): sub for sub in named.values()}
    graded = dict(zip(distinct, await asyncio.gather(
        *(grade(sub, item, sample, judge) for sub in distinct.values())), strict=True))
    scores = {name: graded[id(sub)].score for name, sub in named.items()}
    result = Result(grader.name, grader.type, 0.0, False, sub_scores=scores)
    for sub in graded.values():
        for model, used in sub.usage.items():
            mine = result.usage.setdefault(model, dict.fromkeys(used, 0))
            for key, n in used.items():
                mine[key] += n
        for flag in ERROR_FLAGS:
            result.errors[flag] |= sub.errors[flag]
    try:
        result.score = multi.evaluate(multi.parse(grader.calculate_output, set(named)), scores)
    except (multi.FormulaError, ArithmeticError, ValueError):
        result.errors["formula_parse_error"] = True
        return result
    result.passed = _passes(result.score, grader.pass_threshold, 1.0)
    return result

