"""Durable job records: written before any Ray work starts, changed only by compare-and-swap
through legal status transitions. Storage is the single source of truth for every replica."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, PlainSerializer, PlainValidator

from service.core.errors import Conflict, NotFound
from service.core.names import JOB_ID, JOBS_PREFIX, is_job_key, job_key
from service.core.storage import Storage, records
from training.spec import TrainSpec

Status = Literal["validating_files", "queued", "running", "paused", "succeeded", "failed",
                 "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE: frozenset[str] = frozenset({"validating_files", "queued", "running"})

# Which status may follow which. "running" → "queued" is a run re-queued after it vanished.
TRANSITIONS: dict[str, frozenset[str]] = {
    "validating_files": frozenset({"queued", "failed", "cancelled"}),
    "queued": frozenset({"running", "paused", "failed", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "cancelled", "paused", "queued"}),
    "paused": frozenset({"queued", "cancelled", "failed"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


def _read_spec(value: Any) -> TrainSpec | None:
    if value is None or isinstance(value, TrainSpec):
        return value
    return TrainSpec.from_dict(value)


StoredSpec = Annotated[
    TrainSpec | None, PlainValidator(_read_spec),
    PlainSerializer(lambda spec: None if spec is None else spec.to_dict())]
"""A ``TrainSpec`` in the record, stored as ``to_dict``'s versioned form."""


class JobRecord(BaseModel):
    """What storage holds for a job: the OpenAI ``FineTuningJob`` fields plus what never goes
    on the wire (the tenant, our extensions, the run's bookkeeping)."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    status: Status = "validating_files"
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    """Resolved numbers once the job is queued; the caller's values ("auto") before."""
    method: dict[str, Any] = Field(default_factory=dict)
    suffix: str | None = None
    seed: int
    metadata: dict[str, str] | None = None
    organization_id: str
    """The tenant that owns the job."""
    fine_tuned_model: str | None = None
    """Set when the job succeeds; null before and on failure."""
    finished_at: int | None = None
    estimated_finish: int | None = None
    error: JobError | None = None
    result_files: list[str] = Field(default_factory=list)
    trained_tokens: int | None = None
    integrations: list = Field(default_factory=list)
    user_provided_suffix: str | None = None

    # Not on the wire.
    extensions: dict[str, Any] = Field(default_factory=dict)
    """Our additions to the request (LoRA settings, workers, GPU use, extra training files)."""
    spec: StoredSpec = None
    """What the run trains, built and checked once (``service.jobs.spec.build_spec``) and read,
    not rebuilt, by the driver. None only in a record written before specs were stored: the
    scheduler derives it there, once."""
    webhook_url: str | None = None
    attempts: int = 0
    """How many times a driver was started for this job (the scheduler's count)."""
    resumed_from_step: int | None = None
    """The step the latest restart of the training resumed from (0: started over)."""
    resumes: int = 0
    """Restarts of the training, of any cause (``training.resumes``; the driver copies them)."""
    steps_lost: int = 0
    """Steps trained again because of those restarts."""

    PRIVATE: ClassVar[frozenset[str]] = frozenset({"extensions", "spec", "webhook_url",
                                                   "attempts", "resumed_from_step", "resumes",
                                                   "steps_lost"})

    def public(self) -> dict[str, Any]:
        body = self.model_dump(exclude=set(self.PRIVATE))
        body.update({k: v for k, v in self.extensions.items() if k in PUBLIC_EXTENSIONS})
        # Our extension fields: each start of the training is an attempt (1 = never resumed).
        body.update(attempts=max(self.attempts, self.resumes + 1) if self.attempts else 0,
                    resumed_from_step=self.resumed_from_step, steps_lost=self.steps_lost)
        return body


PUBLIC_EXTENSIONS = frozenset({"lora", "num_workers", "use_gpu", "training_files",
                               "checkpoint_every_steps", "checkpoint_every_seconds"})


class JobStore:
    def __init__(self, storage: Storage):
        self.storage = storage

    def create(self, record: JobRecord) -> JobRecord:
        self.storage.create(job_key(record.id), records.dump(record))
        return record

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The job, as seen by ``tenant`` (another tenant's job is "not found")."""
        record, _ = self.read(job_id)
        if tenant is not None and record.organization_id != tenant:
            raise NotFound(f"No fine-tuning job with id {job_id!r}.", param="fine_tuning_job_id")
        return record

    def update(self, job_id: str, change: Callable[[JobRecord], JobRecord | None]) -> JobRecord:
        """Apply ``change`` to the latest record with compare-and-swap (``records.swap``).

        ``change`` returns the new record, or None to leave it as it is. Status changes are
        checked against ``TRANSITIONS``.
        """
        def check(current: JobRecord, updated: JobRecord) -> None:
            if updated.status != current.status and updated.status not in TRANSITIONS[current.status]:
                raise Conflict(f"Job {job_id} is {current.status}; it cannot become {updated.status}.",
                               code="invalid_state")
        return records.swap(self.storage, job_key(job_id), lambda: self.read(job_id), change,
                            what=f"Job {job_id}", check=check)

    def transition(self, job_id: str, status: str, **fields: Any) -> JobRecord:
        def change(job: JobRecord) -> JobRecord:
            return job.model_copy(update={"status": status, **fields})
        return self.update(job_id, change)

    def list(self, tenant: str | None = None) -> list[JobRecord]:
        """All jobs (of ``tenant`` if given), newest first."""
        records = []
        for info in self.storage.iter(JOBS_PREFIX):
            if not is_job_key(info.key):
                continue
            record = JobRecord.model_validate_json(self.storage.get(info.key))
            if tenant is None or record.organization_id == tenant:
                records.append(record)
        records.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return records

    def read(self, job_id: str) -> tuple[JobRecord, str]:
        """The record and the version it was read at (for a compare-and-swap)."""
        if not JOB_ID.match(job_id):  # no storage key is ever built from a malformed id
            raise NotFound(f"No fine-tuning job with id {job_id!r}.", param="fine_tuning_job_id")
        key = job_key(job_id)
        for _ in range(5):
            before = self.storage.head(key)
            if before is None:
                raise NotFound(f"No fine-tuning job with id {job_id!r}.", param="fine_tuning_job_id")
            data = self.storage.get(key)
            after = self.storage.head(key)
            if after is not None and after.etag == before.etag:
                return JobRecord.model_validate_json(data), before.etag
        raise Conflict(f"Job {job_id} is changing too fast; try again.", code="busy")
