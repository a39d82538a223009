"""Durable data-generation jobs and their events (keys: ``service.core.names``, "datagen").

A job record changes by compare-and-swap, as a fine-tuning job's does, so the API (cancel) and
the job's driver (progress, result) never overwrite each other; a finished job never changes
again. Events are one small JSON object each, listed in key (= time) order.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from service.core import names
from service.core.errors import NotFound
from service.core.storage import Storage, records

log = logging.getLogger(__name__)

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class DatagenJob(BaseModel):
    id: str
    object: Literal["data_generation.job"] = "data_generation.job"
    method: Literal["self_instruct"] = "self_instruct"
    model: str
    """The generator, as the caller named it."""
    seed_file: str
    seed_sha256: str
    seed_tasks: int
    count: int
    status: Status = "queued"
    created_at: int
    finished_at: int | None = None
    settings: dict[str, Any]
    """Sampling, filters and loop settings, resolved (defaults filled in)."""
    examples: int = 0
    """Examples generated and kept so far."""
    candidates: int = 0
    removed: dict[str, int] = Field(default_factory=dict)
    """Candidates each filter removed."""
    result_file: str | None = None
    error: dict[str, str] | None = None
    metadata: dict[str, str] | None = None
    # Not on the wire.
    tenant: str
    created_ns: int
    base_model: str
    adapter_id: str | None = None
    judges: dict[str, dict[str, str | None]] = Field(default_factory=dict)
    """The quality grader's judge models, resolved for the tenant at creation."""
    app: str | None = None
    """The Serve application whose chat deployment generates (None: the app's own back end)."""

    PRIVATE: ClassVar[frozenset[str]] = frozenset({"tenant", "created_ns", "base_model",
                                                   "adapter_id", "judges", "app"})

    def public(self) -> dict[str, Any]:
        return self.model_dump(exclude=set(self.PRIVATE))


class DatagenStore:
    def __init__(self, storage: Storage):
        self.storage = storage

    def create(self, job: DatagenJob) -> DatagenJob:
        self.storage.create(names.datagen_job_key(job.id), records.dump(job))
        self.storage.put(names.datagen_index_key(job.tenant, job.created_ns, job.id), b"")
        return job

    def read(self, job_id: str) -> tuple[DatagenJob, str]:
        if not isinstance(job_id, str) or not names.DATAGEN_JOB_ID.match(job_id):
            raise _no_job(job_id)
        key = names.datagen_job_key(job_id)
        info = self.storage.head(key)
        if info is None:
            raise _no_job(job_id)
        return DatagenJob.model_validate_json(self.storage.get(key)), info.etag

    def get(self, job_id: str, tenant: str | None = None) -> DatagenJob:
        job, _ = self.read(job_id)
        if tenant is not None and job.tenant != tenant:
            raise _no_job(job_id)
        return job

    def update(self, job_id: str, change: Callable[[DatagenJob], DatagenJob | None]) -> DatagenJob:
        """``change`` applied by compare-and-swap; a finished job is never changed again."""
        return records.swap(self.storage, names.datagen_job_key(job_id),
                            lambda: self.read(job_id), change, what=f"Job {job_id}",
                            final=lambda job: job.status in FINISHED)

    def list(self, tenant: str) -> list[DatagenJob]:
        """The tenant's jobs, oldest first."""
        found = []
        for info in self.storage.iter(names.datagen_index_prefix(tenant)):
            job_id = info.key.rsplit("/", 1)[-1].split("-", 1)[1]
            try:
                found.append(self.get(job_id, tenant))
            except NotFound:
                continue
        return found

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's events, oldest first."""
        return [json.loads(self.storage.get(info.key))
                for info in self.storage.iter(names.datagen_events_prefix(job_id))]


class Events:
    """Appends one job's events; never raises (a lost progress line must not end the job)."""

    def __init__(self, storage: Storage, job_id: str):
        self.storage, self.job_id = storage, job_id
        self._seq = itertools.count()

    def add(self, message: str, level: str = "info", type: str = "message",
            data: dict[str, Any] | None = None) -> None:
        created_ns = time.time_ns()
        seq = next(self._seq)
        event = {"object": "data_generation.job.event", "id": f"dgevent-{created_ns}-{seq}",
                 "created_at": created_ns // 10**9, "level": level, "message": message,
                 "type": type, "data": data or {}}
        try:
            self.storage.put(names.datagen_event_key(self.job_id, created_ns, seq),
                             json.dumps(event).encode())
        except Exception:  # see the class docstring
            log.warning("could not write event %r of job %s", message, self.job_id,
                        exc_info=True)


def _no_job(job_id: object) -> NotFound:
    return NotFound(f"No data generation job with id {str(job_id)[:80]!r}.", param="job_id")
