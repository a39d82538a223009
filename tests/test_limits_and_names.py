"""One place for each fact: the names of models, ids and storage keys (``service/core/names.py``)
and the limits (``service/core/limits.py``) that the API, the training spec and serving share.

The unit tests pin the names' round trips and that the three checks meet at the same bounds;
the end-to-end ones (``tuneserve up`` on SeaweedFS S3, the openai SDK, real Ray Train runs on
the tiny model) show what a caller relies on: a job at the largest accepted rank trains and its
model answers in chat, and every checkpoint a DPO job on an ``ft:`` model lists answers too.
"""

from __future__ import annotations

import io
import json
import os
import time

import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api.app import create_app
from service.api.schemas import CreateJobRequest
from service.core import limits, names
from service.core.errors import InvalidRequest, NotFound
from service.core.settings import Settings
from serving.adapters import AdapterIncompatible, check_manifest
from tests.helpers import Service, wait_until
from training.spec import TrainSpec

TINY = "tuneserve/tiny-llama"
JOB = "ftjob-0123456789abcdef01234567"
OTHER_JOB = "ftjob-fedcba9876543210fedcba98"


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [TINY, "HuggingFaceTB/SmolLM2-135M-Instruct", "org/team/model",
                                  "plain"])
@pytest.mark.parametrize("suffix", ["", "my-model.v2_1"])
@pytest.mark.parametrize("step", [None, 0, 7, 120000])
def test_tuned_model_names_round_trip(base, suffix, step):
    tuned = names.TunedModel(base, suffix, JOB, step)
    assert names.parse_tuned_model(tuned.name) == tuned
    expected = f"ft:{base}:{suffix}:{JOB}" + ("" if step is None else f":ckpt-step-{step}")
    assert tuned.name == expected
    # The adapter the name stands for, as Serve multiplexes it and storage holds it.
    assert names.ADAPTER_ID.match(tuned.adapter_id)
    folder = "final" if step is None else f"ckpt-step-{step}"
    assert tuned.adapter_id == f"{JOB}/{folder}"
    assert names.adapter_prefix(JOB, step) == f"adapters/{JOB}/{folder}"
    assert names.adapter_key(tuned.adapter_id, "manifest.json") == f"adapters/{JOB}/{folder}/manifest.json"
    assert names.checkpoint_step(folder) == step
    assert tuned.final == names.TunedModel(base, suffix, JOB)


def test_a_model_tuned_from_a_tuned_model_names_the_base():
    parent = names.tuned_model(TINY, "sft", JOB)
    assert parent.name == f"ft:{TINY}:sft:{JOB}"
    child = names.tuned_model(parent.name, "dpo", OTHER_JOB)
    assert child.name == f"ft:{TINY}:dpo:{OTHER_JOB}"
    checkpoint = names.tuned_model(names.tuned_model(TINY, "x", JOB, 5).name, None, OTHER_JOB, 3)
    assert checkpoint.name == f"ft:{TINY}::{OTHER_JOB}:ckpt-step-3"
    assert names.base_model_of(checkpoint.name) == TINY == names.base_model_of(TINY)


@pytest.mark.parametrize("name", [
    "ft:", "ft:::", f"ft::s:{JOB}", f"ft:{TINY}:s:ftjob-123", f"ft:{TINY}:s:{JOB}:ckpt-step-x",
    f"ft:{TINY}:s:{JOB}:final", f"ft:{TINY}:s:{JOB}:ckpt-step-1:more", f"ft:a:b:s:{JOB}",
    f"ft:ft:{TINY}:s:{JOB}",
])
def test_malformed_tuned_model_names_are_not_found(name):
    with pytest.raises(NotFound) as info:
        names.parse_tuned_model(name)
    assert info.value.param == "model" and info.value.code == "model_not_found"


@pytest.mark.parametrize("name", [TINY, "gpt-4o-mini", "ft", "FT:x:y:" + JOB])
def test_other_names_are_not_tuned_model_names(name):
    assert names.parse_tuned_model(name) is None
    assert names.base_model_of(name) == name


