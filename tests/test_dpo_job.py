"""A DPO job through the API, as a caller runs one: SFT first, then DPO on its ``ft:`` model
(the shared ``tuneserve up`` on SeaweedFS S3, the openai SDK, real Ray Train runs on the tiny
model)."""

from __future__ import annotations

import io
import json
import math

import openai
import pytest

from tests.helpers import wait_until
from tests.test_dpo_loss import load_make_preferences

pytestmark = pytest.mark.slow

TINY = "tuneserve/tiny-llama"


@pytest.fixture
def client(shared_service):
    return openai.OpenAI(base_url=f"{shared_service.url}/v1", api_key="local", max_retries=0,
                         timeout=60)


def upload(client, rows: list[dict], name: str) -> str:
    data = "\n".join(json.dumps(r) for r in rows).encode()
    return client.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune").id


def finished(client, job_id: str):
    return wait_until(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in
                      {"succeeded", "failed", "cancelled"} and j, 400, interval=1,
                      what=f"job {job_id} to finish")


def test_dpo_job_on_an_sft_model_succeeds_with_reward_metrics(client):
    train, _ = load_make_preferences().make_preferences(32, 0, seed=2)
    sft_rows = [{"messages": [*r["prompt"], {"role": "assistant", "content": r["chosen"]}]}
                for r in train]
    sft = client.fine_tuning.jobs.create(
        model=TINY, training_file=upload(client, sft_rows, "sft.jsonl"), suffix="sft",
        method={"type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 16}}})
    sft = finished(client, sft.id)
    assert sft.status == "succeeded", sft.error

    pairs = upload(client, train, "pairs.jsonl")
    job = client.fine_tuning.jobs.create(
        model=sft.fine_tuned_model, training_file=pairs, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {
            "beta": 0.2, "n_epochs": 1, "batch_size": 16}}})
    done = finished(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{TINY}:dpo:{job.id}"
    assert done.method.type == "dpo" and done.method.dpo.hyperparameters.beta == 0.2

    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    steps = [e for e in events if e.type == "metrics"]
    assert sorted(e.data["step"] for e in steps) == [1, 2]
    for key in ("train_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected"):
        assert key in steps[0].data, key
    assert any("reward accuracy" in e.message for e in steps)
    # The SFT adapter is the reference, and the policy starts from it: the loss starts at ln 2.
    initial = next(e.data["initial_loss"] for e in events if e.data and "initial_loss" in e.data)
    assert initial == pytest.approx(math.log(2), abs=1e-3)
    assert any(f"adapters/{sft.id}/final" in e.message for e in events
               if e.data and e.data.get("reference_cache") == "miss")
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].metrics.train_loss is not None
