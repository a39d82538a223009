"""``/v1/models``: the base models, and the caller's tuned models and checkpoints.

A tuned model (``ft:<base>:<suffix>:<job_id>``) exists for a tenant while its job record
belongs to that tenant and its adapter is complete in storage (``manifest.json`` present);
a checkpoint (``…:ckpt-step-N``) likewise with its own adapter folder. Another tenant's model
is "not found", never "forbidden": we do not confirm that it exists.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from service.api.auth import get_tenant
from service.core import names
from service.core.errors import InvalidRequest, NotFound
from service.core.names import TunedModel, base_model_ids, parse_tuned_model
from service.core.storage import Storage
from service.jobs.store import JobRecord, JobStore

log = logging.getLogger(__name__)

router = APIRouter(tags=["models"])

_STARTED = int(time.time())


@dataclass(frozen=True)
class ChatTarget:
    """What a model name resolves to for this caller."""

    name: str
    base_model: str
    adapter_id: str | None
    """None for a base model."""


def _model_object(model_id: str, owned_by: str, created: int = _STARTED) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def _not_found(name: str) -> NotFound:
    return NotFound(f"The model {name!r} does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


def _job_model(job: JobRecord, step: int | None = None) -> TunedModel:
    return names.tuned_model(job.model, job.suffix, job.id, step)


def _manifest_key(adapter_id: str) -> str:
    return names.adapter_key(adapter_id, names.ADAPTER_MANIFEST)


def resolve_model(request: Request, name: str, tenant: str) -> ChatTarget:
    """The base model and adapter a caller means by ``name``.

    Raises:
        NotFound: unknown base model, or a tuned model that does not exist, is deleted, is not
            finished, or belongs to another tenant.
    """
    settings = request.app.state.settings
    tuned = parse_tuned_model(name)  # raises NotFound for malformed ft: names
    if tuned is None:
        if name not in base_model_ids(settings):
            raise _not_found(name)
        return ChatTarget(name, name, None)
    if tuned.base_model not in base_model_ids(settings):
        raise _not_found(name)
    _owned_tuned_model(request.app.state.storage, tuned, tenant)
    return ChatTarget(name, tuned.base_model, tuned.adapter_id)


def _owned_tuned_model(storage: Storage, tuned: TunedModel, tenant: str) -> JobRecord:
    try:
        job = JobStore(storage).get(tuned.job_id, tenant)
    except NotFound:
        raise _not_found(tuned.name) from None
    if _job_model(job) != tuned.final or not storage.exists(_manifest_key(tuned.adapter_id)):
        raise _not_found(tuned.name)
    if tuned.step is None and job.status != "succeeded":
        raise _not_found(tuned.name)
    return job


def _tuned_objects(storage: Storage, tenant: str) -> list[dict]:
    """The caller's tuned models and checkpoints, newest job first."""
    objects = []
    for job in JobStore(storage).list(tenant):
        prefix = names.job_adapters_prefix(job.id)
        for info in storage.iter(prefix):
            folder, _, file = info.key[len(prefix):].partition("/")
            if file != names.ADAPTER_MANIFEST:
                continue
            if folder == names.FINAL and job.status == "succeeded":
                created = job.finished_at or _unix(info.last_modified)
                objects.append(_model_object(_job_model(job).name, tenant, created))
            elif (step := names.checkpoint_step(folder)) is not None:
                objects.append(_model_object(_job_model(job, step).name, tenant,
                                             _unix(info.last_modified)))
    return objects


@router.get("/models")
def list_models(request: Request, tenant: str = Depends(get_tenant)) -> dict:
    settings = request.app.state.settings
    data = [_model_object(m, "tuneserve") for m in base_model_ids(settings)]
    data += _tuned_objects(request.app.state.storage, tenant)
    return {"object": "list", "data": data}


@router.get("/models/{model_id:path}")
def retrieve_model(model_id: str, request: Request, tenant: str = Depends(get_tenant)) -> dict:
    target = resolve_model(request, model_id, tenant)
    if target.adapter_id is None:
        return _model_object(model_id, "tuneserve")
    storage = request.app.state.storage
    info = storage.head(_manifest_key(target.adapter_id))
    return _model_object(model_id, tenant, _unix(info.last_modified) if info else _STARTED)


@router.delete("/models/{model_id:path}")
async def delete_model(model_id: str, request: Request,
                       tenant: str = Depends(get_tenant)) -> dict:
    """Delete a tuned model (its final adapter and checkpoints) or one checkpoint.

    The adapters leave storage first, so no replica can load them again; then every replica
    holding one drops it.
    """
    target = await run_in_threadpool(resolve_model, request, model_id, tenant)
    if target.adapter_id is None:
        raise InvalidRequest(f"The model {model_id!r} is a base model; only tuned models "
                             "(ft:…) can be deleted.", param="model",
                             code="cannot_delete_base_model")
    tuned = parse_tuned_model(model_id)
    assert tuned is not None
    adapter_ids = await run_in_threadpool(_delete_adapters, request.app.state.storage, tuned)
    chat = request.app.state.chat
    if chat is not None:
        for adapter_id in adapter_ids:
            await chat.evict(adapter_id, target.base_model)
    log.info("deleted model %s (%d adapters)", model_id, len(adapter_ids))
    return {"id": model_id, "object": "model", "deleted": True}


def _delete_adapters(storage: Storage, tuned: TunedModel) -> list[str]:
    if tuned.step is None:
        prefix = names.job_adapters_prefix(tuned.job_id)
        adapter_ids = sorted({f"{tuned.job_id}/{info.key[len(prefix):].split('/')[0]}"
                              for info in storage.iter(prefix)})
    else:
        prefix = names.adapter_key(tuned.adapter_id) + "/"
        adapter_ids = [tuned.adapter_id]
    # The manifest goes first: without it the adapter counts as absent even if a later
    # delete fails half-way.
    for adapter_id in adapter_ids:
        storage.delete(_manifest_key(adapter_id))
    storage.delete_prefix(prefix)
    return adapter_ids


def _unix(moment: datetime) -> int:
    return int(moment.timestamp())
