"""Run a data-generation job: the Self-Instruct loop on the served generator, then the file.

Where it runs: as an eval run does (``service.evals.runner``), under Ray Serve in a detached
actor per job (``service.datagen.driver.DatagenDriver``), so the API replica only writes
records and an API restart does not stop it; without Serve (the app in process), as a task
beside the app on its own chat back end.

The result is a file of purpose ``fine-tune`` in the tenant's files, JSONL in OpenAI's chat
format, described as an upload is (examples, format, tokens) plus ``generation``: the generator,
the seed file and its sha256, the settings, and how many candidates each filter removed. A job
cancelled meanwhile stops at the end of its round and writes no file.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import traceback
from typing import Any

from service.core import names
from service.core.errors import TuneserveError
from service.datagen import seeds
from service.datagen.filters import FilterSettings
from service.datagen.loop import LoopSettings, Progress, Sampling, SelfInstruct, Target
from service.datagen.store import DatagenJob, DatagenStore, Events
from service.files import store as file_store

log = logging.getLogger(__name__)

NAMESPACE = "tuneserve-datagen"


def loop_settings(job: DatagenJob) -> LoopSettings:
    s = job.settings
    # One length cap for every reply: new instructions and instances alike.
    sampling = Sampling(**s["sampling"], instance_max_tokens=s["sampling"]["max_tokens"])
    return LoopSettings(count=job.count, sampling=sampling,
                        filters=FilterSettings(**{k: v for k, v in s["filters"].items()
                                                  if k != "grader"}),
                        prompts_per_round=s["prompts_per_round"],
                        max_instances_per_task=s["max_instances_per_task"])


def _grade(job: DatagenJob, chat, max_tokens_cap: int):
    """The quality filter of ``filters.grader``: a candidate is kept when the grader passes it
    (item ``{"instruction", "input", "output"}``, the sample is the output)."""
    raw = job.settings["filters"].get("grader")
    if raw is None:
        return None
    from service.evals.judge import ChatJudge
    from service.evals.store import Target as JudgeTarget
    from training import graders
    from training.graders import Sample

    grader = graders.parse(raw, "filters.grader")
    judge = ChatJudge(chat, {m: JudgeTarget(**t) for m, t in job.judges.items()},
                      max_tokens_cap)

    async def grade(instruction: str, instance: dict[str, str]) -> bool:
        item = {"instruction": instruction, **instance}
        try:
            result = await graders.grade(grader, item, Sample(instance["output"]), judge)
        except (graders.GraderInvalid, graders.TemplateError):
            return False
        return bool(result.passed)

    return grade


async def execute(store: DatagenStore, chat, job_id: str, *, settings) -> DatagenJob:
    job = store.get(job_id)
    events = Events(store.storage, job_id)
    try:
        return await _execute(store, chat, job, events, settings)
    except Exception as exc:  # noqa: BLE001 - the job, not the caller, carries the failure
        log.error("data generation job %s failed: %s", job_id, traceback.format_exc())
        message = exc.message if isinstance(exc, TuneserveError) else \
            f"{type(exc).__name__}: {exc}"
        events.add(f"Data generation failed: {message}"[:1000], level="error")
        return store.update(job_id, lambda j: j.model_copy(update={
            "status": "failed", "finished_at": int(time.time()),
            "error": {"code": "data_generation_failed", "message": message[:2000]}}))


async def _execute(store: DatagenStore, chat, job: DatagenJob, events: Events,
                   settings) -> DatagenJob:
    data = await asyncio.to_thread(_read, store.storage, job)
    tasks, _ = seeds.load(data)
    job = store.update(job.id, lambda j: j.model_copy(update={"status": "running"}))
    if job.status != "running":
        return job
    events.add(f"Generating {job.count} examples with {job.model} from {len(tasks)} seed "
               f"tasks (Self-Instruct)")
    loop = SelfInstruct(chat, Target(job.base_model, job.adapter_id), tasks, loop_settings(job),
                        concurrency=settings.chat_max_concurrency,
                        grade=_grade(job, chat, settings.max_tokens_cap))

    async def report(progress: Progress) -> None:
        removed = ", ".join(f"{k} {v}" for k, v in progress.removed.items() if v) or "none"
        events.add(f"Round {progress.round}: {progress.examples}/{progress.count} examples "
                   f"from {progress.instructions} instructions; {progress.candidates} candidate "
                   f"instructions, removed: {removed}", type="metrics", data=progress.data())
        await asyncio.to_thread(store.update, job.id, lambda j: j.model_copy(update={
            "examples": progress.examples, "candidates": progress.candidates,
            "removed": progress.removed}))

    async def cancelled() -> bool:
        return (await asyncio.to_thread(store.get, job.id)).status == "cancelled"

    result = await loop.run(report, cancelled)
    if result.stopped == "cancelled":
        return store.get(job.id)
    if not result.examples:
        raise RuntimeError(f"the generator gave no usable example in {result.rounds} rounds "
                           f"({result.tally.candidates} candidates, all filtered out)")
    if result.stopped == "stalled":
        events.add(f"Stopped after {result.rounds} rounds: the last rounds kept nothing new; "
                   f"the file has {len(result.examples)} of {job.count} examples", level="warn")
    file_id = await asyncio.to_thread(_write_file, store.storage, job, result, settings)
    counts = result.tally.counts()
    events.add(f"Wrote {len(result.examples)} examples to {file_id}",
               data={"result_file": file_id, "examples": len(result.examples),
                     "removed": counts})
    return store.update(job.id, lambda j: j.model_copy(update={
        "status": "succeeded", "finished_at": int(time.time()), "result_file": file_id,
        "examples": len(result.examples), "candidates": result.tally.candidates,
        "removed": counts}))


def _read(storage, job: DatagenJob) -> bytes:
    with file_store.open_content(storage, job.tenant, job.seed_file) as stream:
        return stream.read()


def generation_record(job: DatagenJob, result) -> dict[str, Any]:
    """What the result file's description says of how it was made."""
    return {"method": "self_instruct", "job": job.id, "generator": job.model,
            "seed_file": job.seed_file, "seed_sha256": job.seed_sha256,
            "seed_tasks": job.seed_tasks, "settings": job.settings,
            "instructions": len(result.instructions), "rounds": result.rounds,
            "stopped": result.stopped, "candidates": result.tally.candidates,
            "removed": result.tally.counts()}


