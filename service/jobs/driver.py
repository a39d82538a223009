"""The driver of one job's training run: a detached Ray actor, so the API can restart under it.

It runs the ``TrainSpec`` stored in the job record (built when the job was created, placed by
the scheduler) and moves the record to its final status itself. Killing the actor (cancel,
pause) kills the Ray Train run it owns.
"""

from __future__ import annotations

import csv
import io
import logging
import threading
import time
import traceback

import ray

from service.core import names
from service.evals.job_runs import JobEvalRuns
from service.jobs.store import JobRecord, JobStore
from service.core.storage import open_storage
from service.core.storage.config import StorageConfig

log = logging.getLogger(__name__)

NAMESPACE = "tuneserve-jobs"


@ray.remote(num_cpus=0, max_restarts=0)
class JobDriver:
    def __init__(self, job_id: str, storage_config: StorageConfig):
        self.job_id = job_id
        self.storage = open_storage(storage_config)
        self.storage_config = storage_config

    def run(self) -> str:
        from service.core.events import EventLog
        from training.run import run_training

        store = JobStore(self.storage)
        events = EventLog(self.storage, self.job_id)
        record = store.get(self.job_id)
        try:
            if record.spec is None:  # the scheduler stores it before it starts a driver
                raise RuntimeError(f"the record of {self.job_id} holds no training spec")
            events.add("Fine-tuning job started" if record.attempts <= 1
                       else f"Fine-tuning job resumed (attempt {record.attempts})")
            if (job_eval := JobEvalRuns.of(self.storage, record, events)) is not None:
                job_eval.before()  # the eval extension; never raises
            from service.jobs.rft_judge import judge_for_job

            with ResumeCounter(self.storage, store, self.job_id), judge_for_job(record):
                result = run_training(record.spec, self.storage_config)
        except Exception as exc:  # the job, not the actor, carries the failure
            log.error("job %s failed: %s", self.job_id, traceback.format_exc())
            self._fail(store, events, exc)
            return "failed"
        self._succeed(store, events, record, result)
        return "succeeded"

    def exit(self) -> None:
        ray.actor.exit_actor()

    def _succeed(self, store: JobStore, events, record: JobRecord, result: dict) -> None:
        manifest_key = names.adapter_key(names.adapter_id(self.job_id), names.ADAPTER_MANIFEST)
        if not self.storage.exists(manifest_key):
            self._fail(store, events, RuntimeError("the run ended without a complete adapter"))
            return
        name = tuned_model_name(record)
        result_file = _write_result_file(self.storage, record, events)

        def change(job: JobRecord) -> JobRecord | None:
            if job.status != "running":
                return None  # cancelled or paused meanwhile: that decision stands
            return job.model_copy(update={
                "status": "succeeded", "fine_tuned_model": name, "finished_at": int(time.time()),
                "trained_tokens": int(result.get("trained_tokens", 0)),
                "result_files": [result_file] if result_file else [], "estimated_finish": None})

        final = store.update(self.job_id, change)
        if final.status == "succeeded":
            events.add("The job has successfully completed", data={"fine_tuned_model": name})
            if (job_eval := JobEvalRuns.of(self.storage, record, events)) is not None:
                job_eval.after(name, store)

    def _fail(self, store: JobStore, events, exc: Exception) -> None:
        from service.core.errors import TuneserveError

        param = exc.param if isinstance(exc, TuneserveError) else None
        code = exc.code if isinstance(exc, TuneserveError) and exc.code else "training_failed"
        message = str(exc) or type(exc).__name__

        def change(job: JobRecord) -> JobRecord | None:
            if job.status not in ("running", "validating_files", "queued"):
                return None
            return job.model_copy(update={
                "status": "failed", "finished_at": int(time.time()),
                "error": {"code": code, "message": message[:2000], "param": param}})

        final = store.update(self.job_id, change)
        if final.status == "failed":
            events.add(f"The job failed: {message[:500]}", level="error")


class ResumeCounter:
    """Copies the run's resumes (``training.resumes``: written by rank 0 of each restarted
    attempt) into the job record while the run goes on, and once more when it ends, so the job
    shows what failures cost (``attempts``, ``resumed_from_step``, ``steps_lost``)."""

    POLL_S = 5.0

    def __init__(self, storage, store: JobStore, job_id: str):
        self.storage, self.store, self.job_id = storage, store, job_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resume-counter", daemon=True)
        self._seen = -1

    def __enter__(self) -> ResumeCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.POLL_S)
        self.update()

    def _loop(self) -> None:
        while not self._stop.wait(self.POLL_S):
            self.update()

    def update(self) -> None:
        from training import resumes

        try:
            seen = resumes.read(self.storage, self.job_id)
            if seen.count == self._seen:
                return
            self.store.update(self.job_id, lambda job: job.model_copy(update={
                "resumes": seen.count, "resumed_from_step": seen.resumed_from_step,
                "steps_lost": seen.steps_lost}))
            self._seen = seen.count
        except Exception:  # noqa: BLE001 - a count that lags must not fail the job
            log.warning("job %s: could not count its resumes", self.job_id, exc_info=True)


def _write_result_file(storage, record: JobRecord, events) -> str | None:
    """The metrics CSV as a file of purpose ``fine-tune-results`` (OpenAI's ``result_files``)."""
    from service.files.store import create_result_file
    from service.api.routes.fine_tuning import read_events

    rows = [e["data"] for e in read_events(storage, record.id) if e.get("type") == "metrics"]
    if not rows:
        return None
    columns = ["step", "train_loss", "train_mean_token_accuracy", "valid_loss",
               "valid_mean_token_accuracy", "learning_rate", "tokens_per_second"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return create_result_file(storage, record.organization_id, f"{record.id}-metrics.csv",
                              out.getvalue().encode())


def tuned_model_name(record: JobRecord) -> str:
    """``ft:<base>:<suffix>:<job id>``; a job tuned from a tuned model names the same base."""
    return names.tuned_model(record.model, record.suffix, record.id).name


def driver_alive(job_id: str) -> bool:
    try:
        ray.get_actor(job_id, namespace=NAMESPACE)
        return True
    except ValueError:
        return False


def start_driver(job_id: str, storage_config: StorageConfig) -> None:
    # Ray Train's helper actors look the cluster up by address; with several Ray instances on
    # one machine (tests, a laptop) they must be told which one is theirs.
    env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = JobDriver.options(name=job_id, namespace=NAMESPACE, lifetime="detached",
                               runtime_env={"env_vars": env}).remote(job_id, storage_config)
    driver.run.remote()
    # Queued behind run(): the detached actor leaves once the run is over, freeing its name.
    driver.exit.remote()


def stop_driver(job_id: str) -> None:
    try:
        ray.kill(ray.get_actor(job_id, namespace=NAMESPACE), no_restart=True)
    except ValueError:
        pass  # already gone
