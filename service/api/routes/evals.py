"""``/v1/evals``: OpenAI's Evals API — evals (a data schema and testing criteria) and their
runs (a model sampled on a data source, every answer graded).

Everything a run could trip on is checked here, at ``POST …/runs``: the data source's shape,
that the tenant may use the model and every judge, that every item fits the eval's
``item_schema`` and has every field the templates name. A run that starts has only the chat
engine left to fail. The run itself goes off the API replica (``service.evals.runner``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from service.api.auth import get_tenant
from service.api.routes.graders import parse_grader, resolve_judges
from service.core import limits, names
from service.core.errors import Conflict, InvalidRequest, NotFound
from service.evals import datasource, runner
from service.evals.store import FINISHED, EvalRecord, EvalStore, RunRecord, Target
from training.graders import templates
from training.graders.grade import GraderInvalid, template_fields, validate

router = APIRouter(tags=["evals"])
Tenant = Annotated[str, Depends(get_tenant)]


def _store(request: Request) -> EvalStore:
    return EvalStore(request.app.state.storage)


Store = Annotated[EvalStore, Depends(_store)]


class CustomDataSourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["custom"]
    item_schema: dict[str, Any]
    include_sample_schema: bool = False


class CreateEvalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None
    data_source_config: CustomDataSourceConfig
    testing_criteria: list[dict[str, Any]] = Field(min_length=1,
                                                   max_length=limits.MAX_TESTING_CRITERIA)


class UpdateEvalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None


class CreateEvalRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None
    data_source: dict[str, Any]


def _page(objects: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    ids = [o["id"] for o in objects]
    start = ids.index(after) + 1 if after in ids else 0
    data = objects[start:start + limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": start + limit < len(objects)}


def _item_fields(schema: dict[str, Any]):
    """Whether an ``item.…`` path exists in ``schema`` (free-form objects allow any)."""
    def exists(path: str) -> bool:
        node = schema
        for part in path.split(".")[1:]:
            if node.get("type") == "array" and part.isdigit():
                node = node.get("items", {})
                continue
            props = node.get("properties")
            if props is None:
                return True  # no declared fields: anything may be there
            if part not in props:
                return False
            node = props[part]
        return True
    return exists


# -- evals -----------------------------------------------------------------------------------


@router.post("/evals")
async def create_eval(body: CreateEvalRequest, request: Request, tenant: Tenant,
                      store: Store) -> dict[str, Any]:
    from jsonschema import Draft202012Validator, SchemaError

    schema = body.data_source_config.item_schema
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequest(f"item_schema is not a JSON Schema: {exc.message}.",
                             param="data_source_config.item_schema",
                             code="invalid_item_schema") from None
    criteria = []
    for i, raw in enumerate(body.testing_criteria):
        param = f"testing_criteria.{i}"
        grader = parse_grader(raw, param)
        try:
            validate(grader, param, _item_fields(schema))
        except GraderInvalid as exc:
            raise InvalidRequest(str(exc), param=exc.param, code="invalid_grader") from None
        await run_in_threadpool(resolve_judges, request, grader, tenant, param)
        criteria.append(raw)
    names_seen = [c["name"] for c in criteria]
    if len(set(names_seen)) != len(names_seen):
        raise InvalidRequest("Each testing criterion needs a name of its own (results are "
                             "reported by name).", param="testing_criteria",
                             code="duplicate_name")
    created_ns = time.time_ns()
    record = EvalRecord(id=names.new_eval_id(), name=body.name or "eval",
                        created_at=created_ns // 10**9, created_ns=created_ns,
                        data_source_config=body.data_source_config.model_dump(),
                        testing_criteria=criteria, metadata=body.metadata, tenant=tenant)
    await run_in_threadpool(store.create, record)
    return record.public()


@router.get("/evals")
def list_evals(tenant: Tenant, store: Store, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=100)] = 20,
               order: Literal["asc", "desc"] = "asc",
               order_by: Literal["created_at", "updated_at"] = "created_at") -> dict[str, Any]:
    evals = [e.public() for e in store.list(tenant)]
    return _page(evals[::-1] if order == "desc" else evals, after, limit)


@router.get("/evals/{eval_id}")
def retrieve_eval(eval_id: str, tenant: Tenant, store: Store) -> dict[str, Any]:
    return store.get(eval_id, tenant).public()


@router.post("/evals/{eval_id}")
def update_eval(eval_id: str, body: UpdateEvalRequest, tenant: Tenant,
                store: Store) -> dict[str, Any]:
    return store.rename(store.get(eval_id, tenant), body.name, body.metadata).public()


@router.delete("/evals/{eval_id}")
def delete_eval(eval_id: str, tenant: Tenant, store: Store) -> dict[str, Any]:
    record = store.get(eval_id, tenant)
    for run in store.list_runs(eval_id):
        _cancel(store, run)
    store.delete(record)
    return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}


# -- runs ------------------------------------------------------------------------------------


def _source(raw: dict[str, Any]) -> datasource.CompletionsSource:
    kind = raw.get("type")
    if kind != "completions":
        raise InvalidRequest(f"Data source type {kind!r} is not supported: this service runs "
                             "'completions' (a model sampled on your items).",
                             param="data_source.type", code="unsupported_data_source")
    try:
        return datasource.CompletionsSource.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-",)))
        raise InvalidRequest(f"Invalid data_source: {first['msg']} at data_source.{loc}.",
                             param=f"data_source.{loc}", code="invalid_data_source") from None


def prepare_run(request: Request, tenant: str, record: EvalRecord,
                body: CreateEvalRunRequest) -> RunRecord:
    """The run's record, every check done (see the module docstring); not yet stored."""
    from service.api.routes.models import resolve_model

    source = _source(body.data_source)
    try:
        target = resolve_model(request, source.model, tenant)
    except NotFound as exc:
        raise NotFound(exc.message, param="data_source.model", code=exc.code) from None
    targets = {source.model: Target(base_model=target.base_model, adapter_id=target.adapter_id)}
    criteria = [parse_grader(raw, f"testing_criteria.{i}")
                for i, raw in enumerate(record.testing_criteria)]
    for i, grader in enumerate(criteria):
        targets.update(resolve_judges(request, grader, tenant, f"testing_criteria.{i}"))
    run = RunRecord(id=names.new_eval_run_id(), eval_id=record.id,
                    name=body.name or f"{source.model} on {record.name}", model=source.model,
                    created_at=int(time.time()), data_source=source.model_dump(mode="json", exclude_none=True),
                    metadata=body.metadata, tenant=tenant, targets=targets)
    try:
        items = runner.load_items(request.app.state.storage, run)
    except NotFound as exc:
        raise NotFound(exc.message, param="data_source.source.id", code=exc.code) from None
    if len(items) > limits.MAX_EVAL_ITEMS:
        raise InvalidRequest(f"The data source holds {len(items)} items; a run takes at most "
                             f"{limits.MAX_EVAL_ITEMS}.", param="data_source.source",
                             code="too_many_items")
    datasource.check_items(items, record.data_source_config["item_schema"],
                           "data_source.source")
    _check_templates(source, record, criteria, items)
    return run.model_copy(update={"items": len(items)})


