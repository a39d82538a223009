"""``/v1/data_generation/jobs``: Self-Instruct data generation (a tuneserve extension; OpenAI
has no such endpoint).

A job grows an instruction dataset from an uploaded seed file with a model this service serves
(``service.datagen``): the result is a new training file in the caller's files. Everything a job
could trip on is checked here, at ``POST``: the seed file exists and holds a usable task, the
tenant may use the generator and every judge of the quality grader, the numbers are within
``service.core.limits``. The job itself runs off the API replica (``service.datagen.runner``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from service.api.auth import get_tenant
from service.core import limits, names
from service.core.errors import Conflict, InvalidRequest, NotFound
from service.datagen import runner, seeds
from service.datagen.store import FINISHED, DatagenJob, DatagenStore
from service.evals.jobs import serve_app_name
from service.files import store as file_store
from training.graders.grade import GraderInvalid, validate

router = APIRouter(tags=["data generation (extension)"])
Tenant = Annotated[str, Depends(get_tenant)]
PREFIX = "/data_generation/jobs"
DEFAULT_MAX_TOKENS = 256
GRADED_FIELDS = frozenset({"item.instruction", "item.input", "item.output"})


def _store(request: Request) -> DatagenStore:
    return DatagenStore(request.app.state.storage)


Store = Annotated[DatagenStore, Depends(_store)]


class Sampling(BaseModel):
    """How new instructions are sampled (instances are generated greedily, as the paper)."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.5, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=16, le=limits.MAX_TOKENS)
    """Per generator reply (new instructions; instances too); unset: 256, or the server's
    cap if lower."""
    seed: int = Field(default=42, ge=0, le=2**31 - 1)
    instance_temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """Instances' temperature (0: greedy, as the paper)."""


class Filters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rouge_l_threshold: float = Field(default=0.7, gt=0.0, le=1.0)
    """A candidate with this ROUGE-L or more against any pool instruction is dropped."""
    min_words: int = Field(default=4, ge=1, le=1000)
    max_words: int = Field(default=150, ge=1, le=10_000)
    grader: dict[str, Any] | None = None
    """A quality filter: any grader (``/v1/fine_tuning/alpha/graders``); its item is
    ``{"instruction", "input", "output"}``, its sample the output; a candidate it does not pass
    is dropped."""


class CreateDatagenJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed_file: str
    """A file of yours: Self-Instruct seed tasks (``instruction`` + ``instances``) or any
    instruction format tuneserve reads."""
    model: str
    """The generator: a base model or an ``ft:`` model of yours."""
    count: int = Field(ge=1, le=limits.MAX_DATAGEN_COUNT)
    """Examples to generate (after filtering)."""
    method: Literal["self_instruct"] = "self_instruct"
    sampling: Sampling = Field(default_factory=Sampling)
    filters: Filters = Field(default_factory=Filters)
    prompts_per_round: int = Field(default=16, ge=1, le=limits.MAX_DATAGEN_PROMPTS_PER_ROUND)
    """Instruction prompts sent together (the engine decodes them as one batch)."""
    max_instances_per_task: int = Field(default=1, ge=1, le=5)
    """Examples one generated instruction may give."""
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


def prepare(request: Request, tenant: str, body: CreateDatagenJobRequest) -> DatagenJob:
    """The job's record, every check done; not yet stored."""
    from service.api.routes.graders import parse_grader, resolve_judges
    from service.api.routes.models import resolve_model

    settings = request.app.state.settings
    try:
        target = resolve_model(request, body.model, tenant)
    except NotFound as exc:
        raise NotFound(exc.message, param="model", code=exc.code) from None
    app_name = serve_app_name()
    if app_name is None and request.app.state.chat is None:
        raise InvalidRequest("Data generation needs chat completions, which are not enabled on "
                             "this server.", param="model", code="chat_disabled")
    if body.sampling.max_tokens is None:
        body.sampling.max_tokens = min(DEFAULT_MAX_TOKENS, settings.max_tokens_cap)
    if body.sampling.max_tokens > settings.max_tokens_cap:
        raise InvalidRequest(f"sampling.max_tokens is at most {settings.max_tokens_cap} here.",
                             param="sampling.max_tokens", code="invalid_value")
    if body.filters.min_words > body.filters.max_words:
        raise InvalidRequest("filters.max_words is below filters.min_words.",
                             param="filters.max_words", code="invalid_value")
    judges: dict[str, dict[str, str | None]] = {}
    if body.filters.grader is not None:
        grader = parse_grader(body.filters.grader, "filters.grader")
        try:  # its templates may name only the candidate's fields
            validate(grader, "filters.grader", lambda path: path in GRADED_FIELDS)
        except GraderInvalid as exc:
            raise InvalidRequest(f"{exc} A candidate has item.instruction, item.input and "
                                 "item.output.", param=exc.param, code="invalid_grader") from None
        judges = {m: t.model_dump() for m, t in
                  resolve_judges(request, grader, tenant, "filters.grader").items()}
    file_store.get_file(request.app.state.storage, tenant, body.seed_file, param="seed_file")
    with file_store.open_content(request.app.state.storage, tenant, body.seed_file) as stream:
        tasks, sha = seeds.load(stream.read(), "seed_file")
    created_ns = time.time_ns()
    resolved = body.model_dump(include={"sampling", "filters", "prompts_per_round",
                                        "max_instances_per_task"})
    return DatagenJob(id=names.new_datagen_job_id(), model=body.model, seed_file=body.seed_file,
                      seed_sha256=sha, seed_tasks=len(tasks), count=body.count,
                      created_at=created_ns // 10**9, settings=resolved,
                      metadata=body.metadata, tenant=tenant, created_ns=created_ns,
                      base_model=target.base_model, adapter_id=target.adapter_id,
                      judges=judges, app=app_name)


@router.post(PREFIX, summary="Create a data generation job (Self-Instruct)")
async def create_job(body: CreateDatagenJobRequest, request: Request, tenant: Tenant,
                     store: Store) -> dict[str, Any]:
    job = await run_in_threadpool(prepare, request, tenant, body)
    await run_in_threadpool(store.create, job)
    runner.start(request.app, job.id)
    return job.public()


def _page(objects: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    ids = [o["id"] for o in objects]
    start = ids.index(after) + 1 if after in ids else 0
    data = objects[start:start + limit]
    return {"object": "list", "data": data, "has_more": start + limit < len(objects)}


@router.get(PREFIX, summary="List data generation jobs (newest first)")
def list_jobs(tenant: Tenant, store: Store, after: str | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    return _page([j.public() for j in reversed(store.list(tenant))], after, limit)


@router.get(PREFIX + "/{job_id}", summary="Retrieve a data generation job")
def retrieve_job(job_id: str, tenant: Tenant, store: Store) -> dict[str, Any]:
    return store.get(job_id, tenant).public()


@router.get(PREFIX + "/{job_id}/events",
            summary="A data generation job's events (oldest first; progress and filter counts)")
def list_events(job_id: str, tenant: Tenant, store: Store, after: str | None = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    store.get(job_id, tenant)
    return _page(store.events(job_id), after, limit)


@router.post(PREFIX + "/{job_id}/cancel", summary="Cancel a data generation job")
def cancel_job(job_id: str, tenant: Tenant, store: Store) -> dict[str, Any]:
    job = store.get(job_id, tenant)
    if job.status in FINISHED:
        raise Conflict(f"Job {job_id} is {job.status}; only a queued or running job can be "
                       "cancelled.", param="job_id", code="invalid_state")
    return store.update(job_id, lambda j: j.model_copy(update={
        "status": "cancelled", "finished_at": int(time.time())})).public()
