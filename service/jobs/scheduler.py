"""Schedules jobs onto Ray: validates files, queues first come first served, starts a driver per
run, re-attaches to or resumes runs after restarts, cancels and pauses.

One loop per API replica, every step a compare-and-swap on the job record, so two replicas (or a
restarted one) never start a job twice. Nothing here blocks a request.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from service.jobs import driver as job_driver
from service.core.errors import NotFound, TuneserveError
from service.jobs.spec import build_spec, training_file_sizes, training_files, with_spec
from service.jobs.store import TERMINAL, JobRecord, JobStore
from service.core.settings import Settings
from service.core.storage import open_storage

log = logging.getLogger(__name__)

MAX_RUN_STARTS = 4
"""A run that vanished (its driver or the cluster died) is resumed until it was started this often."""
POLL_S = 2.0
STOP_RECHECK_S = 600
"""How long after a cancel the loop still checks that the job's driver is gone."""


class RayJobRunner:
    def __init__(self, settings: Settings, *, start: bool = True):
        self.settings = settings
        self.storage = open_storage(settings.storage_config())
        self.store = JobStore(self.storage)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-scheduler", daemon=True)
        if start:
            self._thread.start()

    # --- called by the API -------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> JobRecord:
        record = self._stop_run(job_id, "cancelled", "The job was cancelled")
        self.wake()
        return record

    def pause(self, job_id: str) -> JobRecord:
        return self._stop_run(job_id, "paused", "The job was paused; resume continues from its last checkpoint")

    def close(self) -> None:
        self._stop.set()
        self._wake.set()

    # --- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.schedule_once()
            except Exception:  # the loop must outlive a storage hiccup
                log.exception("scheduling pass failed")
            self._wake.wait(POLL_S)
            self._wake.clear()

    def schedule_once(self) -> None:
        jobs = sorted(self.store.list(), key=lambda j: (j.created_at, j.id))
        for job in jobs:
            if job.status == "validating_files":
                self._validate(job)
        for job in jobs:
            if self._stopped_but_driven(job):
                log.warning("the driver of %s job %s outlived its stop; stopping it again",
                            job.status, job.id)
                job_driver.stop_driver(job.id)
        running = 0
        for job in jobs:
            if job.status == "running":
                running += 1 if self._reattach_or_resume(job) else 0
        for job in sorted(self.store.list(), key=lambda j: (j.created_at, j.id)):
            if job.status == "queued" and running < self.settings.max_concurrent_runs:
                running += 1 if self._launch(job) else 0

    def _validate(self, job: JobRecord) -> None:
        """Check the files are still there and queue the job. Its spec was built at ``POST``;
        a record from before records held one gets it here, from the same function."""
        events = _events(self.storage, job.id)
        try:
            events.add("Validating training files: "
                       + ", ".join(file_id for file_id, _ in training_files(job)))
            _check_files_remain(self.storage, job)  # expired or deleted since the job's POST
            sizes = training_file_sizes(self.storage, job)
            spec = job.spec or build_spec(job, sizes)
        except TuneserveError as exc:
            self._fail(job.id, exc.code or "invalid_training_file", exc.message, exc.param)
            return

        def change(current: JobRecord) -> JobRecord | None:
            if current.status != "validating_files":
                return None
            return with_spec(current, current.spec or spec).model_copy(update={"status": "queued"})
        queued = self.store.update(job.id, change)
        if queued.status == "queued":
            events.add("Files validated, moving job to queued state",
                       data={"hyperparameters": queued.hyperparameters})

    def _launch(self, job: JobRecord) -> bool:
        try:
            if job.attempts == 0:  # its first run reads the files: they must still be there
                _check_files_remain(self.storage, job)
            # A record queued (or paused) before records held a spec: derived once, here.
            spec = job.spec or build_spec(job, training_file_sizes(self.storage, job))
        except TuneserveError as exc:
            self._fail(job.id, exc.code or "invalid_training_file", exc.message, exc.param)
            return False
        # Where the run goes is decided now, on the cluster of now, and recorded with the spec.
        cpus = self._cpus_per_worker(spec.num_workers)

        def change(current: JobRecord) -> JobRecord | None:
            if current.status != "queued":
                return None
            placed = dataclasses.replace(current.spec or spec, cpus_per_worker=cpus)
            return with_spec(current, placed).model_copy(
                update={"status": "running", "attempts": current.attempts + 1})
        try:
            record = self.store.update(job.id, change)
        except TuneserveError:
            return False  # another replica took it
        if record.status != "running" or record.attempts != job.attempts + 1:
            return False
        try:
            job_driver.start_driver(job.id, self.settings.storage_config())
        except Exception as exc:
            self._fail(job.id, "launch_failed", f"Could not start the training run: {exc}")
            return False
        return True

    def _reattach_or_resume(self, job: JobRecord) -> bool:
        """True while the run holds a slot. A live driver is simply re-attached."""
        if job_driver.driver_alive(job.id):
            return True
        # The driver is gone. Read again: it may have finished the job just before it left.
        current = self.store.get(job.id)
        if current.status != "running":
            return False
        if current.attempts >= MAX_RUN_STARTS:
            self._fail(job.id, "run_lost", f"The training run stopped unexpectedly {current.attempts} "
                       "times; giving up. Its checkpoints are kept.")
            return False
        _events(self.storage, job.id).add(
            "The training run was lost (driver or cluster restart); resuming from its last checkpoint",
            level="warn")
        self.store.update(job.id, lambda j: j.model_copy(update={"status": "queued"})
                          if j.status == "running" else None)
        return self._launch(self.store.get(job.id))

    def _stopped_but_driven(self, job: JobRecord) -> bool:
        """A cancelled or paused job whose driver still lives: the kill sent with the stop is
        fire-and-forget, and one lost to a busy or restarting cluster must not leave the run
        training (and holding its workers) behind the job's back."""
        def stopped(record: JobRecord) -> bool:
            recent = time.time() - (record.finished_at or 0) < STOP_RECHECK_S
            return record.status == "paused" or (record.status == "cancelled" and recent)
        if not (stopped(job) and job_driver.driver_alive(job.id)):
            return False
        # Read again: another replica may have resumed a paused job since the list, and the
        # live driver is then its new run's.
        return stopped(self.store.get(job.id))

    # --- helpers -----------------------------------------------------------------------------

    def _stop_run(self, job_id: str, status: str, message: str) -> JobRecord:
        def change(job: JobRecord) -> JobRecord | None:
            if job.status in TERMINAL or job.status == status:
                return None
            update = {"status": status}
            if status in TERMINAL:
                update["finished_at"] = int(time.time())
            return job.model_copy(update=update)
        record = self.store.update(job_id, change)
        job_driver.stop_driver(job_id)  # killing the driver takes its Ray Train run with it
        if record.status == status:
            _events(self.storage, job_id).add(message)
        return record

    def _fail(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        def change(job: JobRecord) -> JobRecord | None:
            if job.status in TERMINAL:
                return None
            return job.model_copy(update={"status": "failed", "finished_at": int(time.time()),
                                          "error": {"code": code, "message": message, "param": param}})
        self.store.update(job_id, change)
        _events(self.storage, job_id).add(f"The job failed: {message}", level="error")

    def _cpus_per_worker(self, num_workers: int) -> int:
        if self.settings.cpus_per_worker:
            return self.settings.cpus_per_worker
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
        return max(1, cpus // max(1, num_workers))


def _check_files_remain(storage, job: JobRecord) -> None:
    """NotFound naming the file and the request's field when a file of the job expired
    (``expires_after``) or was deleted after the job was created."""
    from service.files.store import get_file

    files = [(param, file_id) for param, (file_id, _) in zip(
        ["training_file"] + [f"training_files[{i}].file" for i in range(len(training_files(job)))],
        training_files(job))]
    if job.validation_file:
        files.append(("validation_file", job.validation_file))
    for param, file_id in files:
        try:
            get_file(storage, job.organization_id, file_id, param=param)
        except NotFound as exc:
            raise NotFound(f"The {param} {file_id} is gone: it expired or was deleted before the "
                           f"job started ({exc.message})", param=param,
                           code=exc.code or "file_not_found") from None


def _events(storage, job_id: str):
    from service.core.events import EventLog

    return EventLog(storage, job_id)