def test_ids():
    job_id, file_id = names.new_job_id(), names.new_file_id()
    assert names.JOB_ID.match(job_id) and names.FILE_ID.match(file_id)
    assert job_id != names.new_job_id()
    assert not names.JOB_ID.match(file_id) and not names.FILE_ID.match(job_id)
    assert not names.JOB_ID.match(job_id + "0") and not names.JOB_ID.match(job_id.upper())
    assert names.checkpoint_id(JOB, 42) == "ftckpt-0123456789abcdef01234567-00000042"


def test_storage_keys_are_the_documented_ones():
    file_id = "file-00112233445566778899aabb"
    assert names.file_content_key(file_id) == f"files/{file_id}/content"
    assert names.file_record_key(file_id) == f"files/{file_id}/object.json"
    assert names.file_prefix(file_id) == f"files/{file_id}/"
    index = names.file_index_key("tenant-a", 17, file_id)
    assert index == f"file-index/tenant-a/00000000000000000017-{file_id}"
    assert index.startswith(names.file_index_prefix("tenant-a"))
    assert names.file_id_from_index_key(index) == file_id
    assert names.job_key(JOB) == f"jobs/{JOB}/job.json" and names.is_job_key(names.job_key(JOB))
    assert not names.is_job_key(f"jobs/{JOB}/events/x/job.json")
    event = names.event_key(JOB, 1_700_000_000_000_000_123, 4)
    assert event == f"jobs/{JOB}/events/01700000000000000123-000004.json"
    assert event.startswith(names.events_prefix(JOB))
    assert names.event_created_ns(event) == 1_700_000_000_000_000_123
    assert names.event_id_from_key(event) == "ftevent-01700000000000000123-000004"
    assert names.run_key(JOB) == f"jobs/{JOB}/run"
    assert names.split_prefix(JOB, "train") == f"jobs/{JOB}/data/train"
    assert names.job_adapters_prefix(JOB) == f"adapters/{JOB}/"
    assert names.ref_logps_key("ab" * 16) == f"cache/ref-logps/{'ab' * 16}.safetensors"
    assert names.model_prefix("tiny-llama-0123") == "models/tiny-llama-0123/"


@pytest.mark.parametrize("build", [
    lambda: names.job_key("../x"), lambda: names.file_content_key(""),
    lambda: names.adapter_key("ftjob-x/../../files"), lambda: names.split_prefix(JOB, ".."),
])
def test_keys_refuse_path_tricks(build):
    with pytest.raises(InvalidRequest):
        build()


# -- limits ------------------------------------------------------------------------------------

