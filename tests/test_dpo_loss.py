"""The DPO loss, spelled out; response log-probs; pair batches; the toy preference set.

Fast: plain tensors and the tiny model in this process (no Ray, no S3)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.model import chat

from training.losses import dpo

from training.model import registry

from training.data import preference as preference_data

from training.recipes import reference
from training.model.attention import shares_prefixes, use_packed_attention
from training.model.chat import IGNORE_INDEX
from training.spec import TrainSpec
from training.recipes.dpo import chosen_token_counts
from training.model.lora import apply_adapter
from training.data.packing import shared_prefix_length, trained_length
from training.data.preference import Pair

REPO = Path(__file__).resolve().parent.parent


def load_make_preferences():
    spec = importlib.util.spec_from_file_location(
        "make_preferences", REPO / "bench" / "data" / "make_preferences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the loss -----------------------------------------------------------------------------------

POLICY_CHOSEN = torch.tensor([-1.0, -2.0])
POLICY_REJECTED = torch.tensor([-3.0, -1.0])
REF_CHOSEN = torch.tensor([-2.0, -2.0])
REF_REJECTED = torch.tensor([-2.0, -2.0])


def test_sigmoid_loss_spelled_out():
    """log-ratios: chosen [1, 0], rejected [-1, 1]; with β = 0.1, h = 0.1·[2, −1] = [0.2, −0.1];
    loss = −log σ(h) = log(1 + e^{−h}) = [0.598139, 0.744397];
    rewards: chosen β·[1, 0] = [0.1, 0], rejected β·[−1, 1] = [−0.1, 0.1]."""
    out = dpo.dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1)
    torch.testing.assert_close(out.losses, torch.tensor([math.log1p(math.exp(-0.2)),
                                                         math.log1p(math.exp(0.1))]))
    torch.testing.assert_close(out.losses, torch.tensor([0.598139, 0.744397]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.1, 0.1]))


def test_label_smoothing_mixes_in_the_flipped_label():
    """ε = 0.1: loss = 0.9·log(1 + e^{−h}) + 0.1·log(1 + e^{h}), h = [0.2, −0.1]."""
    out = dpo.dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1,
                       label_smoothing=0.1)
    h = torch.tensor([0.2, -0.1])
    expected = 0.9 * torch.log1p(torch.exp(-h)) + 0.1 * torch.log1p(torch.exp(h))
    torch.testing.assert_close(out.losses, expected)


def test_rpo_adds_the_chosen_answers_mean_token_nll():
    """RPO: loss = DPO loss + α · (−log π(chosen) / chosen tokens); pair 0 has 4 chosen tokens
    summing to POLICY_CHOSEN[0], pair 1 has 2."""
    plain = dpo.dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1)
    rpo = dpo.dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1,
                       rpo_alpha=0.5, chosen_tokens=torch.tensor([4.0, 2.0]))
    expected = plain.losses + 0.5 * -POLICY_CHOSEN / torch.tensor([4.0, 2.0])
    torch.testing.assert_close(rpo.losses, expected)
    torch.testing.assert_close(rpo.chosen_rewards, plain.chosen_rewards)


def test_chosen_token_counts_follow_the_sequence_ids():
    batch = preference_data.collate_packed(toy_pairs())  # chosen answers: 1 and 1 tokens
    assert chosen_token_counts(batch).tolist() == [1.0, 1.0]
    stacked = preference_data.collate_stacked(toy_pairs(), pad_id=0)
    assert chosen_token_counts(stacked).tolist() == [1.0, 1.0]


def test_ipo_loss_spelled_out():
    """IPO: (h/β − 1/(2β))² with h/β = [2, −1] and 1/(2β) = 5: [(2−5)², (−1−5)²] = [9, 36]."""
    out = dpo.dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1,
                       loss_type="ipo")
    torch.testing.assert_close(out.losses, torch.tensor([9.0, 36.0]))


@pytest.mark.parametrize("beta,smoothing", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2), (2.0, 0.3)])
def test_loss_is_ln2_when_the_policy_is_the_reference(beta, smoothing):
    logps = torch.tensor([-12.5, -3.25, -40.0])
    out = dpo.dpo_loss(logps, logps - 1, logps, logps - 1, beta=beta, label_smoothing=smoothing)
    torch.testing.assert_close(out.losses, torch.full((3,), math.log(2)))
    assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0


def test_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-5.0], requires_grad=True)
    rejected = torch.tensor([-5.0], requires_grad=True)
    dpo.dpo_loss(chosen, rejected, torch.tensor([-5.0]), torch.tensor([-5.0])).losses.sum().backward()
    # d/dh −log σ(h) at h = 0 is −1/2; dh/dchosen = β = 0.1.
    assert chosen.grad.item() == pytest.approx(-0.05)
    assert rejected.grad.item() == pytest.approx(0.05)


# -- response log-probs -------------------------------------------------------------------------

def test_sequence_logps_sums_supervised_tokens_per_sequence():
    """Identity head: the hidden state *is* the logits. Row 0 holds sequence 0 (labels at t=1,2)
    and sequence 1 (label at t=4, its first token t=3 unscored); row 1 holds sequence 2, padded."""
    head = torch.nn.Linear(3, 3, bias=False)
    head.weight.data = torch.eye(3)
    hidden = torch.tensor([[[2.0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 3], [0, 0, 0]],
                           [[0, 4, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]])
    labels = torch.tensor([[IGNORE_INDEX, 0, 1, IGNORE_INDEX, 2],
                           [IGNORE_INDEX, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    owners = torch.tensor([[0, 0, 0, 1, 1], [2, 2, -1, -1, -1]])
    got = dpo.sequence_logps(hidden, labels, owners, 3, head)

    def ls(logits: list[float], y: int) -> float:
        return F.log_softmax(torch.tensor(logits), -1)[y].item()
    expected = torch.tensor([ls([2.0, 0, 0], 0) + ls([0, 1.0, 0], 1), ls([1.0, 1, 3], 2),
                             ls([0, 4.0, 0], 1)])
    torch.testing.assert_close(got, expected)


# -- pair batches -------------------------------------------------------------------------------

def toy_pairs() -> list[Pair]:
    return [Pair(0, ([1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 3]),
                 ([1, 2, 4, 5], [IGNORE_INDEX, IGNORE_INDEX, 4, 5]), reference=(-1.0, -2.0)),
            Pair(1, ([6, 7], [IGNORE_INDEX, 7]), ([6, 8, 9], [IGNORE_INDEX, 8, 9]),
                 reference=(-3.0, -4.0))]


def test_stacked_batch_puts_chosen_rows_first_then_rejected():
    batch = preference_data.collate_stacked(toy_pairs(), pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [6, 7, 0, 0], [1, 2, 4, 5], [6, 8, 9, 0]]
    assert batch["labels"][3].tolist() == [IGNORE_INDEX, 8, 9, IGNORE_INDEX]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, -1], [1, 1, -1, -1], [2, 2, 2, 2],
                                              [3, 3, 3, -1]]
    assert batch["pair_index"].tolist() == [0, 1]
    assert batch["reference_chosen"].tolist() == [-1.0, -3.0]
    assert batch["reference_rejected"].tolist() == [-2.0, -4.0]


def test_packed_batch_restarts_positions_per_sequence():
    """Each pair's chosen then rejected answer; sequence ids count chosen 0…m-1, rejected m…2m-1."""
    batch = preference_data.collate_packed(toy_pairs())
    assert batch["input_ids"].tolist() == [[1, 2, 3, 1, 2, 4, 5, 6, 7, 6, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 2, 2, 2, 2, 1, 1, 3, 3, 3]]
    assert "attention_mask" not in batch


