"""The built-in SmolLM2 learns a small instruction task (sorting short lists of numbers) in a
short Ray Train run, and the adapter it writes makes the model answer correctly."""

from __future__ import annotations

import json
import random

import pytest
import torch
from peft import PeftModel

from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from training.model import chat
from training.model import registry
from training.spec import TrainSpec
from training.run import run_training

JOB = "ftjob-" + "5" * 24
FILE = "file-" + "6" * 24


def number_lists(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(0, 99) for _ in range(rng.randint(3, 5))] for _ in range(n)]


def conversation(xs: list[int], with_answer: bool = True) -> list[dict]:
    messages = [{"role": "user", "content": "Sort ascending: " + " ".join(map(str, xs))}]
    if with_answer:
        messages.append({"role": "assistant", "content": " ".join(map(str, sorted(xs)))})
    return messages


def sorting_accuracy(model, tokenizer, tests: list[list[int]]) -> float:
    tokenizer.padding_side = "left"
    prompts = [chat.render_text(tokenizer, conversation(xs, False)) for xs in tests]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(**batch, max_new_tokens=16, do_sample=False,
                             eos_token_id=chat.end_of_turn_ids(tokenizer),
                             pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    good = sum(a.strip() == " ".join(map(str, sorted(xs))) for a, xs in zip(answers, tests))
    return good / len(tests)


@pytest.mark.slow
def test_smollm2_learns_to_sort_lists(ray_local, tmp_path):
    config = StorageConfig(uri=str(tmp_path / "storage"))
    storage = open_storage(config)
    lines = [json.dumps({"messages": conversation(xs)}) for xs in number_lists(480, seed=1)]
    storage.put(f"files/{FILE}/content", ("\n".join(lines) + "\n").encode())
    spec = TrainSpec(job_id=JOB, base_model=registry.BUILTIN_MODEL_ID, training_files=((FILE, 1.0),),
                     n_epochs=1, batch_size=8, num_workers=1, cpus_per_worker=2,
                     checkpoint_every_steps=0)
    result = run_training(spec, config)
    assert result["step"] == 60 and result["train_loss"] < 0.2

    storage.download_prefix(f"adapters/{JOB}/final", tmp_path / "adapter")
    model_dir = registry.resolve_model(registry.BUILTIN_MODEL_ID)
    tokenizer = registry.load_tokenizer(model_dir)
    held_out = number_lists(30, seed=99)
    base = registry.load_model(model_dir).eval()
    before = sorting_accuracy(base, tokenizer, held_out)
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    after = sorting_accuracy(tuned, tokenizer, held_out)
    # The base model numbers the items instead of sorting them; one short epoch teaches it.
    # (The ≥ 90% figure for the full task is the quality demo's, bench/quality/.)
    assert before <= 0.2 and after >= 0.6, (before, after)
