"""Fit, time and cost before a job runs (issue 36): ``dry_run`` answers the estimate and creates
nothing; a job that cannot fit the largest worker is a 400 at ``POST`` with the estimate and what
to change; the default parallelism is ``fsdp`` when one worker cannot hold the job; the job
carries its estimate and ``estimated_finish`` comes from it before steps are measured.

How close the estimate's memory is to what training peaks at is tests/test_fsdp.py's (the tiny
model, measured in the same runs) and bench/fsdp_vs_ddp.py's (SmolLM2).
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.core.settings import Settings
from tests.helpers import sorting_lines
from training import estimate as est
from training.model import registry
from training.spec import TrainSpec


def client_for(tmp_path, **settings) -> TestClient:
    app = create_app(Settings(storage=str(tmp_path / "store"), api_keys={"key": "tenant"},
                              builtin_models=False, **settings))
    client = TestClient(app)
    client.headers["Authorization"] = "Bearer key"
    return client


def upload(client: TestClient) -> str:
    response = client.post("/v1/files", files={"file": ("t.jsonl", sorting_lines(64, 1))},
                           data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def tiny_estimate(**fields) -> est.Estimate:
    spec = TrainSpec(job_id="ftjob-" + "0" * 24, base_model=registry.TINY_MODEL_ID,
                     training_files=(("file-" + "0" * 24, 1.0),), n_epochs=1, batch_size=8,
                     **fields)
    data = est.DataShape(examples=64, tokens=64 * 30, longest=40, supervised_fraction=0.3)
    return est.estimate(est.model_shape(registry.TINY_MODEL_ID), spec, data, bf16=True)


def test_dry_run_returns_the_estimate_and_creates_nothing(tmp_path):
    with client_for(tmp_path, gpu_price_per_hour=2.5) as client:
        file_id = upload(client)
        body = {"model": registry.TINY_MODEL_ID, "training_file": file_id,
                "hyperparameters": {"n_epochs": 2, "batch_size": 8}, "full_finetune": True,
                "num_workers": 2, "parallelism": "fsdp", "dry_run": True}
        r = client.post("/v1/fine_tuning/jobs", json=body)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["object"] == "fine_tuning.job.estimate" and "id" not in answer
        estimate = answer["estimate"]
        assert answer["parallelism"] == "fsdp" and estimate["workers"] == 2
        parts = ("weights", "gradients", "optimizer", "activations", "logits", "gathered")
        assert estimate["memory_per_worker_bytes"] == sum(estimate[p] for p in parts) > 0
        # Two epochs of the file's tokens (its description at upload), a time, no cost on CPU.
        description = client.get(f"/v1/files/{file_id}").json().get("description") or {}
        mean = (description.get("tokens") or {}).get("mean")
        if mean:
            assert estimate["tokens"] == pytest.approx(2 * 64 * mean, rel=0.01)
        assert estimate["seconds"] > 0 and estimate["cost"] is None
        gpu = client.post("/v1/fine_tuning/jobs", json={**body, "use_gpu": True}).json()
        hours = gpu["estimate"]["seconds"] / 3600
        assert gpu["estimate"]["cost"] == pytest.approx(hours * 2 * 2.5, rel=0.01)
        # Nothing was created: no job listed, no job record in storage.
        assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
        storage = client.app.state.storage
        assert [i.key for i in storage.iter("jobs/")] == []
        # Without dry_run the job carries the same estimate and its parallelism.
        job = client.post("/v1/fine_tuning/jobs", json={**body, "dry_run": False}).json()
        assert job["object"] == "fine_tuning.job" and job["parallelism"] == "fsdp"
        assert job["estimate"] == estimate


def test_a_job_too_large_for_the_largest_worker_is_refused_naming_what_to_change(tmp_path):
    full = tiny_estimate(full_finetune=True).per_worker
    lora = tiny_estimate().per_worker
    limit_gb = (full + lora) / 2 / 1e9  # a full fine-tune does not fit, a LoRA adapter does
    with client_for(tmp_path, worker_memory_gb=limit_gb) as client:
        file_id = upload(client)
        body = {"model": registry.TINY_MODEL_ID, "training_file": file_id,
                "hyperparameters": {"n_epochs": 1, "batch_size": 8}}
        r = client.post("/v1/fine_tuning/jobs", json={**body, "full_finetune": True,
                                                      "parallelism": "ddp"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "job_too_large" and error["param"] == "full_finetune"
        assert f"largest training worker ({limit_gb:g} GB)" in error["message"]
        assert "GB per worker (ddp, 1 workers: weights" in error["message"]
        assert "train a LoRA adapter (full_finetune false)" in error["message"]
        assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
        ok = client.post("/v1/fine_tuning/jobs", json=body)  # LoRA fits
        assert ok.status_code == 200 and ok.json()["estimate"]["memory_per_worker_bytes"] < \
            limit_gb * 1e9


def test_the_default_parallelism_shards_what_one_worker_cannot_hold(tmp_path):
    ddp = tiny_estimate(full_finetune=True, num_workers=4).per_worker
    fsdp = tiny_estimate(full_finetune=True, num_workers=4, parallelism="fsdp").per_worker
    assert fsdp < ddp
    with client_for(tmp_path, worker_memory_gb=(ddp + fsdp) / 2 / 1e9) as client:
        file_id = upload(client)
        body = {"model": registry.TINY_MODEL_ID, "training_file": file_id, "num_workers": 4,
                "full_finetune": True, "hyperparameters": {"n_epochs": 1, "batch_size": 8}}
        job = client.post("/v1/fine_tuning/jobs", json=body).json()
        assert job["parallelism"] == "fsdp", job
        lora = client.post("/v1/fine_tuning/jobs", json={**body, "full_finetune": False}).json()
        assert lora["parallelism"] == "ddp"  # fits one worker: no sharding
        refused = client.post("/v1/fine_tuning/jobs", json={**body, "parallelism": "ddp"})
        assert refused.status_code == 400 and "set parallelism to 'fsdp'" in refused.text


def test_an_unknown_parallelism_is_a_400_naming_the_field(tmp_path):
    with client_for(tmp_path) as client:
        file_id = upload(client)
        r = client.post("/v1/fine_tuning/jobs", json={
            "model": registry.TINY_MODEL_ID, "training_file": file_id, "parallelism": "zero3"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "parallelism", r.text
    # FSDP keeps every rank's passes in step for the supervised recipe only.
    spec = TrainSpec(job_id="ftjob-" + "0" * 24, base_model=registry.TINY_MODEL_ID,
                     training_files=(("file-" + "0" * 24, 1.0),), method="dpo",
                     parallelism="fsdp", num_workers=2)
    with pytest.raises(Exception, match="parallelism 'fsdp' trains supervised jobs only"):
        spec.validate()


def test_estimated_finish_comes_from_the_estimate_until_steps_are_measured(tmp_path):
    import time

    from service.core.storage import open_storage
    from service.core.storage.config import StorageConfig
    from service.jobs.progress import estimated_finish

    storage = open_storage(StorageConfig(uri=str(tmp_path)))
    job_id = "ftjob-" + "1" * 24
    assert estimated_finish(storage, job_id) is None
    now = time.time()
    assert estimated_finish(storage, job_id, {"seconds": 600.0}) == pytest.approx(now + 600,
                                                                                  abs=5)
