"""DPO runs on the tiny model with real Ray Train and SeaweedFS S3.

One 2-worker run on the toy preference set (concise vs. rambling answers) has a worker SIGKILLed
mid-run: it must resume from its last checkpoint, start at ln 2, and end with held-out reward
accuracy ≥ 0.9 and a positive margin. A second job on the same data reads the reference log-probs
from the cache (no reference pass); a third continues from an SFT adapter, which is then its
reference."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load as load_safetensors

from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from tests.helpers import own_train_workers
from tests.test_dpo_loss import load_make_preferences
from training import checkpoints
from training.model import registry as models
from training.run import run_training
from training.spec import TrainSpec

pytestmark = pytest.mark.slow

KILLED_JOB = "ftjob-" + "7" * 24
CACHED_JOB = "ftjob-" + "8" * 24
SFT_JOB = "ftjob-" + "9" * 24
FROM_SFT_JOB = "ftjob-" + "a" * 24
TRAIN, HELDOUT, TRAIN_COPY, SFT_FILE, TRAIN_HEAD = ("file-" + c * 24 for c in "12345")
CHECKPOINT_EVERY = 4


def events(storage, job_id: str) -> list[dict]:
    return [json.loads(storage.get(i.key)) for i in storage.iter(f"jobs/{job_id}/events/")]


def cache_events(evs: list[dict]) -> list[tuple[str, str]]:
    return [(e["data"]["split"], e["data"]["reference_cache"]) for e in evs
            if "reference_cache" in e.get("data", {})]




def registered_checkpoint(storage, job_id: str) -> int:
    """The newest complete checkpoint in the run's storage (what a restart resumes from), or 0."""
    complete = checkpoints.scan(storage, job_id)[0]
    return complete[0] if complete else 0


def kill_one_worker_after(storage, job_id: str, step: int, killed: dict) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        registered = registered_checkpoint(storage, job_id)
        workers = own_train_workers()
        if registered >= step and workers:
            killed["registered_at_kill"] = registered
            os.kill(workers[-1].pid, signal.SIGKILL)
            return
        time.sleep(0.1)


def dpo_spec(job_id: str, **fields) -> TrainSpec:
    defaults = {"job_id": job_id, "base_model": models.TINY_MODEL_ID, "method": "dpo",
                "training_files": ((TRAIN, 1.0),), "batch_size": 8, "n_epochs": 1,
                "num_workers": 1, "cpus_per_worker": 1, "checkpoint_every_steps": 0, "seed": 3,
                # The default DPO rate suits pretrained models over ~100 steps; 16 steps on a
                # random tiny model need bigger ones to move the held-out loss visibly.
                "learning_rate_multiplier": 10.0}
    return TrainSpec(**{**defaults, **fields})


@pytest.fixture(scope="module")
def s3(ray_local, s3_server):
    with pytest.MonkeyPatch.context() as env:
        for name, value in s3_server.env.items():  # the driver's S3 credentials
            env.setenv(name, value)
        config = StorageConfig(uri=f"s3://{s3_server.bucket}/dpo-run-{os.getpid()}",
                               endpoint_url=s3_server.endpoint_url)
        storage = open_storage(config)
        toy = load_make_preferences()
        train, heldout = toy.make_preferences(128, 32, seed=0)
        storage.put(f"files/{TRAIN}/content", toy.to_jsonl(train))
        storage.put(f"files/{TRAIN_COPY}/content", toy.to_jsonl(train))  # uploaded again
        storage.put(f"files/{HELDOUT}/content", toy.to_jsonl(heldout))
        storage.put(f"files/{TRAIN_HEAD}/content", toy.to_jsonl(train[:32]))
        sft = [{"messages": [*row["prompt"], {"role": "assistant", "content": row["chosen"]}]}
               for row in train[:64]]
        storage.put(f"files/{SFT_FILE}/content", toy.to_jsonl(sft))
        yield config, storage


@pytest.fixture(scope="module")
def killed_run(s3):
    """2 workers, 16 steps; one worker is killed after the checkpoint at step 4."""
    config, storage = s3
    spec = dpo_spec(KILLED_JOB, validation_file=HELDOUT, num_workers=2,
                    checkpoint_every_steps=CHECKPOINT_EVERY, max_failures=2)
    killed: dict = {}
    killer = threading.Thread(target=kill_one_worker_after,
                              args=(storage, KILLED_JOB, CHECKPOINT_EVERY, killed), daemon=True)
    killer.start()
    result = run_training(spec, config)
    killer.join(timeout=1)
    return {"result": result, "killed": killed, "events": events(storage, KILLED_JOB)}


