"""A lost worker costs at most one checkpoint interval (issue 40): real Ray Train runs of the tiny
model, local storage and SeaweedFS S3, workers SIGKILLed and SIGTERMed mid-run.

The fault matrix, one short job per case: a worker SIGKILLed at a random step after at least two
checkpoints (1 and 2 workers; local and S3; with and without an API replica SIGKILLed before it).
Each must resume from the newest checkpoint that was complete at the kill, lose at most one
interval of steps, and end with exactly the losses of an uninterrupted run over the same data
(same order, same RNG). The in-process runs also SIGTERM a worker after the resume: a checkpoint
at that step, resumed from with nothing lost. A checkpoint left half-written (its files without
the manifest that completes it, or a file cut short) is never loaded and is removed.

CI runs two cells, which between them cover every fault: one worker on local storage in a Ray of
this process (SIGKILL, then SIGTERM), and one worker through the API of the shared service on S3
(the API replica SIGKILLed before the worker). The other cells are ``heavy`` (``-m heavy``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from tests.helpers import own_train_workers, sorting_lines, wait_until
from training import checkpoints, resumes
from training.model import registry
from training.run import run_training
from training.spec import TrainSpec

FILE = "file-" + "f" * 24
EVERY = 5
STEPS = 40  # 160 examples / batch 4, one epoch
SEED = int(os.environ.get("TUNESERVE_TEST_SEED", time.time_ns() % 10_000))


def spec_for(job_id: str, workers: int) -> TrainSpec:
    return TrainSpec(job_id=job_id, base_model=registry.TINY_MODEL_ID,
                     training_files=((FILE, 1.0),), n_epochs=1, batch_size=4,
                     num_workers=workers, cpus_per_worker=1, checkpoint_every_steps=EVERY,
                     checkpoint_every_seconds=0, max_failures=2, seed=7)




def events(storage, job_id: str) -> list[dict]:
    return [json.loads(storage.get(i.key)) for i in storage.iter(f"jobs/{job_id}/events/")]


def losses(evs: list[dict]) -> dict[int, list[float]]:
    """Each step's training losses, in the order reported (a step done again has two)."""
    out: dict[int, list[float]] = {}
    for e in evs:
        if e["type"] == "metrics":
            out.setdefault(e["data"]["step"], []).append(e["data"]["train_loss"])
    return out


def in_process(spec: TrainSpec, config: StorageConfig):
    """Train ``spec`` as rank 0 of 1 in this process (the same numbers as a Ray worker with one
    thread, seconds sooner); the process keeps its thread count."""
    import torch

    from training.recipes import run_recipe

    threads = torch.get_num_threads()
    try:
        return run_recipe(spec, config)
    finally:
        torch.set_num_threads(threads)


def uninterrupted(spec: TrainSpec, config: StorageConfig) -> dict[int, list[float]]:
    """The losses by step of ``spec`` run without a fault (under another job id)."""
    baseline = dataclasses.replace(spec, job_id=f"ftjob-{os.urandom(12).hex()}")
    if spec.num_workers == 1:
        in_process(baseline, config)
    else:
        run_training(baseline, config)
    found = losses(events(open_storage(config), baseline.job_id))
    assert sorted(found) == list(range(1, STEPS + 1))
    return found


