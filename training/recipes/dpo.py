"""DPO: preference pairs, a reference computed once, and the DPO loss.

The shared machinery (data plan, optimizer, all-reduce, checkpoints, export) is the base
recipe's (``training.recipes.base.Recipe``). What is DPO's own:

- data: preference pairs (``training.data.preference``), stored per split like SFT's;
- the policy: a LoRA adapter on the base model, or, continuing from an SFT adapter
  (``spec.init_adapter``), that adapter's weights and shape;
- the reference: computed once before the first step, or read from the cache
  (``training.recipes.reference``); every pair then carries its reference log-probs;
- the step: one forward pass over the stacked (or packed) chosen and rejected sequences, the DPO
  loss (``training.losses.dpo``) summed over pairs and divided by the pairs of the global batch;
- metrics: loss, rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}, on the
  training batch at every step and on the validation file at checkpoints (``valid_…``) and at
  the end (``full_valid_…``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from training.data import examples as data
from training.data import preference as preference_data
from training.data.preference import Pair
from training.losses import dpo
from training.model.chat import IGNORE_INDEX
from training.recipes import reference
from training.recipes.base import Recipe

SUM_FIELDS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
              "logps/rejected", "pairs", "tokens", "supervised")
"""What a step sums over its pairs (then all-reduced over ranks); ``pair_metrics`` averages."""


def batch_sums(batch: dict[str, torch.Tensor], out: dpo.DPOOutput, chosen: torch.Tensor,
               rejected: torch.Tensor) -> torch.Tensor:
    """The ``SUM_FIELDS`` of one micro-batch."""
    tokens = batch["tokens"]
    supervised = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    wins = (out.chosen_rewards > out.rejected_rewards).float().sum()
    values = [out.losses.detach().sum(), out.chosen_rewards.sum(), out.rejected_rewards.sum(),
              wins, chosen.detach().sum(), rejected.detach().sum(), len(chosen), tokens,
              supervised]
    return torch.tensor([float(v) for v in values])


def chosen_token_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(m,) supervised tokens of each pair's chosen answer (sequence i of 2m)."""
    m = len(batch["pair_index"])
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    owners = batch["sequence_ids"][:, 1:][keep]
    return torch.bincount(owners, minlength=2 * m)[:m].float()


def pair_metrics(s: dict[str, float]) -> dict[str, float]:
    """Means over the pairs of the sums ``s`` (``SUM_FIELDS``): loss, rewards/…, logps/…
    (TRL's names, so curves compare)."""
    n = max(s["pairs"], 1.0)
    metrics = {name: s[name] / n for name in SUM_FIELDS[:6]}
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


