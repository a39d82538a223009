"""The SFT loss: masked, normalised over the global batch, the same packed or padded, and
correct for each supported model family (tiny random configs, no Ray)."""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch
import transformers

from service.core.errors import InvalidRequest
from training.losses import cross_entropy as loss_module
from training.model.adapter import lora_settings
from training.model.attention import PACKED, shares_prefixes, use_packed_attention
from training.model.chat import IGNORE_INDEX
from training.spec import TrainSpec
from training.cpu.lookahead import Lookahead
from training.model.lora import TARGET_MODULES, AddmmLora, apply_adapter
from training.losses.cross_entropy import masked_token_sums, normalised_loss, supervised_count
from training.data.packing import collate_packed, collate_padded, shared_prefix_length

X = IGNORE_INDEX


class CountingHead(torch.nn.Module):
    """An identity 'lm_head' (C = V = 3) that records how many rows it was asked to project."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.rows += h.shape[0]
        return h


def test_loss_sums_only_supervised_tokens_and_skips_masked_logits():
    """hidden[t] are the logits predicting labels[t+1]. With labels [X, X, 2, 0] only the
    predictions made at t=1 (target 2) and t=2 (target 0) count:
      t=1: logits [0, 0, ln 3] → p(2) = 3/5   → loss ln(5/3), correct (arg-max 2)
      t=2: logits [ln 2, 0, 0]  → p(0) = 2/4   → loss ln 2,    correct (arg-max 0)
    The prediction at t=0 (target X) is never projected."""
    hidden = torch.tensor([[[9.0, 0.0, 0.0], [0.0, 0.0, math.log(3)],
                            [math.log(2), 0.0, 0.0], [0.0, 7.0, 0.0]]])
    labels = torch.tensor([[X, X, 2, 0]])
    head = CountingHead()
    sums = masked_token_sums(hidden, labels, head)
    assert sums.count == 2 == supervised_count(labels)
    assert sums.correct == 2
    assert sums.loss.item() == pytest.approx(math.log(5 / 3) + math.log(2), abs=1e-6)
    assert head.rows == 2  # masked positions never reach the output projection


def test_normalised_loss_divides_by_the_global_count():
    hidden = torch.zeros(1, 3, 3)
    labels = torch.tensor([[X, 1, 1]])  # two tokens, each with loss ln 3 (uniform logits)
    sums = masked_token_sums(hidden, labels, CountingHead())
    assert sums.loss.item() == pytest.approx(2 * math.log(3), abs=1e-6)
    # This micro-batch holds 2 of the global batch's 8 supervised tokens.
    assert normalised_loss(sums, 8).item() == pytest.approx(2 * math.log(3) / 8, abs=1e-6)


# -- tiny models of each family ---------------------------------------------------------------

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
              intermediate_size=64, num_key_value_heads=2)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=8),
    "falcon": lambda: transformers.FalconConfig(
        vocab_size=96, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
        new_decoder_architecture=True, num_kv_heads=2, alibi=False, bias=False),
}


def tiny_model(family: str, attention: str = "sdpa") -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = FAMILIES[family]()
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if attention == PACKED:
        use_packed_attention(model)
    return model


def spec(**overrides) -> TrainSpec:
    return TrainSpec(job_id="ftjob-" + "0" * 24, base_model="tiny",
                     training_files=(("file-" + "0" * 24, 1.0),), **overrides)


EXAMPLES = [  # (input_ids, labels): prompts masked, responses supervised, different lengths
    ([5, 6, 7, 8, 9], [X, X, X, 8, 9]),
    ([10, 11, 12], [X, X, 12]),
    ([13, 14, 15, 16, 17, 18, 19], [X, X, X, X, 17, 18, 19]),
    ([20, 21, 22, 23], [X, X, 22, 23]),
]


def loss_sums(model, batch: dict[str, torch.Tensor]):
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = batch.pop("labels")
    hidden = causal_lm.base_model(**batch, use_cache=False).last_hidden_state
    return masked_token_sums(hidden, labels, causal_lm.get_output_embeddings())


@pytest.mark.parametrize("attention", ["sdpa", PACKED])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_rows_give_the_loss_of_separate_examples(family: str, attention: str):
    """Packed examples must not attend to each other: the summed loss of one packed row equals
    that of the same examples padded into separate rows, for every supported family, with
    transformers' block-diagonal mask and with our per-example attention (which the trainer
    uses) — and so do the gradients."""
    model = tiny_model(family, attention).train()
    assert_same_loss_and_grads(model, collate_packed(EXAMPLES), collate_padded(EXAMPLES, 0), 8)


def assert_same_loss_and_grads(model, batch, reference, count: int) -> None:
    """``batch`` gives ``reference``'s supervised count, summed loss and every gradient."""
    sums = loss_sums(model, batch)
    sums.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = loss_sums(model, reference)
    expected.loss.backward()
    assert sums.count == expected.count == count
    assert sums.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    for a, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_a_row_mixing_short_and_long_examples_trains_under_bf16_autocast():
    """Short spans attend in fp32 with autocast off; a long one in the same row must still get
    autocast's bf16 cast (rotary leaves query and key in fp32, value in bf16): forward and
    backward run, and its loss is the unpacked one's within bf16 rounding."""
    from training.model.attention import attend_in_fp32_below

    model = tiny_model("llama", PACKED).train()
    attend_in_fp32_below(model, 16)
    long = (list(range(3, 43)), [X] * 20 + list(range(23, 43)))  # 40 tokens: not short
    examples = [EXAMPLES[0], long, EXAMPLES[1]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums = loss_sums(model, collate_packed(examples))
        sums.loss.backward()
        expected = loss_sums(model, collate_padded(examples, 0))
    assert sums.count == expected.count == 2 + 20 + 1
    assert sums.loss.item() == pytest.approx(expected.loss.item(), rel=2e-2)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


TAILED = [  # what follows the last supervised token (a template's newline after <|im_end|>)
    ([3, 4, 5, 6, 7, 8, 9, 1], [X, X, X, X, X, 8, 9, X]),
    ([3, 4, 5, 6, 12, 13, 1, 1], [X, X, X, X, 12, X, X, X]),
    ([3, 4, 5, 6, 15, 16, 17, 18, 19], [X, X, X, X, X, 16, X, 18, 19]),  # no tail; a gap kept
]


@pytest.mark.parametrize("share_prefix", [False, True])
def test_rows_leave_out_what_follows_the_last_supervised_token(share_prefix: bool):
    """Tokens after an example's last supervised one predict nothing trained and nothing
    attends to them: rows leave them out, with the loss and every gradient of the whole
    examples padded."""
    model = tiny_model("llama", PACKED).train()
    row = collate_packed(TAILED, share_prefix=share_prefix)
    shared = 3 if share_prefix else 0
    assert row["input_ids"].shape[1] == 7 + 5 + 9 - 2 * shared
    assert row["input_ids"][0, -5:].tolist() == [15, 16, 17, 18, 19]
    assert_same_loss_and_grads(model, row, collate_padded(TAILED, pad_id=0), 6)


SHARED = [  # a common unsupervised start (a system prompt, an instruction), then each its own
    ([3, 4, 5, 6, 7, 8, 9], [X, X, X, X, X, 8, 9]),
    ([3, 4, 5, 6, 12], [X, X, X, X, 12]),
    ([3, 4, 5, 6, 15, 16, 17, 18, 19], [X, X, X, X, X, X, 17, 18, 19]),
]


def test_the_shared_prefix_stops_before_anything_supervised():
    assert shared_prefix_length(SHARED) == 3  # label 12 at position 4 is predicted from token 3
    assert shared_prefix_length(SHARED[:1]) == 0  # nothing to share in a single example
    same = [([1, 2, 3], [X, X, X]), ([1, 2, 3], [X, X, X])]
    assert shared_prefix_length(same) == 2  # each example keeps a token of its own
    row = collate_packed(SHARED, share_prefix=True)
    assert row["input_ids"].shape[1] == sum(len(ids) for ids, _ in SHARED) - 2 * 3
    assert row["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4, 3, 4, 5, 6, 7, 8]
    assert row["segment_parents"].tolist() == [-1, 0, 0, 0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_shared_prefix_computed_once_gives_the_loss_and_grads_of_separate_examples(family: str):
    """The prefix the examples share is computed once per row; each example attends to it and to
    itself: the loss and every gradient equal those of separate padded examples."""
    model = tiny_model(family, PACKED).train()
    if family == "falcon":  # its own attention classes: rows keep the block-diagonal mask
        assert not shares_prefixes(model)
        return
    assert shares_prefixes(model)
    assert_same_loss_and_grads(model, collate_packed(SHARED, share_prefix=True),
                               collate_padded(SHARED, pad_id=0), 6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_adapts_the_family_linear_layers_and_trains_only_them(family: str):
    model = apply_adapter(tiny_model(family), spec())
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters()
               if "lora_A" in name}
    assert adapted == set(TARGET_MODULES[family])
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    sums = loss_sums(model, collate_packed(EXAMPLES))
    normalised_loss(sums, sums.count).backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_before[name]), f"base weight {name} changed"
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero; the step moved it


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_layers_adapts_only_the_last_layers_and_its_adapter_says_so(family: str, tmp_path):
    model = apply_adapter(tiny_model(family), spec(lora_layers=1))
    adapted = {n for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted and all(".1." in n for n in adapted)  # layer 1 of the 2, every target in it
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in adapted} == set(TARGET_MODULES[family])
    sums = loss_sums(model, collate_packed(EXAMPLES))
    normalised_loss(sums, sums.count).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
    # Saved as PEFT does; a job continuing from it (DPO after SFT) gets the same shape back.
    model.save_pretrained(tmp_path)
    assert lora_settings(tmp_path)["lora_layers"] == 1
    assert all(".1." in key for key in safetensors.torch.load_file(
        tmp_path / "adapter_model.safetensors"))
    everything = apply_adapter(tiny_model(family), spec(lora_layers=5))  # more than it has: all
    assert any(".0." in n for n, _ in everything.named_parameters() if "lora_A" in n)
    with pytest.raises(InvalidRequest) as refused:
        spec(lora_layers=0).validate()
    assert refused.value.param == "lora.layers"


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_addmm_lora_gives_peft_lora_loss_and_gradients(dropout: float):
    """Our LoRA arithmetic (``AddmmLora``: the scaling on the rank side, the add inside the
    matmul) computes PEFT's plain LoRA: the same loss and gradients in fp32, and under bf16
    autocast no further from the fp32 values than PEFT's own path is."""
    model = apply_adapter(tiny_model("llama"), spec(lora_dropout=dropout)).train()
    variants = [m.lora_variant for m in model.modules() if hasattr(m, "lora_variant")]
    assert variants and all(isinstance(v["default"], AddmmLora) for v in variants)
    with torch.no_grad():  # move B off zero so A's gradient is not zero too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)

    def run(ours: bool, autocast: bool) -> list[torch.Tensor]:
        for v in variants:
            v.clear()
            if ours:
                v["default"] = AddmmLora()
        torch.manual_seed(0)  # the same dropout masks on both paths
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            sums = loss_sums(model, collate_packed(EXAMPLES))
        normalised_loss(sums, sums.count).backward()
        out = [sums.loss.detach().reshape(1), *gradients(model)]
        model.zero_grad()
        return out

    exact = run(ours=False, autocast=False)
    assert len(exact) > 1 and all(t.abs().sum() > 0 for t in exact)
    for a, b in zip(run(ours=True, autocast=False), exact, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for ours, peft, b in zip(run(ours=True, autocast=True), run(ours=False, autocast=True), exact,
                             strict=True):
        assert (ours - b).norm() <= 1.5 * (peft - b).norm() + 1e-3 * b.norm()


def test_bf16_frozen_weights_keep_the_autocast_loss():
    """Storing frozen linear weights in bf16 is exact under bf16 autocast (autocast would cast
    them anyway), while embeddings and norms stay fp32."""
    fp32 = apply_adapter(tiny_model("llama"), spec())
    bf16 = apply_adapter(tiny_model("llama"), spec(), frozen_dtype=torch.bfloat16)
    assert bf16.get_base_model().model.embed_tokens.weight.dtype == torch.float32
    up_proj = bf16.get_base_model().model.layers[0].mlp.up_proj
    assert up_proj.base_layer.weight.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = loss_sums(fp32, collate_packed(EXAMPLES)).loss.item()
        b = loss_sums(bf16, collate_packed(EXAMPLES)).loss.item()
    assert a == pytest.approx(b, rel=1e-6)


def gradients(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_one_micro_batch_of_4_equals_4_accumulated_micro_batches_of_1():
    """Gradient accumulation invariance (TRL tests/invariant): normalising every micro-batch by
    the supervised tokens of the whole window gives the gradient of one big batch; a
    per-micro-batch mean (litgpt's fit) would over-weight the short responses."""
    model = apply_adapter(tiny_model("llama"), spec())
    with torch.no_grad():  # move B off zero so every LoRA weight gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    global_count = sum(supervised_count(torch.tensor([labels])) for _, labels in EXAMPLES)

    whole = loss_sums(model, collate_padded(EXAMPLES, pad_id=0))
    normalised_loss(whole, global_count).backward()
    big_batch = gradients(model)
    model.zero_grad()

    for example in EXAMPLES:
        sums = loss_sums(model, collate_padded([example], pad_id=0))
        normalised_loss(sums, global_count).backward()
    accumulated = gradients(model)
    model.zero_grad()

    for example in EXAMPLES:  # the naive alternative: mean per micro-batch, divided by 4
        sums = loss_sums(model, collate_padded([example], pad_id=0))
        (sums.loss / sums.count / len(EXAMPLES)).backward()
    naive = gradients(model)

    for a, b in zip(big_batch, accumulated):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(a, c, rtol=1e-3, atol=1e-6) for a, c in zip(big_batch, naive))


def test_activation_checkpointing_keeps_the_gradients():
    """Recomputing layers in the backward pass (to save memory) must not change a gradient."""
    model = apply_adapter(tiny_model("llama"), spec())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.train()
    sums = loss_sums(model, collate_packed(EXAMPLES))
    normalised_loss(sums, sums.count).backward()
    plain = gradients(model)
    model.zero_grad()
    model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False})
    sums = loss_sums(model, collate_packed(EXAMPLES))
    normalised_loss(sums, sums.count).backward()
    for a, b in zip(plain, gradients(model)):
        torch.testing.assert_close(a, b)


class Projection(torch.nn.Module):
    """The same weight as a Linear head, but not one: masked_token_sums takes autograd's path."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_cross_entropy_equals_autograd(autocast: bool, softcap: float | None,
                                               monkeypatch):
    """The fused, chunked loss (no logits kept for backward) gives autograd's loss, hits and
    gradients for the hidden states and a trainable head, in fp32 and under bf16 autocast."""
    monkeypatch.setattr(loss_module, "CHUNK", 7)  # several chunks and a partial last one
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(1, 24, 16)
    labels = torch.randint(0, 50, (1, 24))
    with torch.no_grad():  # every third token is the head's top prediction: hits to count
        labels[0, 1::3] = head(hidden[0, :-1:3]).argmax(dim=-1)
    labels[0, :5] = X
    results = []
    for projection in (head, Projection(head)):
        h = hidden.clone().requires_grad_(True)
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            sums = masked_token_sums(h, labels, projection, softcap)
        (sums.loss * 0.5).backward()
        results.append((sums.loss.item(), sums.correct, h.grad.clone(), head.weight.grad.clone()))
    fused, reference = results
    assert fused[0] == pytest.approx(reference[0], rel=1e-4 if autocast else 1e-6)
    assert fused[1] == reference[1] >= 6
    tolerance = {"rtol": 2e-2, "atol": 1e-3} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(fused[2], reference[2], **tolerance)
    torch.testing.assert_close(fused[3], reference[3], **tolerance)


def test_a_frozen_head_cast_once_still_follows_its_weights():
    """Under autocast a frozen head is cast to bf16 once, not per micro-batch; the loss is still
    that of its current weights: exactly the per-call cast's, also after they change in place
    (as loading a checkpoint into them does)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(1, 24, 16)
    labels = torch.randint(0, 50, (1, 24))

    def losses() -> tuple[float, float]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = masked_token_sums(hidden, labels, head).loss.item()
            per_call = masked_token_sums(hidden, labels, Projection(head)).loss.item()
        return fused, per_call

    first = losses()
    assert first[0] == pytest.approx(first[1], rel=1e-6)
    assert losses() == first  # the second call uses the kept cast: same loss
    with torch.no_grad():
        head.weight.mul_(3.0)
    changed = losses()
    assert changed[0] != pytest.approx(first[0], rel=1e-3)
    assert changed[0] == pytest.approx(changed[1], rel=1e-6)


@pytest.mark.parametrize("autocast", [False, True])
def test_frozen_layers_run_ahead_give_the_loss_and_grads_of_the_whole_decoder(autocast: bool):
    """With LoRA on the last layer only, the frozen first layer of a batch runs ahead on its own
    thread (``training.cpu.lookahead``): the loss and every gradient are those of the whole decoder,
    on shared-prefix rows as the trainer builds them, in fp32 and under bf16 autocast. The
    frozen layer computes the prefix once, for the first row; the second row reuses it."""
    model = apply_adapter(tiny_model("llama", PACKED), spec(lora_layers=1),
                          frozen_dtype=torch.bfloat16 if autocast else None).train()
    with torch.no_grad():  # move B off zero so every LoRA weight gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    causal_lm = model.get_base_model()
    decoder, head = causal_lm.base_model, causal_lm.get_output_embeddings()
    assert Lookahead.usable(decoder, torch.device("cpu"), cpus=2) == 1
    lookahead = Lookahead(decoder, 1, use_bf16=autocast, threads=2)
    try:
        for examples in (SHARED, SHARED[::-1]):
            batch = collate_packed(examples, share_prefix=True)
            lookahead.submit(examples, [batch])
            assert lookahead.take([(list(i), list(l)) for i, l in examples]) is None  # equal ≠ same
            micro, below = lookahead.take(examples)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                hidden = lookahead.upper_hidden(below[0], micro[0], micro[0]["labels"])
                ahead = masked_token_sums(hidden, micro[0]["labels"], head)
            ahead.loss.backward()
            grads = gradients(model)
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                whole = loss_sums(model, collate_packed(examples, share_prefix=True))
            whole.loss.backward()
            assert ahead.count == whole.count == 6
            assert ahead.loss.item() == pytest.approx(whole.loss.item(), rel=1e-6)
            for a, b in zip(grads, gradients(model), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
            model.zero_grad()
        assert list(lookahead.prefixes) == [tuple(SHARED[0][0][:3])]  # computed once, kept
    finally:
        lookahead.close()


def test_frozen_layers_run_ahead_only_where_they_exist_and_unclaimed_ones_are_dropped():
    """Nothing runs ahead with every layer adapted, full fine-tuning, one CPU, or a decoder
    family outside ``SUPPORTED``; what was submitted but never taken is dropped in order."""
    cpu = torch.device("cpu")

    def decoder(family: str, **overrides) -> torch.nn.Module:
        return apply_adapter(tiny_model(family, PACKED), spec(**overrides)).get_base_model().base_model

    assert Lookahead.usable(decoder("llama", lora_layers=1), cpu, cpus=1) == 0
    assert Lookahead.usable(decoder("llama"), cpu, cpus=2) == 0  # every layer adapted
    full = tiny_model("llama", PACKED)
    assert Lookahead.usable(apply_adapter(full, spec(full_finetune=True)).base_model, cpu, 2) == 0
    assert Lookahead.usable(decoder("gemma", lora_layers=1), cpu, cpus=2) == 0
    lookahead = Lookahead(decoder("llama", lora_layers=1), 1, use_bf16=False, threads=2)
    try:
        first, second = EXAMPLES[:2], EXAMPLES[2:]
        lookahead.submit(first, [collate_packed(first)])
        lookahead.submit(second, [collate_packed(second)])
        assert lookahead.take(second) is not None  # the first was never taken: dropped
        assert lookahead.take(first) is None and not lookahead.pending
    finally:
        lookahead.close()
