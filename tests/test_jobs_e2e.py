"""Jobs end to end, as a caller sees them: the shared ``tuneserve up`` on SeaweedFS S3, the
openai SDK, real Ray Train runs on the tiny model. Restarts and cancels are done to the real
processes."""

from __future__ import annotations

import io
import json
import signal
import time

import openai
import psutil
import pytest

from tests.helpers import Service, exported_full_model, wait_until

pytestmark = pytest.mark.slow

TINY = "tuneserve/tiny-llama"


def chat_file(n: int) -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"Repeat the word number {i}."},
                          {"role": "assistant", "content": f"word {i % 7}"}]} for i in range(n)]
    return "\n".join(json.dumps(r) for r in rows).encode()


@pytest.fixture
def service(shared_service):
    return shared_service


@pytest.fixture
def client(service):
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key="local", max_retries=0, timeout=60)


def upload(client, n: int) -> str:
    return client.files.create(file=("train.jsonl", io.BytesIO(chat_file(n))), purpose="fine-tune").id


def wait_status(client, job_id: str, statuses: set[str], timeout: float):
    return wait_until(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in statuses and j,
                      timeout, interval=1, what=f"job {job_id} to reach {statuses}")


def metrics_events(client, job_id: str) -> list:
    events = client.fine_tuning.jobs.list_events(job_id, limit=1000).data
    return [e for e in events if e.type == "metrics"]


def train_workers(service: Service) -> list[psutil.Process]:
    return service.processes("RayTrainWorker", "TrainController")


def test_job_runs_to_success_with_events_checkpoints_and_results(client):
    file_id = upload(client, 32)
    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=file_id, suffix="e2e", seed=3,
        method={"type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 8}}})
    assert job.status == "validating_files"
    done = wait_status(client, job.id, {"succeeded", "failed", "cancelled"}, 300)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{TINY}:e2e:{job.id}"
    assert done.trained_tokens and done.trained_tokens > 0
    hp = done.method.supervised.hyperparameters
    assert (hp.n_epochs, hp.batch_size) == (2, 8)
    assert isinstance(hp.learning_rate_multiplier, float)
    assert done.finished_at and done.finished_at >= done.created_at

    steps = [e.data["step"] for e in metrics_events(client, job.id)]
    assert sorted(steps) == list(range(1, 9)), steps  # 32 examples / 8 per step × 2 epochs
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].step_number == 8
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-8"
    assert checkpoints[0].metrics.train_loss is not None
    assert done.result_files
    csv = client.files.content(done.result_files[0]).text
    assert csv.splitlines()[0].startswith("step,train_loss") and len(csv.splitlines()) == 9


def test_cancel_stops_the_run_within_seconds(client, service):
    # The processes counted below are this run's only: those of runs before it are gone first.
    wait_until(lambda: not train_workers(service), 120, what="the runs of earlier tests to end")
    job = client.fine_tuning.jobs.create(model=TINY, training_file=upload(client, 256),
                                         hyperparameters={"n_epochs": 50, "batch_size": 4})
    wait_until(lambda: metrics_events(client, job.id), 240, interval=1, what="first step")
    cancelled_at = time.monotonic()
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    try:
        wait_until(lambda: not train_workers(service), 30, what="the run's Ray processes to go away")
    except TimeoutError:  # say what stayed, and what the job says of itself, for the next look
        left = [(p.pid, " ".join(p.cmdline())[:60], round(time.time() - p.create_time()))
                for p in train_workers(service)]
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=20).data
                  if e.type != "metrics"]
        raise AssertionError(f"still running 30 s after the cancel (pid, command, age s): {left}; "
                             f"the job's last events: {events}") from None
    assert time.monotonic() - cancelled_at < 30
    time.sleep(3)  # a dying run must not overwrite the decision
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.ConflictError, match="cancelled"):
        client.fine_tuning.jobs.cancel(job.id)