def _check_templates(source, record: EvalRecord, criteria, items: list[dict[str, Any]]) -> None:
    """Every ``item.…`` a template names is in every item: a 400 naming the first that is not."""
    where = [("data_source.input_messages", m.text()) for m in
             getattr(source.input_messages, "template", [])]
    for i, grader in enumerate(criteria):
        subs = grader.named().items() if grader.type == "multi" else [("", grader)]
        for name, sub in subs:
            prefix = f"testing_criteria.{i}" + (f".graders.{name}" if name else "")
            where += [(f"{prefix}.{field}", t) for field, t in template_fields(sub)]
    paths = [(param, p) for param, t in where for p in templates.paths(t)
             if p.startswith("item.")]
    for number, item in enumerate(items, 1):
        for param, path in paths:
            try:
                templates.lookup(path, {"item": item})
            except templates.TemplateError:
                raise InvalidRequest(f"Item {number} has no {path!r}, which {param} names.",
                                     param=param, code="invalid_template") from None


@router.post("/evals/{eval_id}/runs", status_code=201)
async def create_run(eval_id: str, body: CreateEvalRunRequest, request: Request,
                     tenant: Tenant, store: Store) -> dict[str, Any]:
    record = await run_in_threadpool(store.get, eval_id, tenant)
    run = await run_in_threadpool(prepare_run, request, tenant, record, body)
    await run_in_threadpool(store.create_run, run)
    runner.start(request.app, eval_id, run.id)
    return run.public()