# (API param, request body at a value, TrainSpec field and its param, largest value, step above)
BOUNDS = [
    ("lora.r", lambda v: {"lora": {"r": v}}, "lora_r", "lora.r", limits.MAX_LORA_RANK, 1),
    ("lora.layers", lambda v: {"lora": {"layers": v}}, "lora_layers", "lora.layers",
     limits.MAX_LORA_LAYERS, 1),
    ("hyperparameters.n_epochs", lambda v: {"hyperparameters": {"n_epochs": v}}, "n_epochs",
     "n_epochs", limits.MAX_EPOCHS, 1),
    ("hyperparameters.batch_size", lambda v: {"hyperparameters": {"batch_size": v}},
     "batch_size", "batch_size", limits.MAX_BATCH_SIZE, 1),
    ("hyperparameters.learning_rate_multiplier",
     lambda v: {"hyperparameters": {"learning_rate_multiplier": v}}, "learning_rate_multiplier",
     "learning_rate_multiplier", limits.MAX_LEARNING_RATE_MULTIPLIER, 0.5),
    ("num_workers", lambda v: {"num_workers": v}, "num_workers", "num_workers",
     limits.MAX_WORKERS, 1),
    ("method.dpo.hyperparameters.beta",
     lambda v: {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": v}}}}, "beta",
     "beta", limits.MAX_BETA, 0.5),
    ("method.dpo.hyperparameters.rpo_alpha",
     lambda v: {"method": {"type": "dpo", "dpo": {"hyperparameters": {"rpo_alpha": v}}}},
     "rpo_alpha", "rpo_alpha", limits.MAX_RPO_ALPHA, 0.5),
]
IDS = [b[0] for b in BOUNDS]


def _spec(field: str, value, dpo: bool) -> TrainSpec:
    return TrainSpec(job_id=JOB, base_model=TINY, method="dpo" if dpo else "supervised",
                     training_files=(("file-00112233445566778899aabb", 1.0),), **{field: value})


@pytest.mark.parametrize("param, body, field, spec_param, high, step", BOUNDS, ids=IDS)
def test_the_request_and_the_training_spec_share_each_bound(param, body, field, spec_param,
                                                            high, step):
    request = {"model": TINY, "training_file": "file-00112233445566778899aabb"}
    dpo = param.startswith("method.dpo")
    CreateJobRequest.model_validate({**request, **body(high)})
    _spec(field, high, dpo).validate()
    with pytest.raises(ValidationError) as info:
        CreateJobRequest.model_validate({**request, **body(high + step)})
    assert ".".join(str(p) for p in info.value.errors()[0]["loc"]).startswith(param)
    with pytest.raises(InvalidRequest) as refused:
        _spec(field, high + step, dpo).validate()
    assert refused.value.param == spec_param


def test_context_length_bounds_of_the_spec():
    for field in ("max_length", "pack_length"):
        _spec(field, limits.MIN_CONTEXT_LENGTH, False).validate()
        _spec(field, limits.MAX_CONTEXT_LENGTH, False).validate()
        for value in (limits.MIN_CONTEXT_LENGTH - 1, limits.MAX_CONTEXT_LENGTH + 1):
            with pytest.raises(InvalidRequest) as info:
                _spec(field, value, False).validate()
            assert info.value.param == field


def _manifest(rank: int) -> dict:
    return {"base_model": TINY, "base_weights_hash": "w", "template_hash": "t", "job_id": JOB,
            "lora": {"r": rank}}


def test_serving_serves_every_rank_a_job_accepts():
    fingerprint = {"base_weights_hash": "w", "template_hash": "t"}
    for rank in (1, limits.MAX_LORA_RANK):
        check_manifest(_manifest(rank), base_model=TINY, fingerprint=fingerprint)
    with pytest.raises(AdapterIncompatible, match=f"rank {limits.MAX_LORA_RANK + 1}; supported "
                                                  f"ranks are 1 to {limits.MAX_LORA_RANK}"):
        check_manifest(_manifest(limits.MAX_LORA_RANK + 1), base_model=TINY,
                       fingerprint=fingerprint)


def test_settings_defaults_come_from_the_table():
    settings = Settings(storage="/tmp/unused")
    assert settings.max_adapters_per_replica == limits.ADAPTERS_PER_REPLICA
    assert settings.max_tokens_cap == limits.MAX_TOKENS


def test_post_a_rank_above_the_cap_is_a_400_naming_lora_r(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."},
                          {"role": "assistant", "content": f"{i}"}]} for i in range(8)]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    with TestClient(create_app(Settings(storage=str(tmp_path / "store")))) as client:
        file_id = client.post("/v1/files", files={"file": ("t.jsonl", data)},
                              data={"purpose": "fine-tune"}).json()["id"]
        body = {"model": TINY, "training_file": file_id}
        refused = client.post("/v1/fine_tuning/jobs",
                              json={**body, "lora": {"r": limits.MAX_LORA_RANK + 1}})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "lora.r"
        accepted = client.post("/v1/fine_tuning/jobs",
                               json={**body, "lora": {"r": limits.MAX_LORA_RANK}})
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["lora"]["r"] == limits.MAX_LORA_RANK


def test_checkpoints_of_a_job_on_a_tuned_model_are_named_after_the_base(tmp_path):
    """The API alone, over a local store holding what two finished runs leave there."""
    from service.jobs.store import JobRecord, JobStore

    app = create_app(Settings(storage=str(tmp_path / "store")))
    storage = app.state.storage
    parent = names.tuned_model(TINY, "sft", JOB)
    for job_id, model, suffix in ((JOB, TINY, "sft"), (OTHER_JOB, parent.name, "dpo")):
        JobStore(storage).create(JobRecord(
            id=job_id, created_at=int(time.time()), model=model, suffix=suffix,
            training_file="file-" + "0" * 24, seed=1, organization_id="local",
            status="succeeded", method={"type": "dpo" if job_id == OTHER_JOB else "supervised"},
            fine_tuned_model=names.tuned_model(model, suffix, job_id).name))
    for job_id, step in ((JOB, None), (OTHER_JOB, None), (OTHER_JOB, 2), (OTHER_JOB, 4)):
        storage.put(names.adapter_key(names.adapter_id(job_id, step), "manifest.json"),
                    json.dumps({"metrics": {"train_loss": 0.5}}).encode())

    with TestClient(app) as client:
        listed = client.get(f"/v1/fine_tuning/jobs/{OTHER_JOB}/checkpoints").json()["data"]
        models = {m["id"] for m in client.get("/v1/models").json()["data"]}
        checkpoint_names = [c["fine_tuned_model_checkpoint"] for c in listed]
        assert checkpoint_names == [f"ft:{TINY}:dpo:{OTHER_JOB}:ckpt-step-{s}" for s in (4, 2)]
        assert [c["id"] for c in listed] == [names.checkpoint_id(OTHER_JOB, s) for s in (4, 2)]
        for name in checkpoint_names:
            assert name in models
            assert client.get(f"/v1/models/{name}").json()["id"] == name
        assert f"ft:{TINY}:dpo:{OTHER_JOB}" in models and parent.name in models
        assert not [m for m in models if m.startswith("ft:ft:")]


