"""A lost worker costs at most one checkpoint interval (issue 40): real Ray Train runs of the tiny
model, local storage and SeaweedFS S3, workers SIGKILLed and SIGTERMed mid-run.

The fault matrix, one short job per case: a worker SIGKILLed at a random step after at least two
checkpoints (1 and 2 workers; local and S3; with and without an API replica SIGKILLed before it).
Each must resume from the newest checkpoint that was complete at the kill, lose at most one
interval of steps, and end with exactly the losses of an uninterrupted run over the same data
(same order, same RNG). The in-process runs also SIGTERM a worker after the resume: a checkpoint
at that step, resumed from with nothing lost. A checkpoint left half-written (its files without
the manifest that completes it, or a file cut short) is never loaded and is removed.

CI runs the cases marked ``core``; the others are ``heavy`` (``-m heavy``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from tests.helpers import sorting_lines
from training import checkpoints, resumes
from training.model import registry
from training.run import run_training
from training.spec import TrainSpec

FILE = "file-" + "f" * 24
EVERY = 5
STEPS = 40  # 160 examples / batch 4, one epoch
SEED = int(os.environ.get("TUNESERVE_TEST_SEED", time.time_ns() % 10_000))


@dataclass(frozen=True)
class Case:
    storage: str
    workers: int

    @property
    def id(self) -> str:
        return f"{self.storage}-{self.workers}w"


def spec_for(job_id: str, workers: int) -> TrainSpec:
    return TrainSpec(job_id=job_id, base_model=registry.TINY_MODEL_ID,
                     training_files=((FILE, 1.0),), n_epochs=1, batch_size=4,
                     num_workers=workers, cpus_per_worker=1, checkpoint_every_steps=EVERY,
                     checkpoint_every_seconds=0, max_failures=2, seed=7)


def train_workers() -> list[psutil.Process]:
    """This test's Ray Train workers (descendants of this process: our local Ray)."""
    found = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def events(storage, job_id: str) -> list[dict]:
    return [json.loads(storage.get(i.key)) for i in storage.iter(f"jobs/{job_id}/events/")]


def losses(evs: list[dict]) -> dict[int, list[float]]:
    """Each step's training losses, in the order reported (a step done again has two)."""
    out: dict[int, list[float]] = {}
    for e in evs:
        if e["type"] == "metrics":
            out.setdefault(e["data"]["step"], []).append(e["data"]["train_loss"])
    return out


def storage_config(kind: str, tmp_path: Path, s3_server) -> StorageConfig:
    if kind == "local":
        return StorageConfig(uri=str(tmp_path / "storage"))
    return StorageConfig(uri=f"s3://{s3_server.bucket}/resume-{os.urandom(4).hex()}",
                         endpoint_url=s3_server.endpoint_url)


class Faults:
    """Kills a worker of the run at a random step after two checkpoints (SIGKILL), then, once
    it has resumed, stops one at a later step (SIGTERM); notes what storage held at each."""

    def __init__(self, storage, job_id: str, rng: random.Random):
        self.storage, self.job_id = storage, job_id
        self.kill_after = rng.randint(2 * EVERY + 1, 3 * EVERY - 1)
        self.term_after = rng.randint(5 * EVERY + 1, 6 * EVERY - 1)
        self.seen: dict = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _wait_for(self, step: int, resumed: int = 0) -> int:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            reached = resumes.last_reported_step(self.storage, self.job_id)
            if reached >= step and resumes.read(self.storage, self.job_id).count >= resumed:
                return reached
            time.sleep(0.02)
        raise TimeoutError(f"step {step} never came")

    def _run(self) -> None:
        self._wait_for(self.kill_after)
        complete = checkpoints.scan(self.storage, self.job_id)[0]
        workers = train_workers()
        os.kill(workers[-1].pid, signal.SIGKILL)
        self.seen["kill"] = {"complete": complete, "reached": resumes.last_reported_step(
            self.storage, self.job_id)}
        self._wait_for(self.term_after, resumed=1)
        workers = train_workers()
        os.kill(workers[-1].pid, signal.SIGTERM)
        self.seen["term"] = {"reached": resumes.last_reported_step(self.storage, self.job_id)}


