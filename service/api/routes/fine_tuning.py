"""``/v1/fine_tuning/jobs``: create, list, retrieve, cancel, pause, resume, events, checkpoints."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse

from service.jobs import idempotency, webhooks
from service.jobs.progress import estimated_finish
from service.api.auth import get_tenant
from service.core.errors import Conflict, InvalidRequest, NotFound
from service.api.schemas import CreateJobRequest
from service.jobs.spec import CHECKPOINT_EXTENSIONS, build_spec, training_file_sizes, with_spec
from service.jobs.store import ACTIVE, TERMINAL, JobRecord, JobStore
from service.core import names
from service.core.names import base_model_ids, new_job_id, parse_tuned_model
from service.core.storage import Storage

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])

Tenant = Annotated[str, Depends(get_tenant)]


def _store(request: Request) -> JobStore:
    return JobStore(request.app.state.storage)


Store = Annotated[JobStore, Depends(_store)]


def get_job(job_id: str, tenant: Tenant, store: Store) -> JobRecord:
    """The one place a job id from a path is looked up (404 for another tenant's job)."""
    return store.get(job_id, tenant)


Job = Annotated[JobRecord, Depends(get_job)]


@router.post("")
def create_job(request: Request, body: CreateJobRequest, tenant: Tenant, store: Store,
               idempotency_key: Annotated[str | None, Header(max_length=256)] = None) -> dict:
    storage: Storage = request.app.state.storage
    _check_request(request, body, tenant)
    record = _new_record(storage, body, tenant, request)  # a spec that cannot run: a 400 here
    if body.dry_run:  # the estimate (a job too large for any worker was refused above); no job
        return {"object": "fine_tuning.job.estimate", "model": record.model,
                "method": record.method, "hyperparameters": record.hyperparameters,
                "parallelism": record.spec.parallelism, "num_workers": record.spec.num_workers,
                "estimate": record.extensions.get("estimate")}
    if body.evaluation is not None:
        record.extensions["eval"] = request.state.job_eval
    created: JobRecord | None = None

    def create() -> str:
        nonlocal created
        created = _create_record(store, record)
        return created.id

    if idempotency_key:
        job_id, _ = idempotency.run_once(storage, tenant, idempotency_key,
                                         body.model_dump(mode="json"), create)
    else:
        job_id = create()
    # A new job is answered as created (``validating_files``): the runner may pick it up at once,
    # and the caller should not be told a state that depends on that race. A replayed
    # Idempotency-Key is answered with the job as it is now.
    job = created or store.get(job_id, tenant)
    runner = request.app.state.runner
    if runner is not None:
        runner.wake()
    return _wire(storage, job)


@router.get("")
def list_jobs(tenant: Tenant, store: Store, request: Request,
              after: Annotated[str | None, Query(pattern=names.JOB_ID_PATTERN)] = None, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict:
    # OpenAI's filter: ``metadata[k]=v`` (each pair must match), or ``metadata=null`` for the
    # jobs that have none.
    wanted = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
              if k.startswith("metadata[") and k.endswith("]")}
    bare = request.query_params.get("metadata")
    if bare is not None and (bare != "null" or wanted):
        raise InvalidRequest("Invalid metadata filter: use metadata[key]=value, or metadata=null "
                             "for jobs without metadata.", param="metadata", code="invalid_value")
    jobs = [j for j in store.list(tenant)
            if (not j.metadata if bare == "null"
                else all((j.metadata or {}).get(k) == v for k, v in wanted.items()))]
    page, has_more = _page(jobs, after, limit, key=lambda j: j.id)
    storage: Storage = request.app.state.storage
    return {"object": "list", "data": [_wire(storage, j) for j in page], "has_more": has_more}


@router.get("/{job_id}")
def retrieve_job(request: Request, job: Job) -> dict:
    return _wire(request.app.state.storage, job)


@router.post("/{job_id}/cancel")
def cancel_job(request: Request, job: Job) -> dict:
    if job.status in TERMINAL:
        raise Conflict(f"Job {job.id} has already {job.status}; only an unfinished job can be cancelled.",
                       code="invalid_state")
    return _wire(request.app.state.storage, _runner(request).cancel(job.id))


@router.post("/{job_id}/pause")
def pause_job(request: Request, job: Job) -> dict:
    if job.status not in ("queued", "running"):
        raise Conflict(f"Job {job.id} is {job.status}; only a queued or running job can be paused.",
                       code="invalid_state")
    return _wire(request.app.state.storage, _runner(request).pause(job.id))


@router.post("/{job_id}/resume")
def resume_job(request: Request, job: Job, store: Store) -> dict:
    if job.status != "paused":
        raise Conflict(f"Job {job.id} is {job.status}; only a paused job can be resumed.",
                       code="invalid_state")
    resumed = store.transition(job.id, "queued")
    _runner(request).wake()
    return _wire(request.app.state.storage, resumed)


@router.get("/{job_id}/events")
async def list_events(request: Request, job: Job,
                      after: Annotated[str | None, Query(pattern=r"^ftevent-\d+-\d+$")] = None,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 20,
                      stream: bool = False):
    storage: Storage = request.app.state.storage
    if stream:
        return StreamingResponse(_event_stream(request, storage, job.id),
                                 media_type="text/event-stream")
    page, has_more = await asyncio.to_thread(read_event_page, storage, job.id, after, limit)
    return {"object": "list", "data": page, "has_more": has_more}


@router.get("/{job_id}/checkpoints")
def list_checkpoints(request: Request, job: Job,
                     after: Annotated[str | None, Query(pattern=r"^ftckpt-[0-9a-f]{24}-\d+$")] = None,
                     limit: Annotated[int, Query(ge=1, le=100)] = 10) -> dict:
    checkpoints = read_checkpoints(request.app.state.storage, job)
    page, has_more = _page(checkpoints, after, limit, key=lambda c: c["id"])
    return {"object": "list", "data": page, "has_more": has_more,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}


# --- helpers -------------------------------------------------------------------------------


def _wire(storage: Storage, job: JobRecord) -> dict:
    """The job as OpenAI's ``FineTuningJob``; a running one with ``estimated_finish`` from the
    time its latest steps took (null while not running or not yet measured, as the spec says)."""
    body = job.public()
    estimate = job.extensions.get("estimate")
    body["estimated_finish"] = (estimated_finish(storage, job.id, estimate)
                                if job.status == "running" else None)
    # Our extensions: how the run is spread over its workers, and what it was estimated at.
    body["parallelism"] = job.spec.parallelism if job.spec is not None else "ddp"
    body["estimate"] = estimate
    return body


def _runner(request: Request):
    runner = request.app.state.runner
    if runner is None:
        raise Conflict("This service runs no training (no job runner configured).", code="no_runner")
    return runner


def _check_request(request: Request, body: CreateJobRequest, tenant: str) -> None:
    """Everything that can be checked before the record exists, each failure naming its param."""
    from service.files.store import file_kind, get_file

    settings = request.app.state.settings
    storage: Storage = request.app.state.storage
    tuned = parse_tuned_model(body.model)
    if tuned is not None:
        source = JobStore(storage).get(tuned.job_id, tenant)  # 404 for someone else's model
        if source.status != "succeeded":
            raise InvalidRequest(f"Model {body.model!r} is not ready to be tuned further.",
                                 param="model", code="model_not_available")
        if source.spec.full_finetune if source.spec else source.extensions.get("full_finetune"):
            raise InvalidRequest(f"Model {body.model!r} is a fully fine-tuned model; a job "
                                 "continues from a LoRA adapter only.", param="model",
                                 code="model_not_available")
    elif body.model not in base_model_ids(settings):
        raise InvalidRequest(
            f"Model {body.model!r} is not available for fine-tuning; choose one of "
            f"{', '.join(base_model_ids(settings))}.", param="model", code="model_not_available")
    if body.webhook_url is not None:
        if tenant not in settings.webhook_secrets:
            raise InvalidRequest("webhook_url needs a signing secret for this tenant, and none is "
                                 "configured (TUNESERVE_WEBHOOK_SECRETS).", param="webhook_url",
                                 code="webhooks_not_configured")
        webhooks.check_url(body.webhook_url, settings.webhook_allow_private)
    if body.evaluation is not None:
        from service.evals.jobs import check as check_eval

        request.state.job_eval = check_eval(storage, tenant, body.evaluation)
    method = body.resolved_method()["type"]
    files = [("training_file", body.training_file)]
    files += [(f"training_files[{i}].file", f.file) for i, f in enumerate(body.training_files or [])]
    if body.validation_file:
        files.append(("validation_file", body.validation_file))
    grader = _rft_grader(request, body, tenant) if method == "reinforcement" else None
    for param, file_id in files:
        record = get_file(storage, tenant, file_id, param=param)
        kind = {"preference": "dpo", "prompts": "reinforcement"}.get(file_kind(record) or "",
                                                                     "supervised")
        if kind != method:
            what = {"dpo": "preference pairs", "reinforcement": "reinforcement prompts (messages "
                    "ending with the user's turn)"}.get(kind, "conversations")
            raise InvalidRequest(
                f"File {file_id} holds {what}, which a {method} job cannot train on.",
                param=param, code="invalid_file_format")
        if grader is not None:
            from service.evals.rft import check_items

            check_items(record, grader)


def _rft_grader(request: Request, body: CreateJobRequest, tenant: str):
    """The reinforcement job's grader, parsed and checked; its judges usable by ``tenant``."""
    from service.evals.rft import parse_grader, resolve_judges

    grader = parse_grader(body.method.reinforcement.grader)
    request.state.rft_judges = resolve_judges(request, grader, tenant)
    return grader


def _judge_extensions(request: Request | None) -> dict:
    """A reinforcement grader's judges, resolved for the tenant (``_rft_grader``), and the
    Serve app whose chat deployment answers them (``service.jobs.rft_judge``)."""
    judges = getattr(request.state, "rft_judges", None) if request is not None else None
    if not judges:
        return {}
    from service.evals.jobs import serve_app_name

    return {"rft_judges": {m: t.model_dump() for m, t in judges.items()},
            "serve_app": serve_app_name()}


def _new_record(storage: Storage, body: CreateJobRequest, tenant: str,
                request: Request | None = None) -> JobRecord:
    """The job's record, holding its training spec (``service.jobs.spec.build_spec``).

    Raises:
        InvalidRequest: the spec cannot run; ``param`` names the request's field.
    """
    method = body.resolved_method()
    record = JobRecord(
        id=new_job_id(), created_at=int(time.time()), model=body.model,
        training_file=body.training_file, validation_file=body.validation_file,
        hyperparameters=method[method["type"]]["hyperparameters"], method=method,
        suffix=body.suffix, user_provided_suffix=body.suffix,
        seed=body.seed if body.seed is not None else int(time.time_ns() % (2**31 - 1)),
        metadata=body.metadata, organization_id=tenant, webhook_url=body.webhook_url,
        extensions={
            "lora": (body.lora.model_dump() if body.lora else None),
            "full_finetune": body.full_finetune,
            "num_workers": body.num_workers, "use_gpu": body.use_gpu,
            "activation_checkpointing": body.activation_checkpointing,
            "parallelism": body.parallelism,
            "training_files": [f.model_dump() for f in body.training_files or []],
            **{name: getattr(body, name) for name in CHECKPOINT_EXTENSIONS
               if getattr(body, name) is not None},
            **_judge_extensions(request),
        },
    )
    spec = build_spec(record, training_file_sizes(storage, record))
    if request is not None:  # the parallelism decided, the estimate made, a misfit refused
        from service.jobs.estimate import plan

        spec, estimate = plan(storage, record, spec, request.app.state.settings,
                              body.parallelism)
        if estimate is not None:
            record.extensions["estimate"] = estimate.as_dict()
    return with_spec(record, spec)


def _create_record(store: JobStore, record: JobRecord) -> JobRecord:
    from service.core.events import EventLog

    store.create(record)
    EventLog(store.storage, record.id).add(f"Created fine-tuning job: {record.id}")
    return record


def read_event_page(storage: Storage, job_id: str, after: str | None,
                    limit: int) -> tuple[list[dict], bool]:
    """One page of the job's events, newest first: one listing, then only the page's objects.

    (Reading every event to return twenty made each poll cost one storage read per training
    step so far; fifty pollers on a long job starved the API.)
    """
    from service.core.events import event_id_from_key

    keys = [info.key for info in storage.iter(names.events_prefix(job_id))]
    keys.reverse()  # newest first, as OpenAI lists them
    chosen, has_more = _page(keys, after, limit, key=event_id_from_key)
    return [json.loads(storage.get(key)) for key in chosen], has_more


def read_events(storage: Storage, job_id: str) -> list[dict]:
    """The job's events, oldest first."""
    prefix = names.events_prefix(job_id)
    return [json.loads(storage.get(info.key)) for info in storage.iter(prefix)]


def read_checkpoints(storage: Storage, job: JobRecord) -> list[dict]:
    """The job's checkpoints, newest first, from their adapter manifests."""
    checkpoints = []
    prefix = names.job_adapters_prefix(job.id)
    for info in storage.iter(prefix):
        folder, _, name = info.key[len(prefix):].partition("/")
        step = names.checkpoint_step(folder)
        if name != names.ADAPTER_MANIFEST or step is None:
            continue
        manifest = json.loads(storage.get(info.key))
        metrics = manifest.get("metrics") or {}
        checkpoints.append({
            "object": "fine_tuning.job.checkpoint",
            "id": names.checkpoint_id(job.id, step),
            "created_at": int(info.last_modified.timestamp()),
            "fine_tuned_model_checkpoint":
                names.tuned_model(job.model, job.suffix, job.id, step).name,
            "fine_tuning_job_id": job.id,
            "step_number": step,
            # A metric not measured (no validation file) is absent: the spec has no null here.
            "metrics": {"step": step, **{k: metrics[k] for k in (
                "train_loss", "train_mean_token_accuracy", "valid_loss",
                "valid_mean_token_accuracy", "full_valid_loss", "full_valid_mean_token_accuracy")
                if metrics.get(k) is not None}},
        })
    checkpoints.sort(key=lambda c: c["step_number"], reverse=True)
    return checkpoints


def _page(items: list, after: str | None, limit: int, key) -> tuple[list, bool]:
    """Cursor pagination: the items after the one whose id is ``after``."""
    start = 0
    if after is not None:
        ids = [key(item) for item in items]
        if after not in ids:
            # Well-formed (the pattern checked that) but not in this list: like any id that
            # names nothing the caller can see, "not found".
            raise NotFound(f"Invalid 'after': {after!r} is not in this list.", param="after",
                           code="invalid_cursor")
        start = ids.index(after) + 1
    page = items[start:start + limit]
    return page, start + limit < len(items)


class EventCursor:
    """Where a stream is in a job's events: each ``poll`` returns the ones not yet returned.

    Event keys begin with their creation time (ns), but the job driver and the training worker
    write them from different processes, so one may land a little after a later-stamped one.
    A poll lists from ``LATE_NS`` before the newest event seen and skips what it returned before:
    it stats and reads the last minute's events, not every event of the job twice a second (a
    cost that grew with the job, on the cores the training uses).
    """

    LATE_NS = 60 * 10**9

    def __init__(self, storage: Storage, job_id: str):
        self.storage = storage
        self.job_id = job_id
        self.newest_ns = 0
        self.seen: set[str] = set()

    def poll(self) -> list[dict]:
        from service.core.events import event_created_ns, event_key

        after = None
        if self.newest_ns > self.LATE_NS:
            after = event_key(self.job_id, self.newest_ns - self.LATE_NS, 0)
        events = []
        for info in self.storage.iter(names.events_prefix(self.job_id), after=after):
            if info.key not in self.seen:
                self.seen.add(info.key)
                self.newest_ns = max(self.newest_ns, event_created_ns(info.key))
                events.append(json.loads(self.storage.get(info.key)))
        return events


async def _event_stream(request: Request, storage: Storage, job_id: str):
    """Server-sent events: every event as it is written, until the job ends."""
    cursor = EventCursor(storage, job_id)
    store = JobStore(storage)
    while True:
        for event in await asyncio.to_thread(cursor.poll):
            yield f"data: {json.dumps(event)}\n\n"
        job = await asyncio.to_thread(store.get, job_id)
        if job.status not in ACTIVE and job.status != "paused":
            # One more read after the end so the final events are not lost to the race.
            for event in await asyncio.to_thread(cursor.poll):
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.5)
