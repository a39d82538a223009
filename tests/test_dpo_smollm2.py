"""DPO makes the built-in SmolLM2 answer concisely: after a short run on the toy preference set
(concise vs. rambling answers), held-out reward accuracy is ≥ 0.9 and its greedy answers to
held-out questions are clearly shorter than the base model's."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel

from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from tests.test_dpo_loss import load_make_preferences
from tests.test_dpo_shorter import greedy_answers
from training.model import registry
from training.spec import TrainSpec
from training.run import run_training

# Measured on a quiet machine (167 s): the reward accuracy and margin asserts pass, the length
# assert does not — greedy answers to the held-out questions stay at the 24-token cap before and
# after DPO ([24, 10, 24, 24, 24, 24] → [24] * 6). DPO from the base model wins its margin by
# making the rambling answers (text the base model never writes) unlikely, not by making it write
# "45.". Kept out of the default run and marked as the known failure it is; the SFT-then-DPO path
# (bench/quality/demo.py --dpo), where the model already writes both styles, is the one to show.
pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.timeout(2400),
              pytest.mark.xfail(strict=True, reason="DPO from the base model does not shorten "
                                "its greedy answers yet (see the comment above)")]

JOB = "ftjob-" + "b" * 24
TRAIN, HELDOUT = "file-" + "6" * 24, "file-" + "7" * 24
N_PROMPTS = 6
MAX_NEW_TOKENS = 24


def test_dpo_shortens_smollm2_answers(ray_local, tmp_path):
    config = StorageConfig(uri=str(tmp_path / "storage"))
    storage = open_storage(config)
    toy = load_make_preferences()
    train, heldout = toy.make_preferences(64, 16, seed=5)
    storage.put(f"files/{TRAIN}/content", toy.to_jsonl(train))
    storage.put(f"files/{HELDOUT}/content", toy.to_jsonl(heldout))
    spec = TrainSpec(job_id=JOB, base_model=registry.BUILTIN_MODEL_ID, method="dpo",
                     training_files=((TRAIN, 1.0),), validation_file=HELDOUT, n_epochs=3,
                     batch_size=8, cpus_per_worker=2, checkpoint_every_steps=0, seed=1)
    result = run_training(spec, config)
    assert result["full_valid_rewards/accuracies"] >= 0.9
    assert result["full_valid_rewards/margins"] > 0

    model_dir = registry.resolve_model(registry.BUILTIN_MODEL_ID)
    tokenizer = registry.load_tokenizer(model_dir)
    storage.download_prefix(f"adapters/{JOB}/final", str(tmp_path / "adapter"))
    # bf16 weights: generation on CPU is bound by reading them once per token
    base = registry.load_model(model_dir, torch.bfloat16)
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    tuned.eval()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    questions = heldout[:N_PROMPTS]
    with tuned.disable_adapter():
        before = [n for n, _ in greedy_answers(tuned, tokenizer, questions, MAX_NEW_TOKENS)]
    after = [n for n, _ in greedy_answers(tuned, tokenizer, questions, MAX_NEW_TOKENS)]
    assert sum(after) <= 0.7 * sum(before), (before, after)