@pytest.fixture(scope="module")
def baselines(ray_local, tmp_path_factory) -> dict[int, dict[int, list[float]]]:
    """Each world size's uninterrupted run: its losses by step. One worker's runs in this
    process (the same numbers as in a Ray worker with one thread, seconds sooner)."""
    config = StorageConfig(uri=str(tmp_path_factory.mktemp("baseline")))
    storage = open_storage(config)
    storage.put(f"files/{FILE}/content", sorting_lines(160, seed=2))
    runs = {}
    for workers in (1, 2):
        job_id = f"ftjob-{'b' * 23}{workers}"
        if workers == 1:
            in_process(spec_for(job_id, 1), config)
        else:
            run_training(spec_for(job_id, workers), config)
        runs[workers] = losses(events(storage, job_id))
        assert sorted(runs[workers]) == list(range(1, STEPS + 1))
    return runs


def in_process(spec: TrainSpec, config: StorageConfig):
    """Train ``spec`` as rank 0 of 1 in this process; the process keeps its thread count."""
    import torch

    from training.recipes import run_recipe

    threads = torch.get_num_threads()
    try:
        return run_recipe(spec, config)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("case", [Case("local", 1), Case("s3", 2)], ids=lambda c: c.id)
def test_killed_worker_resumes_from_the_newest_complete_checkpoint(case, baselines, tmp_path,
                                                                   s3_server, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    config = storage_config(case.storage, tmp_path, s3_server)
    storage = open_storage(config)
    storage.put(f"files/{FILE}/content", sorting_lines(160, seed=2))
    job_id = f"ftjob-{os.urandom(12).hex()}"
    faults = Faults(storage, job_id, random.Random(SEED))
    faults.thread.start()
    result = run_training(spec_for(job_id, case.workers), config)
    faults.thread.join(timeout=5)
    evs = events(storage, job_id)
    note = f"seed={SEED} kill_after={faults.kill_after} term_after={faults.term_after}"
    resumed = [e["data"] for e in evs if "steps_lost" in (e.get("data") or {})]
    assert len(resumed) == 2, (note, resumed)

    # SIGKILL: resumed from the newest checkpoint complete at the kill (one may have completed
    # between our look and the kill, never an older one), losing at most one interval.
    kill = faults.seen["kill"]
    assert len(kill["complete"]) >= 2, (note, kill)
    first = resumed[0]
    assert kill["complete"][0] <= first["resumed_from_step"] <= kill["reached"], (note, kill, first)
    assert first["resumed_from_step"] % EVERY == 0
    assert 0 <= first["steps_lost"] <= EVERY, (note, first)

    # SIGTERM: the workers finished the step, saved it, stopped; the run resumed there.
    stopped = [e["data"]["preempted_at_step"] for e in evs if "preempted_at_step" in e["data"]]
    assert len(stopped) == 1 and stopped[0] >= faults.seen["term"]["reached"], (note, stopped)
    assert resumed[1] == {"resumed_from_step": stopped[0], "steps_lost": 0}, (note, resumed)

    # The same losses as the uninterrupted run, step for step, the ones done again included.
    got, want = losses(evs), baselines[case.workers]
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, values in got.items():
        assert values == pytest.approx([want[step][0]] * len(values), rel=1e-5), (note, step)
    assert result["train_loss"] == pytest.approx(want[STEPS][0], rel=1e-5)
    assert result["step"] == STEPS

    # What is left: the newest complete checkpoints only, and what the job will count.
    complete, incomplete = checkpoints.scan(storage, job_id)
    assert incomplete == [] and complete[0] == STEPS and len(complete) <= checkpoints.KEEP
    count = resumes.read(storage, job_id)
    assert (count.count, count.steps_lost) == (2, first["steps_lost"])


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
