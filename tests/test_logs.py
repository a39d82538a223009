"""Structured logs: JSON lines with request id, tenant and job id, and never a secret."""

from __future__ import annotations

import io
import json
import logging

import pytest
from fastapi.testclient import TestClient

from service.core import logs
from service.api.app import create_app
from service.core.settings import Settings

KEY = "sk-logtest-5b1e0c93"


@pytest.fixture
def captured():
    """The root logger writing JSON lines into a buffer, as ``tuneserve up`` sets it up."""
    stream = io.StringIO()
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    logs.setup_logging("DEBUG", stream=stream, secrets=[KEY])
    yield stream
    for handler in list(root.handlers):
        if getattr(handler, "_tuneserve", False):
            root.removeHandler(handler)
    root.handlers[:] = before[0]
    root.setLevel(before[1])
    logs._set_up.clear()  # this process is pytest's again, not one the service set up


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_a_line_is_json_with_the_bound_context_and_extras(captured):
    token = logs.new_context(request_id="req-1")
    try:
        logs.bind(tenant="alice", job_id="ftjob-" + "a" * 24)
        logging.getLogger("service.test").info("step %d done", 3, extra={"step": 3})
    finally:
        logs.reset_context(token)
    line = lines(captured)[-1]
    assert line["message"] == "step 3 done" and line["level"] == "info"
    assert (line["request_id"], line["tenant"], line["job_id"]) == ("req-1", "alice",
                                                                   "ftjob-" + "a" * 24)
    assert line["step"] == 3 and line["logger"] == "service.test"


@pytest.mark.parametrize("message", [
    f"key is {KEY}",
    f"headers: {{'authorization': 'Bearer {KEY}'}}",
    "Authorization: Bearer some-other-token-123",
    "cookie tuneserve_key=another-secret-456; path=/",
])
def test_secrets_and_authorization_values_are_redacted(captured, message):
    logging.getLogger("service.test").warning(message)
    try:
        raise ValueError(f"bad key {KEY}")
    except ValueError:
        logging.getLogger("service.test").exception("failed")
    text = captured.getvalue()
    for secret in (KEY, "some-other-token-123", "another-secret-456"):
        assert secret not in text
    assert logs.REDACTED in text


def test_configured_keys_from_the_environment_are_secrets():
    env = {"TUNESERVE_API_KEYS": "k-one-1234:alice, k-two-5678:bob",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-abcd"}
    assert set(logs.secrets_from_env(env)) == {"k-one-1234", "k-two-5678", "aws-secret-abcd"}


def test_each_request_gets_an_id_and_an_access_line_with_the_tenant(captured, tmp_path):
    app = create_app(Settings(storage=str(tmp_path), api_keys={KEY: "alice"}))
    client = TestClient(app)
    response = client.get("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    access = [line for line in lines(captured) if line["logger"] == "tuneserve.access"]
    assert access[-1]["request_id"] == request_id and access[-1]["tenant"] == "alice"
    assert access[-1]["status"] == 200 and access[-1]["path"] == "/v1/fine_tuning/jobs"
    # A caller's own id is kept (and echoed), so it can be followed across services.
    given = client.get("/healthz", headers={"X-Request-ID": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42"
    assert KEY not in captured.getvalue()


def test_every_line_a_training_worker_writes_names_its_job(captured, tmp_path):
    """The worker function Ray Train runs (here in Ray Train's local mode: the same function
    in this process), two steps on the tiny model: each line from the training code, from any
    thread, carries the job id; lines after the run do not."""
    import threading

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from service.core.storage import open_storage
    from service.core.storage.config import StorageConfig
    from tests.helpers import sorting_lines
    from training.model import registry
    from training.spec import TrainSpec
    from training.worker import train_loop_per_worker

    job, file_id = "ftjob-" + "7" * 24, "file-" + "8" * 24
    config = StorageConfig(uri=str(tmp_path))
    storage = open_storage(config)
    storage.put(f"files/{file_id}/content", sorting_lines(16, seed=1))
    spec = TrainSpec(job_id=job, base_model=registry.TINY_MODEL_ID,
                     training_files=((file_id, 1.0),), n_epochs=1, batch_size=8, num_workers=1,
                     cpus_per_worker=1, seed=3)

    TorchTrainer(train_loop_per_worker, train_loop_config={"spec": spec, "storage": config},
                 scaling_config=ScalingConfig(num_workers=0),  # local mode: no Ray workers
                 run_config=RunConfig(name=job, storage_path=str(tmp_path / "run"))).fit()
    assert storage.exists(f"adapters/{job}/final/manifest.json")

    training = [line for line in lines(captured) if line["logger"].startswith("training.")]
    messages = " | ".join(line["message"] for line in training)
    assert "Verified settings" in messages and "Final adapter written" in messages, messages
    assert [line for line in training if line.get("job_id") != job] == []

    # A thread started inside a job's block (as torch, datasets or Ray start them) names the
    # job too; nothing does once the block is left.
    with logs.job_logging(job):
        thread = threading.Thread(
            target=lambda: logging.getLogger("training.thread").info("from a thread"))
        thread.start()
        thread.join()
    logging.getLogger("training.after").info("after the run")
    by_logger = {line["logger"]: line for line in lines(captured)}
    assert by_logger["training.thread"]["job_id"] == job
    assert "job_id" not in by_logger["training.after"]


def test_job_lines_stay_json_after_ray_train_replaces_the_root_handlers(captured):
    """Ray Train's workers run ``dictConfig`` after the service's setup hook, leaving only its
    plain console handler on the root logger; the job's block puts the JSON handler back."""
    import logging.config

    job = "ftjob-" + "6" * 24
    logging.config.dictConfig({  # what ray.train.v2's LoggingManager does to a worker's root
        "version": 1, "disable_existing_loggers": False,
        "handlers": {"console": {"class": "ray._private.log.PlainRayHandler"}},
        "root": {"level": "INFO", "handlers": ["console"]}})
    with logs.job_logging(job):
        # Ray's CoreContextFilter sets the Ray job's id on records in the same attribute.
        logging.getLogger("training.recipes.sft").info("step 1 with key %s", KEY,
                                                extra={"job_id": "01000000"})
    [line] = [line for line in lines(captured) if line["logger"] == "training.recipes.sft"]
    assert line["job_id"] == job and KEY not in line["message"]
    assert line["ray_job_id"] == "01000000"
    names = [type(h).__name__ for h in logging.getLogger().handlers]
    assert "PlainRayHandler" not in names  # no second, plain and unredacted copy of each line
