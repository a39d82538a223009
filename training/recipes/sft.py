"""Supervised fine-tuning: the loss on the response tokens only, normalised over the step.

The shared machinery (data plan, optimizer, all-reduce, checkpoints, export) is the base
recipe's (``training.recipes.base.Recipe``). What is SFT's own:

- data: conversations tokenised with their response masks (``training.data.examples``);
- the step: each micro-batch's summed token loss divided by the supervised tokens of the whole
  global step (``training.losses.cross_entropy``), so long and short responses weigh by their
  tokens however the step is split into micro-batches and ranks;
- on a CPU, the frozen lower layers of the next step run ahead on a thread of their own
  (``training.cpu.lookahead``, where the device strategy offers it);
- metrics: loss and mean token accuracy, supervised tokens per second.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ClassVar

import torch

from training.cpu.lookahead import Lookahead
from training.data import examples as data
from training.data import packing
from training.losses.cross_entropy import (
    TokenSums,
    masked_token_sums,
    normalised_loss,
    supervised_count,
)
from training.recipes.base import Recipe


class SFTRecipe(Recipe[packing.Example]):
    """One worker's share of a supervised fine-tuning run."""

    noun = "examples"
    SUMS: ClassVar[tuple[str, ...]] = ("loss", "correct", "supervised", "tokens")

    lookahead: Lookahead | None = None

    # -- data ----------------------------------------------------------------------------------

    def split_fingerprint(self, file_ids: list[str]) -> str:
        return data.fingerprint(file_ids, self.fingerprint["template_hash"], self.spec.max_length)

    def build_split(self, file_ids: list[str]) -> tuple[Any, data.SplitStats]:
        return data.build_split(self.storage, self.tokenizer, file_ids, self.spec.max_length,
                                self.fingerprint["template_hash"])

    def load_split(self, prefix: str, folder: Path) -> tuple[list[packing.Example], list[int]]:
        ids, labels, sources = data.load_split(self.storage, prefix, folder)
        return list(zip(ids, labels, strict=True)), sources

    def example_tokens(self, example: packing.Example) -> int:
        return len(example[0])

    def batches(self, examples: list[packing.Example]) -> list[dict[str, torch.Tensor]]:
        return packing.micro_batches(examples, packing=self.spec.packing,
                                     pack_length=self.spec.pack_length,
                                     micro_batch_size=self.spec.micro_batch_size,
                                     pad_id=self.tokenizer.pad_token_id or 0,
                                     share_prefix=self.share_prefix)

    # -- the model -------------------------------------------------------------------------------

    def setup_model(self, model_dir: Path) -> None:
        super().setup_model(model_dir)
        # Activation checkpointing trades speed for memory: it gets no lookahead.
        if not self.spec.activation_checkpointing and not self.sharded:
            self.lookahead = self.device_strategy.lookahead(self.decoder, self.use_bf16,
                                                            self.threads)

    def worker_note(self) -> str:
        if self.lookahead is None:
            return ""
        return (f" (one runs the {len(self.lookahead.lower.layers)} frozen layers of the next "
                "step ahead)")

    # -- the step --------------------------------------------------------------------------------

    def step_at(self, order: list[int], step_in_epoch: int) -> torch.Tensor:
        """``train_step`` on this rank's share of a step of the epoch ``order``, the next step's
        frozen layers started ahead (``Lookahead``) where they apply."""
        if self.lookahead is not None and step_in_epoch + 1 < self.steps_per_epoch:
            upcoming = self.step_examples(order, step_in_epoch + 1)
            self.lookahead.submit(upcoming, self.batches(upcoming))
        return self.train_step(self.step_examples(order, step_in_epoch))

    def forward_sums(self, batch: dict[str, torch.Tensor], below: Future | None = None
                     ) -> TokenSums:
        """Token sums of ``batch``; ``below``: its frozen layers' output, looked ahead."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            if below is not None:
                hidden = self.lookahead.upper_hidden(below, batch, labels)
            else:
                hidden = self.decoder(**batch, use_cache=False).last_hidden_state
            return masked_token_sums(hidden, labels, self.lm_head, self.softcap)

    def forward_backward(self, examples: list[packing.Example]) -> torch.Tensor:
        """Each micro-batch's token loss divided by the supervised tokens of the global step."""
        ahead = self.lookahead.take(examples) if self.lookahead is not None else None
        micro, below = ahead or (self.even_batches(self.batches(examples)), None)
        local = torch.tensor([float(sum(supervised_count(b["labels"]) for b in micro))])
        global_count = int(self.all_reduce(local).item())
        sums = torch.zeros(len(self.SUMS))
        for i, batch in enumerate(micro):
            # The first forward shares the CPUs with the next step's frozen layers.
            with (self.lookahead.sharing_threads() if below and i == 0
                  else contextlib.nullcontext()):
                token_sums = self.forward_sums(batch, below[i] if below else None)
            normalised_loss(token_sums, global_count).backward()
            sums[:3] += torch.tensor([token_sums.loss.item(), token_sums.correct, token_sums.count])
        # Trained tokens are the examples' own (what the caller sent), however they were batched.
        sums[3] = float(sum(len(ids) for ids, _ in examples))
        return sums

    # -- metrics ---------------------------------------------------------------------------------

    def train_metrics(self, sums: dict[str, float], seconds: float) -> dict[str, float]:
        count = max(sums["supervised"], 1)
        return {"train_loss": sums["loss"] / count,
                "train_mean_token_accuracy": sums["correct"] / count,
                "supervised_tokens": int(sums["supervised"]),
                "supervised_tokens_per_second": sums["supervised"] / seconds}

    def eval_sums(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        s = self.forward_sums(batch)
        tokens = (batch["attention_mask"].sum() if "attention_mask" in batch
                  else batch["input_ids"].numel())
        return torch.tensor([s.loss.item(), float(s.correct), float(s.count), float(tokens)])

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        count = max(sums["supervised"], 1)
        return {"loss": sums["loss"] / count, "mean_token_accuracy": sums["correct"] / count}

    def cleanup(self) -> None:
        if self.lookahead is not None:
            self.lookahead.close()
        super().cleanup()