def _write_file(storage, job: DatagenJob, result, settings) -> str:
    from service.files import validation

    body = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in result.examples).encode()
    try:
        tokens = validation.load_file_tokenizer(settings, job.base_model)
    except Exception:  # noqa: BLE001 - described without token counts, as an upload would be
        tokens = validation.FileTokenizer()
    checks = validation.FileChecks.from_settings(settings, tokens)
    report = validation.check_file(io.BytesIO(body), checks)
    description = {**validation.description(report, checks),
                   "generation": generation_record(job, result)}
    file_id = names.new_file_id()
    storage.put(names.file_content_key(file_id), body)
    file_store.save_record(storage, job.tenant, file_id, filename=f"self-instruct-{job.id}.jsonl",
                           purpose=file_store.FINE_TUNE, size=len(body), description=description)
    return file_id


# -- off the API replica ---------------------------------------------------------------------


def start(app, job_id: str) -> None:
    """Run it in a detached actor under Serve; beside the app otherwise (no Serve here)."""
    settings = app.state.settings
    job = DatagenStore(app.state.storage).get(job_id)
    if job.app is None:
        task = asyncio.get_running_loop().create_task(execute(
            DatagenStore(app.state.storage), app.state.chat, job_id, settings=settings))
        app.state.__dict__.setdefault("datagen_tasks", set()).add(task)
        task.add_done_callback(app.state.datagen_tasks.discard)
        return
    import ray

    from service.datagen.driver import DatagenDriver

    env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = DatagenDriver.options(name=job_id, namespace=NAMESPACE, lifetime="detached",
                                   runtime_env={"env_vars": env}).remote(
        job_id, settings.model_copy(update={"api_keys": {}}), job.app)
    driver.run.remote()
    driver.exit.remote()  # queued behind run(): the actor leaves when the job is over
