"""A real training run: 2 Ray Train workers on the tiny model, data and checkpoints on SeaweedFS
S3; one worker is SIGKILLed mid-run. The run must resume from its last checkpoint, finish, and
leave a complete adapter that loads with PEFT and changes the model's output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import safetensors.torch
import torch
from peft import PeftModel

from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from tests.helpers import REPO, own_train_workers, sorting_lines
from training import checkpoints
from training.model import registry
from training.run import run_training
from training.spec import TrainSpec

JOB = "ftjob-" + "d" * 24
FILE = "file-" + "e" * 24
CHECKPOINT_EVERY = 10


def events(storage) -> list[dict]:
    return [json.loads(storage.get(info.key)) for info in storage.iter(f"jobs/{JOB}/events/")]




def registered_checkpoint(storage) -> int:
    """The newest complete checkpoint in the run's storage (what a restart resumes from), or 0."""
    complete = checkpoints.scan(storage, JOB)[0]
    return complete[0] if complete else 0


def kill_one_worker_after(storage, step: int, killed: dict) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        registered = registered_checkpoint(storage)
        workers = own_train_workers()
        if registered >= step and workers:
            killed["registered_at_kill"] = registered
            killed["pid"] = workers[-1].pid
            os.kill(workers[-1].pid, signal.SIGKILL)
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def finished_run(ray_local, s3_server):
    """Run once for the module's assertions (about a minute)."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in s3_server.env.items():  # the driver's S3 credentials
            env.setenv(name, value)
        config = StorageConfig(uri=f"s3://{s3_server.bucket}/training-run-{os.getpid()}",
                               endpoint_url=s3_server.endpoint_url)
        storage = open_storage(config)
        storage.put(f"files/{FILE}/content", sorting_lines(320, seed=1))
        spec = TrainSpec(job_id=JOB, base_model=registry.TINY_MODEL_ID,
                         training_files=((FILE, 1.0),), n_epochs=3, batch_size=8, num_workers=2,
                         cpus_per_worker=1, checkpoint_every_steps=CHECKPOINT_EVERY,
                         max_failures=2, seed=3)
        killed: dict = {}
        killer = threading.Thread(target=kill_one_worker_after, args=(storage, 20, killed),
                                  daemon=True)
        killer.start()
        started = time.monotonic()
        result = run_training(spec, config)
        killer.join(timeout=1)
        yield {"result": result, "storage": storage, "killed": killed, "spec": spec,
               "config": config, "env": s3_server.env,
               "seconds": time.monotonic() - started, "events": events(storage)}


def test_killed_worker_resumes_from_the_last_checkpoint(finished_run):
    killed, result = finished_run["killed"], finished_run["result"]
    assert killed, "no worker was killed: the run ended before step 20 was registered"
    resumed = [e["data"]["resumed_from_step"] for e in finished_run["events"]
               if e["message"].startswith("Resumed from the checkpoint")]
    assert len(resumed) == 1
    # The last checkpoint the controller had registered when the worker died (a newer one may
    # have been registered between our look and the kill, never an older one).
    assert resumed[0] >= killed["registered_at_kill"] >= 20
    assert resumed[0] % CHECKPOINT_EVERY == 0
    assert result["resumed_from_step"] == resumed[0]
    assert result["step"] == result["total_steps"] == 120  # 320 examples / 8 × 3 epochs


def test_recomputed_steps_reproduce_the_unbroken_run(finished_run):
    """Steps done after the resumed checkpoint but before the kill ran twice: same examples
    (the batch plan is a function of seed and step), same weights, optimizer and RNG states,
    hence the same losses (torchtune's test_training_state_on_resume)."""
    losses: dict[int, list[float]] = {}
    for event in finished_run["events"]:
        if event["type"] == "metrics":
            losses.setdefault(event["data"]["step"], []).append(event["data"]["train_loss"])
    twice = {step: values for step, values in losses.items() if len(values) == 2}
    assert set(losses) == set(range(1, 121))  # every step reported, none skipped
    for step, (before, after) in twice.items():
        assert after == pytest.approx(before, rel=1e-4), f"step {step} differs after resuming"


def test_loss_falls_and_metrics_are_reported(finished_run):
    metrics = [e["data"] for e in finished_run["events"] if e["type"] == "metrics"]
    first, last = metrics[0], finished_run["result"]
    assert first["step"] == 1
    assert last["train_loss"] < first["train_loss"] - 0.1
    for key in ("train_loss", "train_mean_token_accuracy", "learning_rate", "tokens_per_second",
                "supervised_tokens", "total_steps"):
        assert key in first
    assert finished_run["result"]["trained_tokens"] > 0


def test_the_job_driver_loads_no_training_library():
    """A job's driver builds the trainer in a process that never trains: what it imports must
    not pull in peft, transformers or datasets, ~2.5 s added to the start of every job."""
    probe = ("import sys, service.jobs.driver, service.core.events, training.run; "
             "print(sorted(m for m in ('peft', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=REPO)
    assert out.stdout.strip() == "[]"


def train_worker_log_lines() -> list[str]:
    """Every line the session's Ray Train workers wrote to their logs (``worker-*.err``)."""
    import glob

    import ray

    logs_dir = ray._private.worker._global_node.get_logs_dir_path()
    lines = []
    for path in glob.glob(os.path.join(logs_dir, "worker-*.err")):
        with open(path, errors="replace") as f:
            text = f.read()
        if ":actor_name:RayTrainWorker" in text:
            lines += text.splitlines()
    return lines


def test_training_workers_log_no_printed_bytecode(finished_run):
    """An operator reads the Train workers' logs: what the training code says is there, and not
    a disassembly some library printed into a captured stream (dill's ``dis.dis``, when datasets
    fingerprints the tokenised data), which Ray Train's print patch made ~40 INFO lines a job."""
    import re

    lines = train_worker_log_lines()
    assert any("Verified settings" in line for line in lines), "no Train worker log found"
    # "  160     2 LOAD_GLOBAL      0 (pa)", "66 RETURN_VALUE": plain or inside a JSON line
    bytecode = re.compile(r'\d+ (RESUME|LOAD_[A-Z_]+|PRECALL|CALL|RETURN_VALUE)( {2,}|"|$)')
    assert [line for line in lines if bytecode.search(line)] == []


def test_final_adapter_is_complete_and_changes_the_output(finished_run, tmp_path):
    storage = finished_run["storage"]
    manifest = json.loads(storage.get(f"adapters/{JOB}/final/manifest.json"))
    for key in ("base_model", "base_weights_hash", "template_hash", "eot_token_ids", "lora",
                "data_hashes", "hyperparameters", "seed", "versions", "metrics", "job_id",
                "tenant", "step"):
        assert key in manifest
    assert manifest["step"] == 120 and FILE in manifest["data_hashes"]
    assert manifest["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                  "gate_proj", "up_proj", "down_proj"]
    assert storage.exists(f"adapters/{JOB}/ckpt-step-{CHECKPOINT_EVERY}/manifest.json")

    storage.download_prefix(f"adapters/{JOB}/final", tmp_path)
    model_dir = registry.resolve_model(registry.TINY_MODEL_ID)
    inputs = torch.tensor([[1, 2, 3, 4, 5]])
    base = registry.load_model(model_dir).eval()
    with torch.no_grad():
        before = base(inputs).logits
        tuned = PeftModel.from_pretrained(base, str(tmp_path)).eval()
        after = tuned(inputs).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_training_from_a_tuned_model_continues_its_adapter(finished_run):
    """A job on an ``ft:`` model starts from that model's adapter (shape and weights), so the
    loss before its first step is already the tuned model's, not the base model's."""
    storage, first = finished_run["storage"], finished_run["spec"]
    job = "ftjob-" + "c" * 24
    spec = TrainSpec(job_id=job, base_model=registry.TINY_MODEL_ID, training_files=((FILE, 1.0),),
                     n_epochs=1, batch_size=80, cpus_per_worker=1, checkpoint_every_steps=0,
                     seed=4, lora_r=4, init_adapter=f"adapters/{JOB}/final")
    with pytest.MonkeyPatch.context() as env:
        for name, value in finished_run["env"].items():
            env.setenv(name, value)
        run_training(spec, finished_run["config"])
    evs = [json.loads(storage.get(i.key)) for i in storage.iter(f"jobs/{job}/events/")]
    assert any(e["message"] == f"Starting from the adapter adapters/{JOB}/final" for e in evs)
    initial = next(e["data"]["initial_loss"] for e in evs if "initial_loss" in e["data"])
    base_initial = next(e["data"]["initial_loss"] for e in finished_run["events"]
                        if "initial_loss" in e["data"])
    assert initial < base_initial - 0.5
    manifest = json.loads(storage.get(f"adapters/{job}/final/manifest.json"))
    assert manifest["init_adapter"] == f"adapters/{JOB}/final"
    assert manifest["lora"]["r"] == first.lora_r  # the adapter's shape, not the spec's r=4


def test_a_worker_runs_the_frozen_layers_ahead_and_trains_as_one_that_does_not(finished_run):
    """LoRA on the last layer only: a worker with 2 CPUs runs the frozen first layer of the next
    step ahead, on a thread of its own (``training.cpu.lookahead``); a worker with 1 CPU cannot.
    Over two epochs (the first step of each has nothing run ahead) both report the same losses,
    step by step, and the same final adapter."""
    storage = finished_run["storage"]
    runs = {}
    for cpus, job in ((2, "ftjob-" + "a" * 24), (1, "ftjob-" + "b" * 24)):
        spec = TrainSpec(job_id=job, base_model=registry.TINY_MODEL_ID, training_files=((FILE, 1.0),),
                         n_epochs=2, batch_size=40, lora_layers=1, cpus_per_worker=cpus,
                         checkpoint_every_steps=0, seed=5)
        with pytest.MonkeyPatch.context() as env:
            for name, value in finished_run["env"].items():
                env.setenv(name, value)
            run_training(spec, finished_run["config"])
        evs = [json.loads(storage.get(i.key)) for i in storage.iter(f"jobs/{job}/events/")]
        runs[cpus] = {
            "worker": next(e["message"] for e in evs if e["message"].startswith("Worker 0/1")),
            "losses": [e["data"]["train_loss"] for e in evs
                       if e["type"] == "metrics" and "train_loss" in e["data"]],
            "adapter": storage.get(f"adapters/{job}/final/adapter_model.safetensors"),
        }
    assert "2 torch threads (one runs the 1 frozen layers of the next step ahead)" in runs[2]["worker"]
    assert "ahead" not in runs[1]["worker"]
    assert len(runs[2]["losses"]) == len(runs[1]["losses"]) == 16  # 320 examples / 40, twice
    assert runs[2]["losses"] == pytest.approx(runs[1]["losses"], rel=1e-3)
    ahead, alone = (safetensors.torch.load(runs[c]["adapter"]) for c in (2, 1))
    assert ahead.keys() == alone.keys()
    for name in ahead:
        torch.testing.assert_close(ahead[name], alone[name], rtol=1e-2, atol=1e-4)


def test_a_dead_runs_placement_group_is_freed_without_the_dashboard(ray_local):
    """Ray Train's cleaner frees the CPUs of a run whose controller died. It asks whether the
    controller lives, which Ray asks the dashboard (not running here, nor in the embedded
    service); the workers' setup hook has it ask the GCS."""
    import ray
    from ray.util.placement_group import (
        placement_group,
        placement_group_table,
        remove_placement_group,
    )

    from tests.helpers import wait_until

    @ray.remote(num_cpus=0)
    class Controller:
        def actor_id(self) -> str:
            return ray.get_runtime_context().get_actor_id()

    @ray.remote(num_cpus=0)
    class Cleaner:
        """Ray Train's cleaner, in a new worker that first runs what the setup hook runs."""

        def __init__(self, controller_id: str):
            from service.ray.embedded import ask_the_gcs_whether_train_controllers_live

            ask_the_gcs_whether_train_controllers_live()
            from ray.train.v2._internal.execution.controller.placement_group_cleaner import (
                PlacementGroupCleaner,
            )

            self.cleaner = PlacementGroupCleaner(controller_id, check_interval_s=0.2,
                                                 get_actor_timeout_s=1, stop_timeout=2)

        def watch(self, pg) -> None:
            self.cleaner.register_placement_group(pg)
            self.cleaner.start_monitoring()

    controller = Controller.remote()
    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready(), timeout=30)
    try:
        # A worker of its own (its own runtime env): no earlier import of the cleaner counts.
        cleaner = Cleaner.options(runtime_env={"env_vars": {"TUNESERVE_FRESH_WORKER": "1"}}) \
            .remote(ray.get(controller.actor_id.remote()))
        ray.get(cleaner.watch.remote(pg))
        time.sleep(2)  # ten checks: a live controller keeps its placement group
        assert placement_group_table(pg).get("state") == "CREATED"

        ray.kill(controller)
        wait_until(lambda: placement_group_table(pg).get("state", "REMOVED") == "REMOVED", 30,
                   what="the dead controller's placement group to be removed")
    finally:
        if placement_group_table(pg).get("state", "REMOVED") != "REMOVED":
            remove_placement_group(pg)  # the other tests need the CPU
