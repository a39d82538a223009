"""One worker's share of a DPO run: the SFT machinery with pairs, a reference pass and a DPO step.

Everything a run needs besides the step is the SFT trainer's (``training.recipes.sft.SFTTrainer``): the
data plan over seeds, epochs and ranks, the gradient all-reduce, checkpoints, resume and the
adapter export. What differs:

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
from typing import Any

import torch

from training import checkpoints

from training.data import examples as data

from training.losses import dpo

from training.data import packing

from training.data import preference as preference_data

from training.recipes import reference
from training.model.chat import IGNORE_INDEX
from training.spec import resolve_hyperparameters
from training.recipes.sft import SFTTrainer
from training.data.preference import Pair

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


def pair_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Means over the pairs: loss, rewards/…, logps/… (TRL's names, so curves compare)."""
    s = dict(zip(SUM_FIELDS, sums.tolist(), strict=True))
    n = max(s["pairs"], 1.0)
    metrics = {name: s[name] / n for name in SUM_FIELDS[:6]}
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


class DPOTrainer(SFTTrainer):
    """One worker's share of a DPO run (see the module docstring)."""

    looks_ahead = False  # its step scores pairs with the whole decoder (``score``)

    # -- data ----------------------------------------------------------------------------------

    def setup_data(self) -> None:
        spec = self.spec
        splits = {"train": [f for f, _ in spec.training_files]}
        if spec.validation_file:
            splits["valid"] = [spec.validation_file]
        self.split_files = splits
        self.stats: dict[str, data.SplitStats] = {}
        if self.rank == 0:
            for split, file_ids in splits.items():
                self.stats[split] = self.prepare_split(split, file_ids)
        if self.world_size > 1:
            torch.distributed.barrier()  # the others wait for the stored tokenised splits
        loaded: dict[str, tuple[list[Pair], list[int]]] = {}
        for split in splits:
            prefix = data.split_prefix(spec.job_id, split)
            if self.rank != 0:
                self.stats[split] = data.read_stats(self.storage, prefix)
            folder = checkpoints.local_dir(spec.job_id, self.rank, f"data-{split}")
            loaded[split] = preference_data.load_pairs(self.storage, prefix, folder)
        self.train_examples, self.train_sources = loaded["train"]
        self.weights = [w for _, w in spec.training_files]
        self.valid_examples = loaded["valid"][0] if "valid" in loaded else []

    def prepare_split(self, split: str, file_ids: list[str]) -> data.SplitStats:
        """Rank 0: tokenise and store a split of pairs, or reuse the stored one (a resume)."""
        spec, template = self.spec, self.fingerprint["template_hash"]
        prefix = data.split_prefix(spec.job_id, split)
        stored = data.read_stats(self.storage, prefix)
        if stored is not None and stored.fingerprint == preference_data.fingerprint(
                file_ids, template, spec.max_length):
            return stored
        dataset, stats = preference_data.build_split(self.storage, self.tokenizer, file_ids,
                                                     spec.max_length, template)
        data.write_split(self.storage, prefix, dataset, stats)
        dropped = stats.n_rejected + stats.n_truncated
        self.emit(f"{split} data: {stats.n_examples} preference pairs, {stats.n_tokens} tokens "
                  f"({stats.n_supervised} in responses); dropped {dropped} ({stats.n_rejected} "
                  f"with no derivable response mask, {stats.n_truncated} longer than "
                  f"max_length={spec.max_length})", level="warn" if dropped else "info",
                  data={"split": split, **{k: v for k, v in stats.__dict__.items()
                                           if k not in ("file_hashes", "fingerprint")}})
        return stats

    def resolve_hyperparameters(self):
        n_seen = packing.epoch_length(self.train_sources, self.weights)
        mean_tokens = sum(p.n_tokens for p in self.train_examples) / len(self.train_examples)
        hp = resolve_hyperparameters(self.spec, n_seen, round(n_seen * mean_tokens))
        self.steps_per_epoch = packing.steps_per_epoch(n_seen, hp.batch_size)
        self.total_steps = self.steps_per_epoch * hp.n_epochs
        return hp

    def batches(self, pairs: list[Pair]) -> list[dict[str, torch.Tensor]]:  # type: ignore[override]
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
        flat = self.all_reduce(torch.cat([local.chosen, local.rejected]))  # [3] assemble
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

    def train_step(self, pairs: list[Pair]) -> torch.Tensor:  # type: ignore[override]
        """Forward/backward over this rank's pairs; all-reduce; one optimizer step.

        Each micro-batch's loss is its sum over pairs divided by the pairs of the global batch,
        so the summed gradients are those of the global mean whatever the split.
        """
        micro = self.batches(pairs)
        global_pairs = int(self.all_reduce(torch.tensor([float(len(pairs))])).item())
        sums = torch.zeros(len(SUM_FIELDS))
        for batch in micro:
            out, chosen, rejected = self.batch_loss(batch)
            (out.losses.sum() / max(global_pairs, 1)).backward()
            sums += batch_sums(batch, out, chosen, rejected)
        sums = self.all_reduce_grads(sums)  # [3]
        self.step_optimizer()
        return sums

    def step_metrics(self, sums: torch.Tensor, seconds: float, epoch: int) -> dict[str, Any]:
        s = dict(zip(SUM_FIELDS, sums.tolist(), strict=True))
        state = self.state
        state.trained_tokens += int(s["tokens"])
        state.supervised_tokens += int(s["supervised"])
        metrics = pair_metrics(sums)
        return {"step": state.step, "epoch": epoch + 1, "train_loss": metrics.pop("loss"),
                **metrics, "learning_rate": self.step_lr, "pairs_per_second": s["pairs"] / seconds,
                "tokens_per_second": s["tokens"] / seconds, "grad_norm": self.grad_norm,
                "step_seconds": seconds, "trained_tokens": state.trained_tokens}

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, pairs: list[Pair], max_batches: int | None = None  # type: ignore[override]
                 ) -> dict[str, float]:
        """DPO metrics over ``pairs`` (sharded over ranks), in eval mode."""
        self.model.eval()
        sums = torch.zeros(len(SUM_FIELDS))
        for batch in self.batches(pairs[self.rank::self.world_size])[:max_batches]:
            out, chosen, rejected = self.batch_loss(batch)
            sums += batch_sums(batch, out, chosen, rejected)
        self.model.train()
        return pair_metrics(self.all_reduce(sums))

    def valid_metrics(self, examples: list, prefix: str) -> dict[str, float]:
        # The final full validation often scores exactly what the last checkpoint scored (a
        # small validation file, same step, same weights): reuse that instead of a second pass.
        key = (self.state.step, len(examples))
        if getattr(self, "_last_validation", (None, None))[0] != key:
            self._last_validation = (key, self.evaluate(examples))
        return {f"{prefix}{name}": value for name, value in self._last_validation[1].items()}

    def verify_settings(self) -> None:
        """Score two micro-batches before step 1; at a fresh start the loss is ln 2."""
        pairs = self.valid_examples or self.train_examples
        metrics = self.evaluate(pairs[:2 * self.world_size * self.spec.micro_batch_size],
                                max_batches=2)
        if not math.isfinite(metrics["loss"]):
            raise RuntimeError(f"the DPO loss before training is {metrics['loss']}: check the "
                               "model and the data")
        rpo = (f" + rpo_alpha {self.spec.rpo_alpha} × the chosen answers' token NLL"
               if self.spec.rpo_alpha else "")
        self.emit(f"Verified settings: DPO loss before training={metrics['loss']:.4f} (ln 2 = "
                  f"{math.log(2):.4f} while the policy equals the reference{rpo}), beta="
                  f"{self.spec.beta}, {self.total_steps} steps ({self.hp.n_epochs} epochs × "
                  f"{self.steps_per_epoch} steps of {self.hp.batch_size} pairs)",
                  data={"initial_loss": metrics["loss"], "initial_metrics": metrics,
                        "total_steps": self.total_steps, "hyperparameters": self.hp.as_dict(),
                        "beta": self.spec.beta, "rpo_alpha": self.spec.rpo_alpha})

    def manifest(self) -> dict[str, Any]:
        spec = self.spec
        return {**super().manifest(), "dpo": {
            "beta": spec.beta, "loss": spec.dpo_loss, "label_smoothing": spec.label_smoothing,
            "rpo_alpha": spec.rpo_alpha,
            "init_adapter": spec.init_adapter, "reference_adapter": spec.reference_adapter,
            "reference_cache": self.reference_cache}}