class Faults:
    """SIGKILLs a worker of the run at a random step after two checkpoints and, with
    ``sigterm``, SIGTERMs one at a later step once it has resumed; notes what storage held."""

    def __init__(self, storage, job_id: str, workers, *, sigterm: bool, before=None):
        rng = random.Random(SEED)
        self.storage, self.job_id, self.workers = storage, job_id, workers
        # Inside the third interval, a step short of its end: the kill lands a step or so after
        # we look, before the next checkpoint is saved (were it mid-upload, the previous
        # one is the newest complete: up to the upload's few steps more would be lost).
        self.kill_after = rng.randint(2 * EVERY + 1, 3 * EVERY - 2)
        self.term_after = rng.randint(5 * EVERY + 1, 6 * EVERY - 1) if sigterm else None
        self.before = before
        """Called once the run has made its first step (an API replica SIGKILLed there)."""
        self.seen: dict = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def note(self) -> str:
        return f"seed={SEED} kill_after={self.kill_after} term_after={self.term_after}"

    def _wait_for(self, step: int, resumed: int = 0) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if (resumes.last_reported_step(self.storage, self.job_id) >= step
                        and resumes.read(self.storage, self.job_id).count >= resumed):
                    return
            except Exception:  # noqa: BLE001 - an event being written: look again
                pass
            time.sleep(0.02)
        raise TimeoutError(f"step {step} never came")

    def _run(self) -> None:
        if self.before is not None:
            self._wait_for(1)
            self.before()
        self._wait_for(self.kill_after)
        complete = checkpoints.scan(self.storage, self.job_id)[0]
        os.kill(self.workers()[-1].pid, signal.SIGKILL)
        self.seen["kill"] = {"complete": complete, "reached": resumes.last_reported_step(
            self.storage, self.job_id)}
        if self.term_after is not None:
            self._wait_for(self.term_after, resumed=1)
            os.kill(self.workers()[-1].pid, signal.SIGTERM)
            self.seen["term"] = resumes.last_reported_step(self.storage, self.job_id)

    def check(self, storage, job_id: str, want: dict[int, list[float]]) -> list[dict]:
        """What every case must show; returns the resume events' data."""
        self.thread.join(timeout=5)
        evs, note = events(storage, job_id), self.note
        resumed = [e["data"] for e in evs if "steps_lost" in (e.get("data") or {})]
        assert len(resumed) == (2 if self.term_after else 1), (note, resumed)

        # SIGKILL: resumed from the newest checkpoint complete at the kill (one may complete
        # between our look and the kill, never an older one), losing at most one interval.
        kill, first = self.seen["kill"], resumed[0]
        assert len(kill["complete"]) >= 2, (note, kill)
        assert kill["complete"][0] <= first["resumed_from_step"] <= kill["reached"], (note, first)
        assert first["resumed_from_step"] % EVERY == 0
        assert 0 <= first["steps_lost"] <= EVERY, (note, first)

        if self.term_after:  # SIGTERM: the step finished, saved, stopped; resumed there
            stopped = [e["data"]["preempted_at_step"] for e in evs
                       if "preempted_at_step" in e["data"]]
            assert len(stopped) == 1 and stopped[0] >= self.seen["term"], (note, stopped)
            assert resumed[1] == {"resumed_from_step": stopped[0], "steps_lost": 0}, note

        # The same losses as the uninterrupted run, step for step, the steps done again too.
        got = losses(evs)
        assert sorted(got) == list(range(1, STEPS + 1))
        for step, values in got.items():
            assert values == pytest.approx([want[step][0]] * len(values), rel=1e-5), (note, step)

        # What is left: the newest complete checkpoints only, and what the job counts.
        complete, incomplete = checkpoints.scan(storage, job_id)
        assert incomplete == [] and complete[0] == STEPS and len(complete) <= checkpoints.KEEP
        count = resumes.read(storage, job_id)
        assert (count.count, count.steps_lost) == (len(resumed), first["steps_lost"])
        return resumed


def storage_config(kind: str, tmp_path: Path, s3_server) -> StorageConfig:
    if kind == "local":
        return StorageConfig(uri=str(tmp_path / "storage"))
    return StorageConfig(uri=f"s3://{s3_server.bucket}/resume-{os.urandom(4).hex()}",
                         endpoint_url=s3_server.endpoint_url)


IN_PROCESS = [pytest.param("local", 1, id="local-1w"),
              pytest.param("s3", 2, id="s3-2w", marks=pytest.mark.heavy),
              pytest.param("s3", 1, id="s3-1w", marks=pytest.mark.heavy),
              pytest.param("local", 2, id="local-2w", marks=pytest.mark.heavy)]