@router.get("/evals/{eval_id}/runs")
def list_runs(eval_id: str, tenant: Tenant, store: Store, after: str | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20,
              order: Literal["asc", "desc"] = "asc",
              status: Literal["queued", "in_progress", "completed", "canceled", "failed"]
              | None = None) -> dict[str, Any]:
    store.get(eval_id, tenant)
    runs = [r.public() for r in store.list_runs(eval_id)
            if r.tenant == tenant and status in (None, r.status)]
    return _page(runs[::-1] if order == "desc" else runs, after, limit)


@router.get("/evals/{eval_id}/runs/{run_id}")
def retrieve_run(eval_id: str, run_id: str, tenant: Tenant, store: Store) -> dict[str, Any]:
    store.get(eval_id, tenant)
    return store.get_run(eval_id, run_id, tenant).public()


def _cancel(store: EvalStore, run: RunRecord) -> RunRecord:
    return store.update_run(run.eval_id, run.id, lambda r: r.model_copy(update={
        "status": "canceled", "finished_at": int(time.time())}))


@router.post("/evals/{eval_id}/runs/{run_id}")
def cancel_run(eval_id: str, run_id: str, tenant: Tenant, store: Store) -> dict[str, Any]:
    store.get(eval_id, tenant)
    run = store.get_run(eval_id, run_id, tenant)
    if run.status in FINISHED:
        raise Conflict(f"Run {run_id} is {run.status}; only a queued or running run can be "
                       "cancelled.", param="run_id", code="invalid_state")
    return _cancel(store, run).public()


@router.delete("/evals/{eval_id}/runs/{run_id}")
def delete_run(eval_id: str, run_id: str, tenant: Tenant, store: Store) -> dict[str, Any]:
    store.get(eval_id, tenant)
    run = _cancel(store, store.get_run(eval_id, run_id, tenant))
    store.storage.delete_prefix(names.eval_items_prefix(eval_id, run.id))
    store.storage.delete(names.eval_run_key(eval_id, run.id))
    return {"object": "eval.run.deleted", "deleted": True, "run_id": run_id}


@router.get("/evals/{eval_id}/runs/{run_id}/output_items")
def list_output_items(eval_id: str, run_id: str, tenant: Tenant, store: Store,
                      after: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 20,
                      status: Literal["pass", "fail", "error"] | None = None,
                      order: Literal["asc", "desc"] = "asc") -> dict[str, Any]:
    store.get(eval_id, tenant)
    store.get_run(eval_id, run_id, tenant)
    items = sorted(store.items(eval_id, run_id), key=lambda i: i["datasource_item_id"])
    items = [i for i in items if status in (None, i["status"])]
    return _page(items[::-1] if order == "desc" else items, after, limit)


@router.get("/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}")
def retrieve_output_item(eval_id: str, run_id: str, output_item_id: str, tenant: Tenant,
                         store: Store) -> dict[str, Any]:
    store.get(eval_id, tenant)
    store.get_run(eval_id, run_id, tenant)
    for item in store.items(eval_id, run_id):
        if item["id"] == output_item_id:
            return item
    raise NotFound(f"No output item with id {output_item_id[:80]!r} in run {run_id}.",
                   param="output_item_id")