# -- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(s3_server):
    storage = f"s3://{s3_server.bucket}/limits-names-{os.getpid()}-{int(time.time())}"
    env = {**s3_server.env, "TUNESERVE_S3_ENDPOINT_URL": s3_server.endpoint_url,
           "TUNESERVE_CPUS_PER_WORKER": "1"}
    with Service(storage, env=env) as service:
        yield openai.OpenAI(base_url=f"{service.url}/v1", api_key="local", max_retries=0,
                            timeout=120)


def _upload(client, rows: list[dict], name: str) -> str:
    data = "\n".join(json.dumps(r) for r in rows).encode()
    return client.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune").id


def _finished(client, job_id: str):
    return wait_until(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in
                      {"succeeded", "failed", "cancelled"} and j, 400, interval=1,
                      what=f"job {job_id} to finish")


def _answers(client, model: str) -> None:
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, seed=1)
    assert answer.model == model
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens >= 1


@pytest.fixture(scope="module")
def preferences():
    from tests.test_dpo_loss import load_make_preferences

    train, _ = load_make_preferences().make_preferences(16, 0, seed=3)
    return train


@pytest.fixture(scope="module")
def top_rank_job(client, preferences):
    """An SFT job at the largest accepted LoRA rank, finished."""
    rows = [{"messages": [*r["prompt"], {"role": "assistant", "content": r["chosen"]}]}
            for r in preferences]
    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=_upload(client, rows, "sft.jsonl"), suffix="top",
        method={"type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}},
        extra_body={"lora": {"r": limits.MAX_LORA_RANK}})
    return _finished(client, job.id)


@pytest.mark.slow
def test_a_job_at_the_largest_rank_trains_and_answers_one_above_is_refused(client, top_rank_job):
    job = top_rank_job
    assert job.status == "succeeded", job.error
    assert job.model_extra["lora"]["r"] == limits.MAX_LORA_RANK
    assert job.fine_tuned_model == f"ft:{TINY}:top:{job.id}"
    _answers(client, job.fine_tuned_model)

    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(model=TINY, training_file=job.training_file,
                                       extra_body={"lora": {"r": limits.MAX_LORA_RANK + 1}})
    assert info.value.status_code == 400
    assert info.value.param == "lora.r"


@pytest.mark.slow
def test_every_checkpoint_of_a_dpo_job_on_a_tuned_model_answers(client, top_rank_job,
                                                                 preferences):
    assert top_rank_job.status == "succeeded", top_rank_job.error
    job = client.fine_tuning.jobs.create(
        model=top_rank_job.fine_tuned_model, suffix="dpo",
        training_file=_upload(client, preferences, "pairs.jsonl"),
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 8}}})
    done = _finished(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{TINY}:dpo:{job.id}"

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [4, 2]  # 16 pairs / 8 × 2 epochs, newest first
    listed = {m.id for m in client.models.list().data}
    for checkpoint in checkpoints:
        name = checkpoint.fine_tuned_model_checkpoint
        assert not name.startswith("ft:ft:")
        assert name == f"{done.fine_tuned_model}:ckpt-step-{checkpoint.step_number}"
        assert client.models.retrieve(name).id == name
        assert name in listed
        _answers(client, name)
    _answers(client, done.fine_tuned_model)