@pytest.mark.parametrize(("kind", "workers"), IN_PROCESS)
def test_killed_worker_resumes_from_the_newest_complete_checkpoint(kind, workers, ray_local,
                                                                   tmp_path, s3_server,
                                                                   monkeypatch):
    """One Ray Train run (``run_training``, as a job's driver calls it): SIGKILL, then SIGTERM."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    config = storage_config(kind, tmp_path, s3_server)
    storage = open_storage(config)
    storage.put(f"files/{FILE}/content", sorting_lines(160, seed=2))
    spec = spec_for(f"ftjob-{os.urandom(12).hex()}", workers)
    faults = Faults(storage, spec.job_id, own_train_workers, sigterm=True)
    result = run_training(spec, config)
    want = uninterrupted(spec, config)
    faults.check(storage, spec.job_id, want)
    assert result["step"] == STEPS
    assert result["train_loss"] == pytest.approx(want[STEPS][0], rel=1e-5)


@pytest.mark.parametrize("workers", [pytest.param(1, id="s3-1w"),
                                     pytest.param(2, id="s3-2w", marks=pytest.mark.heavy)])
def test_api_replica_and_worker_killed_the_job_resumes_and_says_so(workers, shared_service,
                                                                    shared_storage, request):
    """Through the API of the shared ``tuneserve up`` (S3): the API replica SIGKILLed after the
    first step, then a worker after two checkpoints. The job resumes from the newest complete
    checkpoint, ends as an uninterrupted run would, and shows the resume on the job object,
    in its events and in ``/metrics``. (Before: it restarted from step 1.)"""
    import httpx
    import openai

    from service.jobs.store import JobStore

    if workers > 1:
        request.getfixturevalue("ray_local")  # the uninterrupted run's Ray
    client = openai.OpenAI(base_url=f"{shared_service.url}/v1", api_key="local", max_retries=5,
                           timeout=60)
    file_id = client.files.create(file=("train.jsonl", sorting_lines(160, seed=2)),
                                  purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model=registry.TINY_MODEL_ID, training_file=file_id, seed=7,
        hyperparameters={"n_epochs": 1, "batch_size": 4},
        extra_body={"checkpoint_every_steps": EVERY, "num_workers": workers})

    def kill_api() -> None:
        for proc in shared_service.processes("ServeReplica:tuneserve:Api"):
            proc.send_signal(signal.SIGKILL)

    faults = Faults(shared_storage, job.id, lambda: shared_service.processes("RayTrainWorker"),
                    sigterm=False, before=kill_api)

    def final():
        try:
            done = client.fine_tuning.jobs.retrieve(job.id)
        except (openai.APIConnectionError, openai.InternalServerError):
            return None  # the API replica coming back
        return done if done.status in ("succeeded", "failed", "cancelled") else None
    done = wait_until(final, 400, interval=1, what=f"job {job.id} to finish")
    assert done.status == "succeeded", done.error
    spec = JobStore(shared_storage).get(job.id).spec
    want = uninterrupted(spec, shared_service.storage_config())
    (resumed,) = faults.check(shared_storage, job.id, want)

    body = client.fine_tuning.jobs.retrieve(job.id).model_dump()
    assert (body["attempts"], body["resumed_from_step"], body["steps_lost"]) == (
        2, resumed["resumed_from_step"], resumed["steps_lost"]), body
    assert body["checkpoint_every_steps"] == EVERY
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert (f"Resumed from the checkpoint at step {resumed['resumed_from_step']}; "
            f"{resumed['steps_lost']} steps lost") in messages

    def resumes_metric() -> float:
        text = httpx.get(f"{shared_service.url}/metrics", timeout=30).text
        line = next(l for l in text.splitlines() if l.startswith("tuneserve_training_resumes"))
        return float(line.split()[-1])
    wait_until(lambda: resumes_metric() >= 1, 30, what="the resume in /metrics")


def test_a_half_written_checkpoint_is_never_loaded(tmp_path):
    """A worker killed while uploading leaves files without the manifest, or a file cut short:
    the next start resumes from the complete one before and removes the broken ones (a plain
    process: the choice is the recipe's, not Ray's)."""
    config = StorageConfig(uri=str(tmp_path))
    storage = open_storage(config)
    storage.put(f"files/{FILE}/content", sorting_lines(48, seed=2))
    job_id = "ftjob-" + "h" * 24
    spec = spec_for(job_id, 1)
    in_process(spec, config)
    assert checkpoints.scan(storage, job_id) == ([12, 10], [])
    # Two newer checkpoints, as killed uploads leave them: step 13 has every file but no
    # manifest; step 14 has its manifest but a state file cut short.
    for step in (13, 14):
        source, target = (checkpoints.checkpoint_prefix(job_id, s) for s in (12, step))
        for info in storage.iter(source):
            if not (step == 13 and info.key.endswith(checkpoints.MANIFEST)):
                storage.put(target + info.key[len(source):], storage.get(info.key))
    state = checkpoints.checkpoint_prefix(job_id, 14) + checkpoints.STATE_FILE
    storage.put(state, storage.get(state)[:100])
    assert checkpoints.scan(storage, job_id) == ([12, 10], [14, 13])

    again = in_process(spec, config)
    resumed = [e["data"] for e in events(storage, job_id) if "steps_lost" in e["data"]]
    assert resumed == [{"resumed_from_step": 12, "steps_lost": 0}]
    assert again.resumed_from == 12
    assert checkpoints.scan(storage, job_id) == ([12, 10], [])


def test_checkpoint_intervals_are_job_extensions(tmp_path):
    """``checkpoint_every_steps`` / ``checkpoint_every_seconds`` reach the run's spec; out of
    range they are a 400 naming the field; the job object carries our resume fields, which
    OpenAI's ``FineTuningJob`` allows (it does not forbid extra properties)."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.core.settings import Settings
    from service.jobs.store import JobStore

    app = create_app(Settings(storage=str(tmp_path / "store"), api_keys={"key": "tenant"},
                              builtin_models=False))
    with TestClient(app) as client:
        client.headers["Authorization"] = "Bearer key"
        file_id = client.post("/v1/files", files={"file": ("t.jsonl", sorting_lines(8, 1))},
                              data={"purpose": "fine-tune"}).json()["id"]
        body = {"model": registry.TINY_MODEL_ID, "training_file": file_id}
        for field, value in [("checkpoint_every_steps", 0), ("checkpoint_every_seconds", 5),
                             ("checkpoint_every_seconds", 10**6)]:
            r = client.post("/v1/fine_tuning/jobs", json={**body, field: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        r = client.post("/v1/fine_tuning/jobs", json={
            **body, "checkpoint_every_steps": 20, "checkpoint_every_seconds": 60})
        assert r.status_code == 200, r.text
        job = r.json()
        spec = JobStore(app.state.storage).get(job["id"]).spec
        assert (spec.checkpoint_every_steps, spec.checkpoint_every_seconds) == (20, 60)
        assert (job["checkpoint_every_steps"], job["checkpoint_every_seconds"]) == (20, 60)
        assert (job["attempts"], job["resumed_from_step"], job["steps_lost"]) == (0, None, 0)
        default = client.post("/v1/fine_tuning/jobs", json=body).json()
        spec = JobStore(app.state.storage).get(default["id"]).spec
        assert (spec.checkpoint_every_steps, spec.checkpoint_every_seconds) == (50, 300)
    # The spec's schema, read as text (parsing all of it takes seconds): its own block.
    spec_text = (Path(__file__).resolve().parents[2] / "shared" / "specs" /
                 "openai-openapi.yaml").read_text()
    block = re.search(r"\n    FineTuningJob:\n(.*?)\n    \S", spec_text, re.S).group(1)
    assert "additionalProperties: false" not in block and "\n      properties:\n" in block
    assert not any(f"\n        {name}:" in block
                   for name in ("attempts", "resumed_from_step", "steps_lost"))
