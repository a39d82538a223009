"""A job's resumes: each restart of its training (a lost worker, a lost driver, a preemption, a
cluster restart) and the steps it cost, kept where the job's driver can count them.

Rank 0 of the restarted run writes one small record per resume under ``<run>/resumes/`` (besides
the job's "Resumed from …" event); the driver (``service.jobs.driver``) lists that prefix, cheap
however long the run, and copies the totals into the job record. Needs neither torch nor Ray, so
the driver imports it without loading either.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from service.core.names import events_prefix, run_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resumes:
    """What a job's resumes cost so far."""

    count: int = 0
    resumed_from_step: int | None = None
    """The step the latest resume started from (0: no complete checkpoint, started over)."""
    steps_lost: int = 0
    """Steps trained again because of resumes, summed over all of them."""


def resumes_prefix(job_id: str) -> str:
    return f"{run_key(job_id)}/resumes/"


def last_reported_step(storage: Any, job_id: str, look_back: int = 50) -> int:
    """The step of the job's newest metrics event (how far a lost attempt got), or 0."""
    keys = [info.key for info in storage.iter(events_prefix(job_id))]
    for key in reversed(keys[-look_back:]):
        try:
            event = json.loads(storage.get(key))
        except Exception:  # a lost event only makes the count smaller
            log.debug("event %s unreadable", key, exc_info=True)
            continue
        if event.get("type") == "metrics":
            return int((event.get("data") or {}).get("step") or 0)
    return 0


def record(storage: Any, job_id: str, resumed_from_step: int, steps_lost: int) -> None:
    body = {"resumed_from_step": resumed_from_step, "steps_lost": steps_lost,
            "at": time.time()}
    storage.put(f"{resumes_prefix(job_id)}{time.time_ns():020d}.json", json.dumps(body).encode())


def read(storage: Any, job_id: str) -> Resumes:
    """The totals of the job's resume records (in time order)."""
    entries = [json.loads(storage.get(info.key)) for info in storage.iter(resumes_prefix(job_id))]
    if not entries:
        return Resumes()
    return Resumes(count=len(entries), resumed_from_step=int(entries[-1]["resumed_from_step"]),
                   steps_lost=sum(int(e["steps_lost"]) for e in entries))