class DPORecipe(Recipe[Pair]):
    """One worker's share of a DPO run (see the module docstring)."""

    noun = "preference pairs"
    SUMS: ClassVar[tuple[str, ...]] = SUM_FIELDS

    # -- data ----------------------------------------------------------------------------------

    def split_fingerprint(self, file_ids: list[str]) -> str:
        return preference_data.fingerprint(file_ids, self.fingerprint["template_hash"],
                                           self.spec.max_length)

    def build_split(self, file_ids: list[str]) -> tuple[Any, data.SplitStats]:
        return preference_data.build_split(self.storage, self.tokenizer, file_ids,
                                           self.spec.max_length, self.fingerprint["template_hash"])

    def load_split(self, prefix: str, folder: Path) -> tuple[list[Pair], list[int]]:
        return preference_data.load_pairs(self.storage, prefix, folder)

    def example_tokens(self, example: Pair) -> int:
        return example.n_tokens

    def batches(self, pairs: list[Pair]) -> list[dict[str, torch.Tensor]]:
        return preference_data.micro_batches(
            pairs, packing_on=self.spec.packing, pack_length=self.spec.pack_length,
            micro_batch_size=self.spec.micro_batch_size, pad_id=self.tokenizer.pad_token_id or 0,
            share_prefix=self.share_prefix)

    # -- the policy and the reference ------------------------------------------------------------

    def setup_model(self, model_dir: Path) -> None:
        super().setup_model(model_dir)  # the policy: a new adapter, or the init adapter's weights
        spec = self.spec
        if spec.reference_adapter and spec.reference_adapter == spec.init_adapter:
            self.reference_dir = self.init_dir
        else:
            self.reference_dir = self.fetch_adapter(spec.reference_adapter, "reference-adapter")
        self.setup_reference()

    def setup_reference(self) -> None:
        """Give every pair its reference log-probs: from the cache, or from one pass."""
        adapter_hash = reference.adapter_hash(self.reference_dir) if self.reference_dir else None
        self.reference_cache: dict[str, str] = {}
        self.train_examples = self.with_reference("train", self.train_examples, adapter_hash)
        if self.valid_examples:
            self.valid_examples = self.with_reference("valid", self.valid_examples, adapter_hash)

    def with_reference(self, split: str, pairs: list[Pair], adapter_hash: str | None
                       ) -> list[Pair]:
        key = reference.cache_key(
            data_hashes=self.stats[split].file_hashes.values(),
            template_hash=self.fingerprint["template_hash"], max_length=self.spec.max_length,
            base_weights_hash=self.fingerprint["base_weights_hash"],
            reference_adapter_hash=adapter_hash, bf16=self.use_bf16)
        which = self.spec.reference_adapter or "the base model (adapter disabled)"
        cached = reference.load_cached(self.storage, key, len(pairs))
        hits = self.all_reduce(torch.tensor([float(cached is not None)]))
        if cached is not None and int(hits.item()) == self.world_size:
            self.reference_cache[split] = "hit"
            self.emit(f"Reference log-probs of the {split} data ({len(pairs)} pairs, reference "
                      f"{which}) read from the cache: no reference pass",
                      data={"split": split, "reference_cache": "hit",
                            "reference_cache_key": key})
            return cached.attach(pairs)
        started = time.perf_counter()
        with reference.reference_mode(self.model, self.reference_dir):
            local = reference.compute(self.score, self.batches(pairs[self.rank::self.world_size]),
                                      len(pairs))
        flat = self.all_reduce(torch.cat([local.chosen, local.rejected]))  # the whole split
        logps = reference.ReferenceLogps(*flat.split(len(pairs)))
        if self.rank == 0:
            reference.store(self.storage, key, logps)
        seconds = time.perf_counter() - started
        self.reference_cache[split] = "miss"
        self.emit(f"Reference pass over the {split} data: {len(pairs)} pairs in {seconds:.1f}s "
                  f"with {which}; cached for later epochs and jobs",
                  data={"split": split, "reference_cache": "miss", "reference_cache_key": key,
                        "reference_pass_seconds": seconds})
        return logps.attach(pairs)

    # -- the step --------------------------------------------------------------------------------

    def score(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs (chosen (m,), rejected (m,)) in one forward pass."""
        inputs = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask",
                                                        "position_ids", "cu_seq_lens_q",
                                                        "segment_parents") if k in batch}
        m = len(batch["pair_index"])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            hidden = self.decoder(**inputs, use_cache=False).last_hidden_state
            logps = dpo.sequence_logps(hidden, batch["labels"].to(self.device),
                                       batch["sequence_ids"].to(self.device), 2 * m,
                                       self.lm_head, self.softcap)
        return logps[:m], logps[m:]

    def batch_loss(self, batch: dict[str, torch.Tensor]
                   ) -> tuple[dpo.DPOOutput, torch.Tensor, torch.Tensor]:
        chosen, rejected = self.score(batch)
        out = dpo.dpo_loss(chosen, rejected, batch["reference_chosen"].to(self.device),
                           batch["reference_rejected"].to(self.device), beta=self.spec.beta,
                           label_smoothing=self.spec.label_smoothing,
                           loss_type=self.spec.dpo_loss, rpo_alpha=self.spec.rpo_alpha,
                           chosen_tokens=(chosen_token_counts(batch).to(self.device)
                                          if self.spec.rpo_alpha else None))
        return out, chosen, rejected

    def forward_backward(self, pairs: list[Pair]) -> torch.Tensor:
        """Each micro-batch's loss summed over its pairs, divided by the pairs of the global
        batch, so the summed gradients are those of the global mean whatever the split."""
        global_pairs = int(self.all_reduce(torch.tensor([float(len(pairs))])).item())
        sums = torch.zeros(len(SUM_FIELDS))
        for batch in self.batches(pairs):
            out, chosen, rejected = self.batch_loss(batch)
            (out.losses.sum() / max(global_pairs, 1)).backward()
            sums += batch_sums(batch, out, chosen, rejected)
        return sums

    # -- metrics ---------------------------------------------------------------------------------

    def train_metrics(self, sums: dict[str, float], seconds: float) -> dict[str, float]:
        metrics = pair_metrics(sums)
        return {"train_loss": metrics.pop("loss"), **metrics,
                "pairs_per_second": sums["pairs"] / seconds}

    def eval_sums(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out, chosen, rejected = self.batch_loss(batch)
        return batch_sums(batch, out, chosen, rejected)

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return pair_metrics(sums)

    def settings_note(self) -> tuple[str, dict[str, Any]]:
        """At a fresh start the loss is ln 2: the policy equals the reference."""
        rpo = (f" + rpo_alpha {self.spec.rpo_alpha} × the chosen answers' token NLL"
               if self.spec.rpo_alpha else "")
        note = (f" (ln 2 = {math.log(2):.4f} while the policy equals the reference{rpo}), "
                f"beta={self.spec.beta}")
        return note, {"beta": self.spec.beta, "rpo_alpha": self.spec.rpo_alpha}

    def manifest(self) -> dict[str, Any]:
        spec = self.spec
        return {**super().manifest(), "dpo": {
            "beta": spec.beta, "loss": spec.dpo_loss, "label_smoothing": spec.label_smoothing,
            "rpo_alpha": spec.rpo_alpha,
            "init_adapter": spec.init_adapter, "reference_adapter": spec.reference_adapter,
            "reference_cache": self.reference_cache}}
