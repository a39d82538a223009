"""The job's training spec: built once at ``POST /v1/fine_tuning/jobs`` (a spec that cannot run
is a 400 naming the field), "auto" resolved from every training file with its weight, stored
typed in the job record, and what the run trains.

The API tests run FastAPI's TestClient over a temporary local store without a job runner; the
last test runs the stored spec on a local Ray with the tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.routes.fine_tuning import read_events
from service.api.schemas import CreateJobRequest, DpoHyperparameters, LoraSettings
from service.core.errors import InvalidRequest
from service.core.settings import Settings
from service.jobs.scheduler import RayJobRunner
from service.jobs.spec import build_spec
from service.jobs.store import JobRecord, JobStore
from tests.helpers import wait_until
from training.data import packing
from training.spec import SPEC_VERSION, TrainSpec, weighted_size

TINY = "tuneserve/tiny-llama"


def chat_lines(n: int) -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."},
                          {"role": "assistant", "content": f"{i}"}]} for i in range(n)]
    return "\n".join(json.dumps(r) for r in rows).encode() + b"\n"


def pref_lines(n: int) -> bytes:
    rows = [{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": f"It is {i}, I think."}
            for i in range(n)]
    return "\n".join(json.dumps(r) for r in rows).encode() + b"\n"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(storage=str(tmp_path / "store"), cpus_per_worker=1)


@pytest.fixture
def app(settings):
    return create_app(settings)


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        yield c


def upload(client, content: bytes) -> str:
    r = client.post("/v1/files", files={"file": ("train.jsonl", content)},
                    data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def create(client, **body):
    return client.post("/v1/fine_tuning/jobs", json={"model": TINY, **body})


# -- "auto" from every training file -----------------------------------------------------------

MIXES = [
    # 30 + 2.5 × 20 = 30 + 40 + 10 = 80 examples an epoch: n_epochs = ceil(400 / 80) = 5 (the
    # first file alone gave ceil(400 / 30) = 14); batch_size: 2^round(log2(0.8)) = 1, raised to 4.
    pytest.param(30, 20, 2.5, (5, 4, 1.0), id="small-mix-sets-epochs"),
    # 300 + 3.5 × 100 = 650 examples: batch_size = 2^round(log2(6.5)) = 8 (the first file
    # alone gave 2^round(log2(3)) = 4); 3 × 650 ≥ 400, so n_epochs stays 3.
    pytest.param(300, 100, 3.5, (3, 8, 1.0), id="large-mix-sets-batch"),
]


@pytest.mark.parametrize("n_first,n_second,weight,expected", MIXES)
def test_auto_hyperparameters_come_from_every_training_file_and_its_weight(
        client, app, n_first, n_second, weight, expected):
    first, second = upload(client, chat_lines(n_first)), upload(client, chat_lines(n_second))
    r = create(client, training_file=first, training_files=[{"file": second, "weight": weight}])
    assert r.status_code == 200, r.text
    job = r.json()
    reported = job["method"]["supervised"]["hyperparameters"]
    assert (reported["n_epochs"], reported["batch_size"],
            reported["learning_rate_multiplier"]) == expected
    assert job["hyperparameters"] == reported
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["hyperparameters"] == reported

    spec = JobStore(app.state.storage).get(job["id"]).spec
    assert isinstance(spec, TrainSpec)
    assert (spec.n_epochs, spec.batch_size, spec.learning_rate_multiplier) == expected
    assert spec.training_files == ((first, 1.0), (second, weight))


def test_weighted_size_counts_files_as_the_data_plan_draws_them():
    """10 examples at weight 1.5 are seen 15 times an epoch and bring 1.5 × their 1000 tokens;
    4 at 0.25 are sampled once, with a quarter of their 40 tokens."""
    assert weighted_size([(10, 1000, 1.5), (4, 40, 0.25)]) == (16, 1510)
    sources, weights = [0] * 10 + [1] * 4, [1.5, 0.25]
    assert packing.epoch_length(sources, weights) == 16
    assert len(packing.epoch_order(sources, weights, seed=1, epoch=0)) == 16


def test_auto_epochs_follow_the_tokens_of_every_file():
    """2,000 examples of 1,000 tokens each at weight 1, and the same at weight 3: 8,000 examples
    and 8M tokens an epoch. The 10M-token budget allows 10,000 examples, so one epoch (the first
    file alone, 6,000 examples in 3 epochs, stayed at 3)."""
    a, b = "file-" + "a" * 24, "file-" + "b" * 24
    record = JobRecord(
        id="ftjob-" + "c" * 24, created_at=0, model=TINY, training_file=a, seed=1,
        organization_id="t", method={"type": "supervised"},
        extensions={"training_files": [{"file": b, "weight": 3.0}]})
    spec = build_spec(record, {a: (2000, 2_000_000), b: (2000, 2_000_000)})
    assert (spec.n_epochs, spec.batch_size) == (1, 32)
    alone = build_spec(record.model_copy(update={"extensions": {}}), {a: (2000, 2_000_000)})
    assert alone.n_epochs == 3


# -- a spec that cannot run is a 400 at POST ---------------------------------------------------


def test_a_spec_that_cannot_run_is_a_400_naming_the_param(client, app):
    chat, prefs = upload(client, chat_lines(8)), upload(client, pref_lines(8))
    cases = [
        ({"training_file": chat, "training_files": [{"file": prefs}]}, "training_files[0].file"),
        ({"training_file": chat, "validation_file": prefs}, "validation_file"),
        ({"training_file": prefs, "validation_file": chat, "method": {"type": "dpo"}},
         "validation_file"),
        # DPO's reference is the policy with its adapter off: it needs an adapter.
        ({"training_file": prefs, "method": {"type": "dpo"}, "full_finetune": True},
         "full_finetune"),
    ]
    for body, param in cases:
        r = create(client, **body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.json())
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_continuing_a_fully_fine_tuned_model_is_a_400_naming_model(client, app):
    chat = upload(client, chat_lines(8))
    r = create(client, training_file=chat, full_finetune=True)
    assert r.status_code == 200, r.text
    store, source = JobStore(app.state.storage), r.json()["id"]
    for status in ("queued", "running", "succeeded"):  # as if it had trained
        store.transition(source, status)
    r = create(client, model=f"ft:{TINY}::{source}", training_file=chat)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    assert "LoRA adapter" in r.json()["error"]["message"]


# -- one place for defaults, one stored form ---------------------------------------------------


def test_request_defaults_are_the_training_spec_defaults():
    spec = {f.name: f.default for f in dataclasses.fields(TrainSpec)}
    lora = LoraSettings()
    assert (lora.r, 2 * lora.r, lora.dropout) == (spec["lora_r"], spec["lora_alpha"],
                                                  spec["lora_dropout"])
    assert lora.target_modules is spec["target_modules"] is None
    assert lora.layers is spec["lora_layers"] is None
    request = CreateJobRequest(model=TINY, training_file="file-" + "a" * 24)
    for name in ("full_finetune", "num_workers", "use_gpu", "activation_checkpointing"):
        assert getattr(request, name) == spec[name], name
    assert DpoHyperparameters().rpo_alpha == spec["rpo_alpha"]
    for name in ("n_epochs", "batch_size", "learning_rate_multiplier"):
        assert getattr(DpoHyperparameters(), name) == spec[name] == "auto", name


def test_the_record_stores_the_spec_once_with_its_version(client, app):
    r = create(client, training_file=upload(client, chat_lines(8)), lora={"r": 8})
    stored = json.loads(app.state.storage.get(f"jobs/{r.json()['id']}/job.json"))
    assert stored["spec"]["version"] == SPEC_VERSION
    assert stored["spec"]["lora_r"] == 8 and stored["spec"]["lora_alpha"] == 16
    assert "spec" not in r.json()  # what storage holds, not what the API returns
    with pytest.raises(InvalidRequest, match="version 99") as error:
        TrainSpec.from_dict({**stored["spec"], "version": SPEC_VERSION + 98})
    assert error.value.param == "version"


def test_a_record_written_without_a_spec_gets_one_from_the_scheduler_once(client, app, settings):
    """A job created before records held a spec (hyperparameters "auto", an operator's
    ``max_failures``): the scheduler derives its spec from the same function, from both files."""
    first, second = upload(client, chat_lines(30)), upload(client, chat_lines(20))
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    old = JobRecord(
        id="ftjob-" + "e" * 24, created_at=int(time.time()), model=TINY, training_file=first,
        seed=5, organization_id="local", hyperparameters=auto,
        method={"type": "supervised", "supervised": {"hyperparameters": auto}},
        extensions={"max_failures": 0, "training_files": [{"file": second, "weight": 2.5}]})
    store = JobStore(app.state.storage)
    store.create(old)
    RayJobRunner(settings, start=False)._validate(store.get(old.id))
    queued = store.get(old.id)
    assert queued.status == "queued"
    assert (queued.spec.n_epochs, queued.spec.batch_size, queued.spec.max_failures) == (5, 4, 0)
    assert queued.hyperparameters["n_epochs"] == 5  # 30 + 2.5 × 20 = 80 a epoch: ceil(400 / 80)


# -- the run trains the stored spec ------------------------------------------------------------


@pytest.mark.slow
def test_the_run_trains_the_spec_the_record_holds(client, app, settings, ray_local):
    """The record's spec is changed after creation (as an operator might): the run trains that
    one, not one rebuilt from the request, and records where it placed the workers."""
    r = create(client, training_file=upload(client, chat_lines(16)), seed=3,
               hyperparameters={"n_epochs": 2, "batch_size": 8})
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    store = JobStore(app.state.storage)

    def change(record: JobRecord) -> JobRecord:
        spec = dataclasses.replace(record.spec, n_epochs=1, batch_size=4, lora_r=4, lora_alpha=8,
                                   learning_rate_multiplier=0.5, checkpoint_every_steps=0)
        return record.model_copy(update={"spec": spec})
    stored = store.update(job_id, change).spec

    runner = RayJobRunner(settings, start=False)

    def finished():
        runner.schedule_once()
        record = store.get(job_id)
        return record.status in ("succeeded", "failed", "cancelled") and record
    done = wait_until(finished, 300, interval=1, what=f"job {job_id} to finish")
    assert done.status == "succeeded", done.error
    assert done.spec == dataclasses.replace(stored, cpus_per_worker=1)
    assert done.hyperparameters == {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 0.5}
    manifest = json.loads(app.state.storage.get(f"adapters/{job_id}/final/manifest.json"))
    hp = manifest["hyperparameters"]
    assert (hp["n_epochs"], hp["batch_size"], hp["learning_rate_multiplier"]) == (1, 4, 0.5)
    assert hp["learning_rate"] == pytest.approx(stored.base_learning_rate * 0.5)
    assert manifest["lora"]["r"] == 4 and manifest["seed"] == 3
    steps = [e["data"]["step"] for e in read_events(app.state.storage, job_id)
             if e["type"] == "metrics"]
    assert sorted(steps) == [1, 2, 3, 4]  # 16 examples / 4 × 1 epoch


@pytest.mark.slow
@pytest.mark.parametrize("status", ["cancelled", "paused"])
def test_a_driver_that_outlived_its_jobs_stop_is_stopped_by_the_loop(status, client, app, settings,
                                                                      ray_local):
    """The kill a cancel or pause sends is fire-and-forget: when it is lost, the scheduler's next
    pass sees the job stopped and its driver alive, and stops the driver again."""
    import ray

    from service.jobs import driver as job_driver

    r = create(client, training_file=upload(client, chat_lines(16)))
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    store = JobStore(app.state.storage)
    store.transition(job_id, "queued")
    store.transition(job_id, status, finished_at=int(time.time()) if status == "cancelled" else None)

    @ray.remote(num_cpus=0)
    class Survivor:  # stands in for the driver whose kill was lost; the loop knows it by name
        def ping(self) -> str:
            return "alive"
    survivor = Survivor.options(name=job_id, namespace=job_driver.NAMESPACE,
                                lifetime="detached").remote()
    assert ray.get(survivor.ping.remote()) == "alive"

    RayJobRunner(settings, start=False).schedule_once()
    wait_until(lambda: not job_driver.driver_alive(job_id), 30, what="the stale driver to be stopped")
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(survivor.ping.remote(), timeout=30)
    assert store.get(job_id).status == status  # the decision stands


@pytest.mark.slow
def test_tuneserve_train_runs_a_spec_file(tmp_path, ray_local, capsys):
    """``tuneserve train spec.json`` without the API: a spec file without ``version``, "auto"
    left to the worker (which resolves it from the tokenised data)."""
    from service.core.storage import open_storage
    from service.core.storage.config import StorageConfig
    from training.run import main

    job_id, file_id = "ftjob-" + "f" * 24, "file-" + "f" * 24
    storage = open_storage(StorageConfig(uri=str(tmp_path / "store")))
    storage.put(f"files/{file_id}/content", chat_lines(16))
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({
        "job_id": job_id, "base_model": TINY, "training_files": [[file_id, 1.0]],
        "n_epochs": 1, "batch_size": "auto", "checkpoint_every_steps": 0,
        "storage": str(tmp_path / "store")}))
    assert main([str(spec_file)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    # 16 examples: 2^round(log2(0.16)) = 1, raised to 4; 16 / 4 = 4 steps in the one epoch.
    assert metrics["hyperparameters"]["batch_size"] == 4 and metrics["total_steps"] == 4
    assert storage.exists(f"adapters/{job_id}/final/manifest.json")
