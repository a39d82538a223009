"""DPO after SFT makes the tuned model's answers shorter (issue 7), on the tiny model.

The SFT stage trains on answers of uneven style, most of them wrapped in filler (as collected
data often is), so its greedy answers ramble. A DPO job from that adapter, on pairs preferring
the concise answer over the rambling one, with the SFT adapter as its reference, must reach
held-out reward accuracy ≥ 0.9 with a positive margin, and its greedy answers to held-out
questions must be clearly shorter than the SFT model's, ending at the end-of-turn token."""

from __future__ import annotations

import random

import pytest
import torch
from peft import PeftModel

from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from tests.test_dpo_loss import load_make_preferences
from training.model import chat
from training.model import registry
from training.spec import TrainSpec
from training.run import run_training

pytestmark = pytest.mark.slow

SFT_JOB, DPO_JOB = "ftjob-" + "c" * 24, "ftjob-" + "d" * 24
SFT_FILE, PAIRS, HELDOUT = ("file-" + c * 24 for c in "abc")
MAX_NEW_TOKENS = 48
N_QUESTIONS = 16


def chatty_sft_rows(pairs: list[dict], share: float, seed: int) -> list[dict]:
    """SFT conversations answering each question, a share of them with the rambling answer."""
    rng = random.Random(seed)
    return [{"messages": [*row["prompt"], {"role": "assistant", "content":
                                           row["rejected"] if rng.random() < share
                                           else row["chosen"]}]}
            for row in pairs]


def greedy_answers(model, tokenizer, rows: list[dict],
                   max_new_tokens: int = MAX_NEW_TOKENS) -> list[tuple[int, bool]]:
    """(new tokens, ended at end-of-turn) of each greedy answer to a row's prompt."""
    stop = chat.end_of_turn_ids(tokenizer)
    answers = []
    for row in rows:
        ids = torch.tensor([chat.render_prompt(tokenizer, row["prompt"])])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        answers.append((len(new), new[-1] in stop))
    return answers


def test_dpo_after_chatty_sft_shortens_answers(ray_local, tmp_path):
    config = StorageConfig(uri=str(tmp_path / "storage"))
    storage = open_storage(config)
    toy = load_make_preferences()
    train, heldout = toy.make_preferences(256, 32, seed=11)
    storage.put(f"files/{SFT_FILE}/content", toy.to_jsonl(chatty_sft_rows(train, 0.9, seed=11)))
    storage.put(f"files/{PAIRS}/content", toy.to_jsonl(train[:128]))
    storage.put(f"files/{HELDOUT}/content", toy.to_jsonl(heldout))
    common = {"base_model": registry.TINY_MODEL_ID, "cpus_per_worker": 2,
              "checkpoint_every_steps": 0, "seed": 3}
    # A random tiny model needs a big rank and rate to learn the filler in a minute.
    run_training(TrainSpec(job_id=SFT_JOB, training_files=((SFT_FILE, 1.0),), n_epochs=6,
                           batch_size=16, learning_rate_multiplier=5.0, lora_r=64,
                           lora_alpha=128, **common), config)
    sft_adapter = f"adapters/{SFT_JOB}/final"
    result = run_training(TrainSpec(
        job_id=DPO_JOB, method="dpo", training_files=((PAIRS, 1.0),), validation_file=HELDOUT,
        n_epochs=2, batch_size=8, learning_rate_multiplier=3.0, rpo_alpha=1.0, lora_r=64,
        lora_alpha=128, init_adapter=sft_adapter, reference_adapter=sft_adapter, **common),
        config)
    assert result["full_valid_rewards/accuracies"] >= 0.9
    assert result["full_valid_rewards/margins"] > 0

    model_dir = registry.resolve_model(registry.TINY_MODEL_ID)
    tokenizer = registry.load_tokenizer(model_dir)
    for job in (SFT_JOB, DPO_JOB):
        storage.download_prefix(f"adapters/{job}/final", str(tmp_path / job))
    tuned = PeftModel.from_pretrained(registry.load_model(model_dir), str(tmp_path / SFT_JOB),
                                      adapter_name="sft")
    tuned.load_adapter(str(tmp_path / DPO_JOB), adapter_name="dpo")
    tuned.eval()
    questions = heldout[:N_QUESTIONS]
    tuned.set_adapter("sft")
    before = greedy_answers(tuned, tokenizer, questions)
    tuned.set_adapter("dpo")
    after = greedy_answers(tuned, tokenizer, questions)
    before_tokens, after_tokens = (sum(n for n, _ in a) for a in (before, after))
    assert after_tokens <= 0.5 * before_tokens, (before, after)
    assert all(ended for _, ended in after), after
