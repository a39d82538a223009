"""Durable evals, runs and graded items (keys: ``service.core.names``, "evals").

An eval record is written once (its name and metadata may change); a run record changes by
compare-and-swap, as a job record does, so the API (cancel) and the run's driver (progress,
result) never overwrite each other. Graded items are written in chunks of JSON lines as the
run goes, so a run's items are readable while it runs and survive its driver.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from service.core import names
from service.core.errors import NotFound
from service.core.storage import Storage, records

RunStatus = Literal["queued", "in_progress", "completed", "failed", "canceled"]
FINISHED: frozenset[str] = frozenset({"completed", "failed", "canceled"})


class EvalRecord(BaseModel):
    id: str
    object: Literal["eval"] = "eval"
    name: str
    created_at: int
    data_source_config: dict[str, Any]
    testing_criteria: list[dict[str, Any]]
    metadata: dict[str, str] | None = None
    tenant: str
    created_ns: int

    def public(self) -> dict[str, Any]:
        return self.model_dump(exclude={"tenant", "created_ns"})


class Target(BaseModel):
    """A model name as resolved for the run's tenant when it was created."""

    base_model: str
    adapter_id: str | None = None


class RunRecord(BaseModel):
    id: str
    object: Literal["eval.run"] = "eval.run"
    eval_id: str
    name: str
    status: RunStatus = "queued"
    model: str
    created_at: int
    data_source: dict[str, Any]
    metadata: dict[str, str] | None = None
    result_counts: dict[str, int] = Field(default_factory=lambda: dict.fromkeys(
        ("total", "errored", "failed", "passed"), 0))
    per_model_usage: list[dict[str, Any]] | None = None
    per_testing_criteria_results: list[dict[str, Any]] | None = None
    error: dict[str, str] | None = None
    report_url: str | None = None
    # Not on the wire.
    tenant: str
    items: int = 0
    """Items in the data source (progress is ``result_counts.total`` of this)."""
    targets: dict[str, Target] = Field(default_factory=dict)
    """The sampled model and every judge, resolved at creation (the driver has no tenancy)."""
    finished_at: int | None = None
    judge_usage: dict[str, int] = Field(default_factory=dict)
    """Model graders' ``calls``, ``prompt_tokens`` and ``completion_tokens``: ``/metrics``
    reads them here, since under Serve a run's driver calls the chat deployment directly."""

    PRIVATE: ClassVar[frozenset[str]] = frozenset({"tenant", "items", "targets", "finished_at",
                                                   "judge_usage"})

    def public(self) -> dict[str, Any]:
        body = self.model_dump(exclude=set(self.PRIVATE))
        body["per_model_usage"] = body["per_model_usage"] or None
        return body


class EvalStore:
    def __init__(self, storage: Storage):
        self.storage = storage

    # -- evals ---------------------------------------------------------------------------------

    def create(self, record: EvalRecord) -> EvalRecord:
        self.storage.create(names.eval_key(record.id), records.dump(record))
        self.storage.put(names.eval_index_key(record.tenant, record.created_ns, record.id), b"")
        return record

    def get(self, eval_id: str, tenant: str) -> EvalRecord:
        if not isinstance(eval_id, str) or not names.EVAL_ID.match(eval_id):
            raise _no_eval(eval_id)
        try:
            record = EvalRecord.model_validate_json(self.storage.get(names.eval_key(eval_id)))
        except NotFound:
            raise _no_eval(eval_id) from None
        if record.tenant != tenant:
            raise _no_eval(eval_id)
        return record

    def rename(self, record: EvalRecord, name: str | None,
               metadata: dict[str, str] | None) -> EvalRecord:
        update = {k: v for k, v in (("name", name), ("metadata", metadata)) if v is not None}
        record = record.model_copy(update=update)
        self.storage.put(names.eval_key(record.id), records.dump(record))
        return record

    def list(self, tenant: str) -> list[EvalRecord]:
        """The tenant's evals, oldest first."""
        found = []
        for info in self.storage.iter(names.eval_index_prefix(tenant)):
            eval_id = info.key.rsplit("/", 1)[-1].split("-", 1)[1]
            try:
                found.append(self.get(eval_id, tenant))
            except NotFound:
                continue  # deleted between the marker and the record
        return found

    def delete(self, record: EvalRecord) -> None:
        self.storage.delete(names.eval_index_key(record.tenant, record.created_ns, record.id))
        self.storage.delete_prefix(names.join_key("evals", record.id) + "/")

    # -- runs ----------------------------------------------------------------------------------

    def create_run(self, run: RunRecord) -> RunRecord:
        self.storage.create(names.eval_run_key(run.eval_id, run.id), records.dump(run))
        return run

    def read_run(self, eval_id: str, run_id: str) -> tuple[RunRecord, str]:
        if not names.EVAL_RUN_ID.match(run_id) or not names.EVAL_ID.match(eval_id):
            raise _no_run(run_id)
        key = names.eval_run_key(eval_id, run_id)
        info = self.storage.head(key)
        if info is None:
            raise _no_run(run_id)
        data = self.storage.get(key)
        return RunRecord.model_validate_json(data), info.etag

    def get_run(self, eval_id: str, run_id: str, tenant: str | None = None) -> RunRecord:
        run, _ = self.read_run(eval_id, run_id)
        if tenant is not None and run.tenant != tenant:
            raise _no_run(run_id)
        return run

    def update_run(self, eval_id: str, run_id: str,
                   change: Callable[[RunRecord], RunRecord | None]) -> RunRecord:
        """``change`` applied by compare-and-swap; a finished run is never changed again."""
        return records.swap(self.storage, names.eval_run_key(eval_id, run_id),
                            lambda: self.read_run(eval_id, run_id), change, what=f"Run {run_id}",
                            final=lambda run: run.status in FINISHED)

    def list_runs(self, eval_id: str) -> list[RunRecord]:
        """The eval's runs, oldest first."""
        runs = []
        for info in self.storage.iter(names.eval_runs_prefix(eval_id)):
            if info.key.endswith("/" + names.EVAL_RUN_RECORD):
                runs.append(RunRecord.model_validate_json(self.storage.get(info.key)))
        return sorted(runs, key=lambda r: (r.created_at, r.id))

    def all_runs(self) -> Iterator[tuple[str, RunRecord]]:
        """Every tenant's runs with their storage keys (for ``/metrics``, which names no tenant)."""
        for info in self.storage.iter(names.evals_prefix()):
            if info.key.endswith("/" + names.EVAL_RUN_RECORD):
                try:
                    yield info.key, RunRecord.model_validate_json(self.storage.get(info.key))
                except NotFound:
                    continue  # deleted with its eval since the listing

    # -- graded items --------------------------------------------------------------------------

    def write_items(self, eval_id: str, run_id: str, first: int,
                    items: list[dict[str, Any]]) -> None:
        body = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        self.storage.put(names.eval_items_key(eval_id, run_id, first), body.encode())

    def items(self, eval_id: str, run_id: str) -> Iterator[dict[str, Any]]:
        """The run's graded items in data-source order."""
        for info in self.storage.iter(names.eval_items_prefix(eval_id, run_id)):
            for line in self.storage.get(info.key).decode().splitlines():
                yield json.loads(line)


def _no_eval(eval_id: str) -> NotFound:
    return NotFound(f"No eval with id {str(eval_id)[:80]!r}.", param="eval_id")


def _no_run(run_id: str) -> NotFound:
    return NotFound(f"No eval run with id {str(run_id)[:80]!r}.", param="run_id")