def test_killed_worker_resumes_and_the_run_succeeds(killed_run):
    killed, result, evs = killed_run["killed"], killed_run["result"], killed_run["events"]
    assert killed, "no worker was killed: the run ended before its first checkpoint registered"
    resumed = [e["data"]["resumed_from_step"] for e in evs
               if e["message"].startswith("Resumed from the checkpoint")]
    assert len(resumed) == 1 and resumed[0] >= killed["registered_at_kill"] >= CHECKPOINT_EVERY
    assert resumed[0] % CHECKPOINT_EVERY == 0
    assert result["resumed_from_step"] == resumed[0]
    assert result["step"] == result["total_steps"] == 16  # 128 pairs / 8
    # The reference pass ran once (split over both workers); the restart read the cache.
    assert cache_events(evs) == [("train", "miss"), ("valid", "miss"),
                                 ("train", "hit"), ("valid", "hit")]


def test_loss_starts_at_ln2_and_heldout_preferences_are_learned(killed_run):
    evs, result = killed_run["events"], killed_run["result"]
    initial = next(e["data"]["initial_loss"] for e in evs if "initial_loss" in e["data"])
    assert initial == pytest.approx(math.log(2), abs=1e-3)
    steps = [e["data"] for e in evs if e["type"] == "metrics"]
    assert steps[0]["step"] == 1 and steps[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-3)
    for key in ("train_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected", "pairs_per_second"):
        assert key in steps[-1], key
    assert "validation reward accuracy" in [e for e in evs if e["type"] == "metrics"][-1]["message"]
    # Held out: questions never seen in training.
    assert result["full_valid_rewards/accuracies"] >= 0.9
    assert result["full_valid_rewards/margins"] > 0
    assert result["full_valid_loss"] < math.log(2) - 0.1


def test_manifest_records_dpo_settings_and_metrics(killed_run, s3):
    _, storage = s3
    manifest = json.loads(storage.get(f"adapters/{KILLED_JOB}/final/manifest.json"))
    assert manifest["method"] == "dpo" and manifest["step"] == 16
    assert manifest["dpo"]["beta"] == 0.1 and manifest["dpo"]["reference_adapter"] is None
    assert manifest["metrics"]["rewards/accuracies"] >= 0.9
    checkpoint = json.loads(storage.get(
        f"adapters/{KILLED_JOB}/ckpt-step-{CHECKPOINT_EVERY}/manifest.json"))
    assert "valid_rewards/margins" in checkpoint["metrics"]


def test_second_job_on_the_same_data_does_no_reference_pass(killed_run, s3):
    config, storage = s3
    # The same content uploaded again under another file id: the cache is keyed by content.
    run_training(dpo_spec(CACHED_JOB, training_files=((TRAIN_COPY, 1.0),),
                          validation_file=HELDOUT, batch_size=32), config)
    evs = events(storage, CACHED_JOB)
    assert cache_events(evs) == [("train", "hit"), ("valid", "hit")]
    assert not [e for e in evs if e["message"].startswith("Reference pass")]
    initial = next(e["data"]["initial_loss"] for e in evs if "initial_loss" in e["data"])
    assert initial == pytest.approx(math.log(2), abs=1e-3)


def test_dpo_from_an_sft_adapter_uses_it_as_the_reference(killed_run, s3):
    config, storage = s3
    run_training(TrainSpec(job_id=SFT_JOB, base_model=models.TINY_MODEL_ID,
                           training_files=((SFT_FILE, 1.0),), n_epochs=1, batch_size=16,
                           cpus_per_worker=1, checkpoint_every_steps=0, seed=3), config)
    sft_adapter = f"adapters/{SFT_JOB}/final"
    run_training(dpo_spec(FROM_SFT_JOB, training_files=((TRAIN_HEAD, 1.0),),
                          init_adapter=sft_adapter, reference_adapter=sft_adapter,
                          batch_size=16), config)
    evs = events(storage, FROM_SFT_JOB)
    # The policy starts as the SFT adapter and the reference is that adapter: loss ln 2.
    initial = next(e["data"]["initial_loss"] for e in evs if "initial_loss" in e["data"])
    assert initial == pytest.approx(math.log(2), abs=1e-3)
    assert cache_events(evs) == [("train", "miss")]
    base_key = next(e["data"]["reference_cache_key"] for e in killed_run["events"]
                    if e["data"].get("split") == "train" and "reference_cache_key" in e["data"])
    sft_key = next(e["data"]["reference_cache_key"] for e in evs
                   if "reference_cache_key" in e["data"])
    assert sft_key != base_key
    base, sft = (load_safetensors(storage.get(k)) for k in (base_key, sft_key))
    base_chosen = base["chosen"][:32]  # TRAIN_HEAD holds the first 32 pairs of TRAIN
    # SFT on the chosen answers made them likelier than the base model finds them.
    assert not torch.allclose(base_chosen, sft["chosen"], atol=1e-2)
    assert sft["chosen"].mean() > base_chosen.mean()
    manifest = json.loads(storage.get(f"adapters/{FROM_SFT_JOB}/final/manifest.json"))
    assert manifest["dpo"]["reference_adapter"] == sft_adapter
    assert manifest["lora"]["r"] == 16