def test_api_replica_restart_during_a_run_does_not_stop_it(client, service):
    job = client.fine_tuning.jobs.create(model=TINY, training_file=upload(client, 64),
                                         hyperparameters={"n_epochs": 6, "batch_size": 4})
    wait_until(lambda: metrics_events(client, job.id), 240, interval=1, what="first step")
    replicas = service.processes("ServeReplica:tuneserve:Api")
    assert replicas, "the API replica process should be visible"
    for p in replicas:
        p.send_signal(signal.SIGKILL)
    done = wait_status(client, job.id, {"succeeded", "failed", "cancelled"}, 400)
    assert done.status == "succeeded", done.error
    steps = sorted(e.data["step"] for e in metrics_events(client, job.id))
    assert steps[-1] == 96  # 64 / 4 × 6: the run went on to its end
    # The new replica re-attached to the run that went on: it did not restart or resume it.
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    assert not [e for e in events if e.data and "resumed_from_step" in e.data]
    assert not [e for e in events if "was lost" in e.message]
    assert steps == list(range(1, 97))  # every step once
    # What it left is whole: the tuned model answers.
    answer = client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert answer.choices[0].finish_reason


def test_a_full_fine_tune_answers_by_its_name_with_its_own_weights(client, shared_storage,
                                                                    tmp_path):
    """A ``full_finetune`` job's model is chatted with by its ``ft:`` name, as an adapter is:
    the replica runs it on an engine of its own, and it answers as its exported weights do
    (greedy), which is not as the base model does."""
    import asyncio

    from serving.engine.native import Engine
    from serving.protocol import ChatCall
    from serving.server import ChatServer, collect

    rows = [{"messages": [{"role": "user", "content": f"Say something about {i}."},
                          {"role": "assistant", "content": "ok ok ok"}]} for i in range(64)]
    file_id = client.files.create(file=("ok.jsonl", io.BytesIO(
        "\n".join(json.dumps(r) for r in rows).encode())), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=file_id, extra_body={"full_finetune": True},
        hyperparameters={"n_epochs": 4, "batch_size": 8, "learning_rate_multiplier": 50})
    done = wait_status(client, job.id, {"succeeded", "failed", "cancelled"}, 400)
    assert done.status == "succeeded", done.error
    question = [{"role": "user", "content": "Say something about 1000."}]

    def served(model: str) -> str:
        return client.chat.completions.create(model=model, messages=question, max_tokens=8,
                                              temperature=0).choices[0].message.content
    tuned = served(done.fine_tuned_model)
    assert tuned != served(TINY)

    folder = exported_full_model(shared_storage, job.id, TINY, tmp_path / "full")
    server = ChatServer(Engine.for_base_model(str(folder)), storage=None)
    call = ChatCall(base_model=TINY, adapter_id=None, messages=question, max_tokens=8,
                    temperature=0.0, seed=None)

    async def ask():  # submitted from the loop that reads the answer
        return await collect(server.start(call), call)
    try:
        own = asyncio.run(ask())
    finally:
        server.close()
    assert tuned == own.text


def test_cluster_restart_resumes_from_the_last_checkpoint(service, shared_storage):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="local", max_retries=0)
    job = client.fine_tuning.jobs.create(model=TINY, training_file=upload(client, 32),
                                         hyperparameters={"n_epochs": 12, "batch_size": 4})
    wait_until(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, 300, interval=1,
               what="the first checkpoint")
    service.stop()  # stops Ray entirely: the run dies with it
    checkpointed = set(_checkpoint_steps(shared_storage, job.id))

    service.start()  # a new service on the same storage
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="local", max_retries=0)
    done = wait_status(client, job.id, {"succeeded", "failed", "cancelled"}, 400)
    assert done.status == "succeeded", done.error
    resumed = [e.data["resumed_from_step"] for e in
               client.fine_tuning.jobs.list_events(job.id, limit=1000).data
               if e.data and "resumed_from_step" in e.data]
    # Ray Train resumes from the newest checkpoint it registered before the cluster went
    # down; checkpoints still in flight at the kill may be newer, never older than it.
    assert resumed and resumed[0] in checkpointed and resumed[0] > 0, (resumed, checkpointed)
    steps = [e.data["step"] for e in metrics_events(client, job.id)]
    assert max(steps) == 96


def _checkpoint_steps(storage, job_id: str) -> list[int]:
    """The checkpoints' steps, read from storage directly (the service is down)."""
    from service.api.routes.fine_tuning import read_checkpoints
    from service.jobs.store import JobStore

    return [c["step_number"] for c in read_checkpoints(storage, JobStore(storage).get(job_id))]