def test_micro_batches_never_split_a_pair():
    pairs = toy_pairs() * 3
    packed = preference_data.micro_batches(pairs, packing_on=True, pack_length=14,
                                           micro_batch_size=2, pad_id=0)
    assert sum(len(b["pair_index"]) for b in packed) == 6
    for b in packed:
        m = len(b["pair_index"])
        assert int(b["sequence_ids"].max()) == 2 * m - 1
    stacked = preference_data.micro_batches(pairs, packing_on=False, pack_length=14,
                                            micro_batch_size=4, pad_id=0)
    assert [len(b["pair_index"]) for b in stacked] == [4, 2]


# -- the tiny model: one forward pass, the reference, step 0 ------------------------------------

@pytest.fixture(scope="module")
def tiny():
    model_dir = registry.resolve_model(registry.TINY_MODEL_ID)
    tokenizer = registry.load_tokenizer(model_dir)
    module = load_make_preferences()
    train, _ = module.make_preferences(6, 2, seed=1)
    pairs = []
    for i, row in enumerate(train):
        p = chat.tokenize_preference(tokenizer, row["prompt"], row["chosen"], row["rejected"], 512)
        pairs.append(Pair(i, (p.chosen.input_ids, p.chosen.labels),
                          (p.rejected.input_ids, p.rejected.labels)))
    spec = TrainSpec(job_id="ftjob-" + "0" * 24, base_model=registry.TINY_MODEL_ID,
                     training_files=(("file-" + "0" * 24, 1.0),), method="dpo")
    torch.manual_seed(0)
    model = apply_adapter(registry.load_model(model_dir, torch.float32,
                                            attn_implementation="sdpa"), spec)
    return model, pairs


def scorer(model):
    body = model.get_base_model()

    def score(batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids",
                                        "cu_seq_lens_q", "segment_parents") if k in batch}
        # use_cache=False: with a cache, transformers ignores the packed position ids
        hidden = body.model(**inputs, use_cache=False).last_hidden_state
        m = len(batch["pair_index"])
        logps = dpo.sequence_logps(hidden, batch["labels"], batch["sequence_ids"], 2 * m,
                                   body.get_output_embeddings())
        return logps[:m], logps[m:]
    return score


