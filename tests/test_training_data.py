"""From training files to the batches each rank computes: tokenising with counts of what was
dropped, mixing by weight, sharding, packing; and the TrainSpec checks and "auto" values."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from service.core.errors import InvalidRequest
from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from training.model import registry
from training.model.chat import IGNORE_INDEX
from training.spec import TrainSpec, resolve_hyperparameters
from training.data.examples import build_split, load_split, write_split
from training.data.packing import (
    collate_packed,
    epoch_length,
    epoch_order,
    micro_batches,
    pack_rows,
    rank_share,
)

X = IGNORE_INDEX
FILE_A, FILE_B = "file-" + "a" * 24, "file-" + "b" * 24
JOB = "ftjob-" + "c" * 24


def chat_line(user: str, assistant: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user},
                                    {"role": "assistant", "content": assistant}]})


@pytest.fixture(scope="module")
def tokenizer():
    return registry.load_tokenizer(registry.resolve_model(registry.TINY_MODEL_ID))


def test_build_split_counts_and_names_dropped_examples(tmp_path, tokenizer):
    storage = open_storage(StorageConfig(uri=str(tmp_path)))
    lines = [chat_line("sort 3 1 2", "1 2 3"),
             chat_line("say it", "an end marker <|im_end|> inside a response"),  # mask refused
             chat_line("long", "word " * 80),  # the response does not fit max_length
             chat_line("sort 9 8", "8 9")]
    storage.put(f"files/{FILE_A}/content", ("\n".join(lines) + "\n").encode())
    dataset, stats = build_split(storage, tokenizer, [FILE_A], max_length=48,
                                 template_hash="t")
    assert (stats.n_lines, stats.n_examples, stats.n_rejected, stats.n_truncated) == (4, 2, 1, 1)
    assert stats.problems[0].startswith(f"{FILE_A} line 2: rejected")
    assert stats.problems[1].startswith(f"{FILE_A} line 3: truncated")
    assert len(stats.file_hashes[FILE_A]) == 64

    write_split(storage, "jobs/x/data/train", dataset, stats)
    ids, labels, sources = load_split(storage, "jobs/x/data/train", tmp_path / "local")
    supervised = [tokenizer.decode([t for t in row if t != X]) for row in labels]
    assert supervised == ["1 2 3<|im_end|>", "8 9<|im_end|>"]
    assert sources == [0, 0] and len(ids[0]) == len(labels[0])


def test_a_file_with_nothing_trainable_fails_with_its_line_numbers(tmp_path, tokenizer):
    storage = open_storage(StorageConfig(uri=str(tmp_path)))
    storage.put(f"files/{FILE_A}/content", (chat_line("x", "y " * 90) + "\n").encode())
    with pytest.raises(InvalidRequest, match=f"no trainable example left in {FILE_A}.*line 1"):
        build_split(storage, tokenizer, [FILE_A], max_length=32, template_hash="t")


def test_epoch_order_mixes_files_by_weight_and_reshuffles_each_epoch():
    sources = [0] * 10 + [1] * 10  # examples 0-9 from file 0 (weight 2), 10-19 file 1 (0.5)
    weights = [2.0, 0.5]
    first, second = (epoch_order(sources, weights, seed=7, epoch=e) for e in (0, 1))
    counts = Counter(first)
    assert all(counts[i] == 2 for i in range(10))
    assert sum(counts[i] for i in range(10, 20)) == 5 and max(counts[i] for i in range(10, 20)) == 1
    assert len(first) == len(second) == epoch_length(sources, weights) == 25
    assert first != second
    assert first == epoch_order(sources, weights, seed=7, epoch=0)  # resumable: a pure function


def test_ranks_share_each_global_batch_exactly_once():
    order = list(range(10))
    for step in range(3):  # batches of 4: [0-3], [4-7], [8, 9]
        shares = [rank_share(order, step, 4, rank, 3) for rank in range(3)]
        assert sorted(sum(shares, [])) == order[step * 4:(step + 1) * 4]
    assert rank_share(order, 2, 4, 2, 3) == []  # a rank may sit out the short last batch


def test_pack_rows_fills_rows_first_fit_decreasing():
    assert pack_rows([5, 3, 4, 2, 9], capacity=8) == [[4], [0, 1], [2, 3]]


def test_collate_packed_restarts_positions_and_ignores_each_first_token():
    batch = collate_packed([([1, 2, 3], [X, 2, 3]), ([4, 5], [4, 5])])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # Token 4 would be "predicted" from example 1's last token: never a target.
    assert batch["labels"].tolist() == [[X, 2, 3, X, 5]]


def test_unpacked_micro_batches_pad_with_pad_id_and_ignore_index():
    examples = [([1, 2, 3], [X, 2, 3]), ([4, 5], [X, 5]), ([6], [X])]
    first, second = micro_batches(examples, packing=False, pack_length=64, micro_batch_size=2,
                                  pad_id=0)
    assert first["input_ids"].tolist() == [[6, 0], [4, 5]]
    assert first["labels"].tolist() == [[X, X], [X, 5]]
    assert first["attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert torch.equal(second["input_ids"], torch.tensor([[1, 2, 3]]))


def spec(**overrides) -> TrainSpec:
    fields = {"job_id": JOB, "base_model": registry.TINY_MODEL_ID,
              "training_files": ((FILE_A, 1.0),), **overrides}
    return TrainSpec(**fields)


def test_validate_lists_every_problem_in_one_message():
    bad = spec(n_epochs=0, batch_size="big", learning_rate_multiplier=-1, lora_r=0,
               training_files=(("my-file", 0.0),), num_workers=0)
    with pytest.raises(InvalidRequest) as info:
        bad.validate()
    message = info.value.message
    for fragment in ("file id 'my-file'", "weight of my-file", "n_epochs", "batch_size",
                     "learning_rate_multiplier", "lora r", "num_workers"):
        assert fragment in message
    assert info.value.param == "training_file"


def test_spec_survives_the_trip_to_a_worker():
    original = spec(target_modules=("q_proj", "v_proj"), n_epochs=2)
    assert TrainSpec.from_dict(json.loads(json.dumps(original.to_dict()))) == original
    with pytest.raises(InvalidRequest, match="unknown training spec field"):
        TrainSpec.from_dict({**original.to_dict(), "epochs": 3})


@pytest.mark.parametrize(("n_examples", "expected"), [
    (10, (40, 4)),        # tiny set: enough epochs to see ~400 examples
    (1000, (3, 8)),       # OpenAI's default of 3 epochs; ~1% per batch
    (50_000, (1, 32)),    # large set: capped at ~25k examples seen
])
def test_auto_hyperparameters_resolve_to_numbers(n_examples, expected):
    hp = resolve_hyperparameters(spec(), n_examples, n_tokens=n_examples * 100)
    assert (hp.n_epochs, hp.batch_size) == expected
    assert hp.learning_rate == pytest.approx(1e-3) and hp.learning_rate_multiplier == 1.0
    fixed = resolve_hyperparameters(spec(n_epochs=2, batch_size=16, learning_rate_multiplier=0.5,
                                         full_finetune=True), n_examples, n_examples * 100)
    assert (fixed.n_epochs, fixed.batch_size, fixed.learning_rate) == (2, 16, pytest.approx(1e-5))


def test_dpo_resolves_to_its_own_lower_rate():
    """DPO at the SFT rate over-optimises (the answers degenerate): its base rate is 20x lower."""
    lora = resolve_hyperparameters(spec(method="dpo"), 1000, n_tokens=100_000)
    full = resolve_hyperparameters(spec(method="dpo", full_finetune=True, learning_rate_multiplier=2),
                                   1000, n_tokens=100_000)
    assert lora.learning_rate == pytest.approx(5e-5) and full.learning_rate == pytest.approx(1e-6)