@torch.no_grad()
def test_packed_and_stacked_batches_score_the_same(tiny):
    model, pairs = tiny
    model.eval()
    score = scorer(model)
    packed = score(preference_data.collate_packed(pairs))
    stacked = score(preference_data.collate_stacked(pairs, pad_id=0))
    separately = [score(preference_data.collate_stacked([p], pad_id=0)) for p in pairs]
    torch.testing.assert_close(packed[0], stacked[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(packed[1], stacked[1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stacked[1], torch.cat([s[1] for s in separately]),
                               atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_a_pair_computes_its_prompt_once_and_scores_the_same(tiny):
    """With the per-example attention, each pair's prompt is computed once for both answers:
    the log-probs equal those of padded rows, and the row is shorter by each shared prompt."""
    model, pairs = tiny
    model.eval()
    body = model.get_base_model()
    assert use_packed_attention(body) and shares_prefixes(body)
    try:
        score = scorer(model)
        shared_batch = preference_data.collate_packed(pairs, share_prefix=True)
        shared = score(shared_batch)
        stacked = score(preference_data.collate_stacked(pairs, pad_id=0))
    finally:
        body.set_attn_implementation("sdpa")
    prompts = [shared_prefix_length([p.chosen, p.rejected]) for p in pairs]
    assert min(prompts) > 0
    # Each answer's row ends at its end-of-turn marker (the template's newline is left out).
    trained = sum(trained_length(labels) for p in pairs for _, labels in (p.chosen, p.rejected))
    assert trained == sum(p.n_tokens for p in pairs) - 2 * len(pairs)
    assert shared_batch["input_ids"].shape[1] == trained - sum(prompts)
    assert int(shared_batch["tokens"]) == sum(p.n_tokens for p in pairs)
    torch.testing.assert_close(shared[0], stacked[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(shared[1], stacked[1], atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_step0_loss_is_ln2_against_the_disabled_adapter(tiny, tmp_path):
    model, pairs = tiny
    score = scorer(model)
    batches = [preference_data.collate_stacked(pairs, pad_id=0)]
    with reference.reference_mode(model, None):
        ref = reference.compute(score, batches, len(pairs))
    # A LoRA adapter starts with B = 0: the policy is the reference, the loss is ln 2.
    batch = preference_data.collate_stacked(ref.attach(pairs), pad_id=0)
    chosen, rejected = score(batch)
    out = dpo.dpo_loss(chosen, rejected, batch["reference_chosen"], batch["reference_rejected"])
    torch.testing.assert_close(out.losses, torch.full((len(pairs),), math.log(2)),
                               atol=1e-5, rtol=0)
    assert (ref.chosen > ref.rejected).sum() >= 0  # finite sums, one per pair
    assert torch.isfinite(ref.chosen).all() and ref.chosen.shape == (len(pairs),)

    # A reference adapter is used while loaded, then removed; the policy stays as it was.
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.add_(0.05)
    model.save_pretrained(str(tmp_path / "sft"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.sub_(0.05)
    with reference.reference_mode(model, tmp_path / "sft"):
        sft_ref = reference.compute(score, batches, len(pairs))
    assert not torch.allclose(sft_ref.chosen, ref.chosen, atol=1e-3)
    assert list(model.peft_config) == ["default"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".default." in n for n in trainable)
    again = score(batch)
    torch.testing.assert_close(again[0], chosen)


def test_cache_key_changes_with_everything_the_values_depend_on():
    base = {"data_hashes": ["a"], "template_hash": "t", "max_length": 512,
            "base_weights_hash": "w", "reference_adapter_hash": None, "bf16": True}
    key = reference.cache_key(**base)
    assert key.startswith("cache/ref-logps/") and key.endswith(".safetensors")
    assert reference.cache_key(**base) == key
    for change in ({"data_hashes": ["b"]}, {"template_hash": "u"}, {"max_length": 256},
                   {"base_weights_hash": "v"}, {"reference_adapter_hash": "r"}, {"bf16": False}):
        assert reference.cache_key(**{**base, **change}) != key, change


# -- the toy set --------------------------------------------------------------------------------

def test_toy_preferences_are_deterministic_and_splits_never_overlap(tmp_path):
    module = load_make_preferences()
    train, heldout = module.make_preferences(256, 64, seed=0)
    assert (train, heldout) == module.make_preferences(256, 64, seed=0)
    assert module.make_preferences(256, 64, seed=1) != (train, heldout)
    train_questions = {row["prompt"][-1]["content"] for row in train}
    assert not train_questions & {row["prompt"][-1]["content"] for row in heldout}
    assert len(train_questions) == 256
    for row in train + heldout:
        assert len(row["chosen"]) < len(row["rejected"]) / 4
        assert row["chosen"].rstrip(".") in row["rejected"]  # the same answer, wrapped in filler
    module.main(["--out", str(tmp_path), "--train", "8", "--heldout", "4"])
    lines = (tmp_path / "heldout.jsonl").read_text().splitlines()
    assert len(lines) == 4 and set(json.loads(lines[0])) == {"prompt", "chosen", "rejected"}
