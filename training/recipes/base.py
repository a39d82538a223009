"""The recipe every training method shares: ``setup`` → ``train`` → ``cleanup``.

A recipe is one worker's share of a run. This class holds what every method does alike: the
data plan over seeds, epochs and ranks (``training.data.packing``: a pure function of the seed,
the epoch and the step, so the step is the data position), the learning-rate schedule and the
optimizer, the gradient all-reduce, validation, checkpoints and resume, the adapter exports
and the job's events. A method (``training.recipes.sft``, ``training.recipes.dpo``) is a
subclass that fills in the hooks:

- data: ``split_fingerprint``, ``build_split`` (rank 0 tokenises), ``load_split``,
  ``example_tokens``, ``batches`` (collate a step's examples into micro-batches);
- the step: ``forward_backward`` (this rank's micro-batches, returning the sums ``SUMS``);
- metrics: ``train_metrics`` (from the step's global sums), ``eval_sums`` and ``eval_metrics``;
- export: ``manifest`` (what the adapter's manifest records beyond the shared fields).

A recipe needs no Ray: ``WorkerContext()`` (``training.recipes.context``) runs it as rank 0 of 1
in this process. Ray Train is one launcher (``training.worker``), which hands it the rank, the
world size, the device, a report function and whether it is asked to stop. Checkpoints (when,
the background upload, resuming from the newest complete one) are ``training.recipes.
checkpointing``'s. What only pays on a CPU comes in a ``DeviceStrategy``
(``training.cpu.strategy``), picked from the device.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
import torch.distributed as dist

from service.core.errors import InvalidRequest
from service.core.events import EventLog
from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from training import checkpoints, sharding
from training.cpu.strategy import DeviceStrategy, strategy_for
from training.data import examples as data
from training.data import packing
from training.model import chat, registry
from training.model.adapter import (
    MANIFEST,
    adapter_prefix,
    build_manifest,
    export_adapter,
    export_model,
    lora_settings,
)
from training.model.attention import shares_prefixes, use_packed_attention
from training.model.lora import apply_adapter, default_target_modules
from training.recipes.checkpointing import Checkpointing
from training.recipes.context import WorkerContext
from training.spec import (
    MIN_LR_FRACTION,
    WARMUP_FRACTION,
    Hyperparameters,
    TrainSpec,
    resolve_hyperparameters,
)

log = logging.getLogger(__name__)

VALID_EXAMPLES = 64
"""Validation examples scored at each checkpoint (all of them once, at the end)."""

E = TypeVar("E")
"""What a method trains on: an SFT example, a preference pair."""


def lr_lambda(total_steps: int):
    """Linear warmup over 5% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class Recipe(ABC, Generic[E]):
    """One worker's share of a training run (see the module docstring)."""

    noun: ClassVar[str]
    """What the method trains on, in messages: "examples", "preference pairs"."""
    SUMS: ClassVar[tuple[str, ...]]
    """What ``forward_backward`` sums over a step (all-reduced over ranks); among them "tokens"
    (trained) and "supervised" (trained on)."""
    validates_at_checkpoints: ClassVar[bool] = True
    """Whether each checkpoint scores ``VALID_EXAMPLES`` validation examples (a recipe that
    validates on a schedule of its own says no)."""

    def __init__(self, spec: TrainSpec, storage_config: StorageConfig,
                 context: WorkerContext | None = None,
                 device_strategy: DeviceStrategy | None = None):
        self.spec = spec
        self.storage = open_storage(storage_config)
        self.context = context or WorkerContext()
        self.rank, self.world_size = self.context.rank, self.context.world_size
        self.device = self.context.device
        self.device_strategy = device_strategy or strategy_for(self.device)
        self.events = EventLog(self.storage, spec.job_id) if self.rank == 0 else None
        self.resumed_from: int | None = None
        self.stopping = False
        """Set after a step at which some rank was asked to stop: checkpoint, then end."""
        self.sharded = spec.parallelism == "fsdp" and self.world_size > 1
        """FSDP (``training.sharding``): each rank holds a shard of the model."""
        self._last_validation: tuple[tuple[int, int], dict[str, float]] | None = None

    # -- hooks ---------------------------------------------------------------------------------

    @abstractmethod
    def split_fingerprint(self, file_ids: list[str]) -> str:
        """What a stored split of ``file_ids`` must carry to be reused (a resumed run)."""

    @abstractmethod
    def build_split(self, file_ids: list[str]) -> tuple[Any, data.SplitStats]:
        """Rank 0: read and tokenise the files of a split (a dataset ``data.write_split`` stores)."""

    @abstractmethod
    def load_split(self, prefix: str, folder: Path) -> tuple[list[E], list[int]]:
        """A stored split, downloaded into ``folder``: its items and each one's source file."""

    @abstractmethod
    def example_tokens(self, example: E) -> int:
        """The tokens of one item (for the "auto" hyperparameters)."""

    @abstractmethod
    def batches(self, examples: list[E]) -> list[dict[str, torch.Tensor]]:
        """Collate ``examples`` into micro-batches."""

    @abstractmethod
    def forward_backward(self, examples: list[E]) -> torch.Tensor:
        """Forward and backward over this rank's share of a step; its sums (``SUMS``)."""

    @abstractmethod
    def train_metrics(self, sums: dict[str, float], seconds: float) -> dict[str, float]:
        """The method's metrics of a step from its global sums (``train_loss`` among them)."""

    @abstractmethod
    def eval_sums(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The sums (``SUMS``) of a micro-batch, scored without gradients."""

    @abstractmethod
    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Means from evaluation's global sums; ``loss`` among them."""

    def settings_note(self) -> tuple[str, dict[str, Any]]:
        """Words and data the "Verified settings" event adds after the initial loss."""
        return "", {}

    def worker_note(self) -> str:
        """Words the worker's first event adds after its thread count."""
        return ""

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        spec = self.spec
        self.threads = self.device_strategy.set_threads(spec.cpus_per_worker)
        random.seed(spec.seed + self.rank)
        torch.manual_seed(spec.seed)  # same init everywhere (LoRA B is zero anyway)
        self.use_bf16 = spec.bf16 and self.device_strategy.bf16_fast(self.device)
        model_dir = registry.resolve_model(spec.base_model, self.storage)
        self.tokenizer = registry.load_tokenizer(model_dir)
        self.fingerprint = registry.model_fingerprint(model_dir)
        self.setup_data()
        self.hp = self.resolve_hyperparameters()
        self.setup_model(model_dir)
        self.setup_optimizer()
        self.checkpointing = Checkpointing(self.storage, spec.job_id, self.rank,
                                           self.world_size, spec.checkpoint_every_seconds,
                                           self.emit)
        state = self.checkpointing.restore(self.model, self.optimizer, self.scheduler)
        if state is None:
            state = checkpoints.TrainState(hyperparameters=self.hp.as_dict())
        else:
            self.resumed_from = state.step
        self.state = state
        self.emit(f"Worker {self.rank}/{self.world_size}: {self.threads} torch threads"
                  f"{self.worker_note()}, bf16={'on' if self.use_bf16 else 'off'}, "
                  f"device={self.device}")
        self.verify_settings()

    def setup_data(self) -> None:
        spec = self.spec
        splits = {"train": [f for f, _ in spec.training_files]}
        if spec.validation_file:
            splits["valid"] = [spec.validation_file]
        self.stats: dict[str, data.SplitStats] = {}
        if self.rank == 0:
            for split, file_ids in splits.items():
                self.stats[split] = self.prepare_split(split, file_ids)
        if self.world_size > 1:
            dist.barrier()  # the others wait until rank 0 has stored the tokenised splits
        loaded: dict[str, tuple[list[E], list[int]]] = {}
        for split in splits:
            prefix = data.split_prefix(spec.job_id, split)
            if self.rank != 0:
                self.stats[split] = data.read_stats(self.storage, prefix)
            folder = checkpoints.local_dir(spec.job_id, self.rank, f"data-{split}")
            loaded[split] = self.load_split(prefix, folder)
        self.train_examples, self.train_sources = loaded["train"]
        self.weights = [w for _, w in spec.training_files]
        self.valid_examples: list[E] = loaded["valid"][0] if "valid" in loaded else []

    def prepare_split(self, split: str, file_ids: list[str]) -> data.SplitStats:
        """Rank 0: tokenise and store a split, or reuse the stored one (a resumed run)."""
        prefix = data.split_prefix(self.spec.job_id, split)
        stored = data.read_stats(self.storage, prefix)
        if stored is not None and stored.fingerprint == self.split_fingerprint(file_ids):
            return stored
        dataset, stats = self.build_split(file_ids)
        data.write_split(self.storage, prefix, dataset, stats)
        dropped = stats.n_rejected + stats.n_truncated
        self.emit(f"{split} data: {stats.n_examples} {self.noun}, {stats.n_tokens} tokens "
                  f"({stats.n_supervised} supervised); dropped {dropped} "
                  f"({stats.n_rejected} with no derivable response mask, {stats.n_truncated} "
                  f"longer than max_length={self.spec.max_length})",
                  level="warn" if dropped else "info",
                  data={"split": split, **{k: v for k, v in stats.__dict__.items()
                                           if k not in ("file_hashes", "fingerprint")}})
        return stats

    def resolve_hyperparameters(self) -> Hyperparameters:
        n_seen = packing.epoch_length(self.train_sources, self.weights)
        mean_tokens = (sum(self.example_tokens(e) for e in self.train_examples)
                       / len(self.train_examples))
        hp = resolve_hyperparameters(self.spec, n_seen, round(n_seen * mean_tokens))
        self.steps_per_epoch = packing.steps_per_epoch(n_seen, hp.batch_size)
        self.total_steps = self.steps_per_epoch * hp.n_epochs
        return hp

    def setup_model(self, model_dir: Path) -> None:
        """The model to train: a new LoRA adapter (or all weights), or, continuing from a tuned
        model (``spec.init_adapter``), that adapter with its shape and weights."""
        self.init_dir = self.fetch_adapter(self.spec.init_adapter, "init-adapter")
        if self.init_dir is not None:
            self.spec = replace(self.spec, **lora_settings(self.init_dir))
        model = registry.load_model(model_dir, torch.float32, attn_implementation="sdpa")
        use_packed_attention(model)
        self.device_strategy.prepare_model(model)
        self.share_prefix = shares_prefixes(model)
        self.target_modules = ([] if self.spec.full_finetune else
                               list(self.spec.target_modules or default_target_modules(model)))
        # Sharded, the mixed-precision policy casts the weights it gathers (one dtype per unit).
        frozen = torch.bfloat16 if self.use_bf16 and not self.sharded else None
        self.model = apply_adapter(model, self.spec, frozen_dtype=frozen)
        registry.own_weights(self.model, torch.float32)
        if not self.sharded:
            self.model = self.model.to(self.device)
        self.model.train()
        causal_lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else model
        self.decoder = causal_lm.base_model  # the transformer body, without the output head
        self.lm_head = causal_lm.get_output_embeddings()
        self.softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
        if self.spec.activation_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad (frozen embeddings).
            causal_lm.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.init_dir is not None:
            checkpoints.load_weights(self.model, self.init_dir)
            self.emit(f"Starting from the adapter {self.spec.init_adapter}")
        if self.sharded:  # after the weights are final: each rank keeps its shard, on the device
            self.decoder = sharding.shard_model(self.model, self.decoder, self.device,
                                                self.use_bf16)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def fetch_adapter(self, prefix: str | None, name: str) -> Path | None:
        """Download a committed LoRA adapter of this base model from storage."""
        if prefix is None:
            return None
        if not self.storage.exists(f"{prefix}/{MANIFEST}"):
            raise InvalidRequest(f"the adapter {prefix} is missing or incomplete",
                                 param="model", code="model_not_available")
        folder = checkpoints.local_dir(self.spec.job_id, self.rank, name)
        self.storage.download_prefix(prefix, str(folder))
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("base_weights_hash") != self.fingerprint["base_weights_hash"]:
            raise InvalidRequest(f"the adapter {prefix} was trained on other base weights",
                                 param="model", code="model_not_available")
        if not (folder / "adapter_config.json").exists():
            raise InvalidRequest(f"{prefix} is a fully fine-tuned model; training continues from "
                                 "a LoRA adapter only", param="model")
        return folder

    def setup_optimizer(self) -> None:
        # fused: one kernel over all the adapter's tensors instead of ~10 ops per tensor
        # (49 → 13 ms per step for SmolLM2's 420 LoRA tensors on CPU); same update.
        self.optimizer = torch.optim.AdamW(self.params, lr=self.hp.learning_rate,
                                           weight_decay=self.spec.weight_decay, betas=(0.9, 0.999),
                                           fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda(self.total_steps))

    def verify_settings(self) -> None:
        """Score two micro-batches before step 1, so a broken setup fails in seconds."""
        examples = self.valid_examples or self.train_examples
        enough = 2 * self.world_size * self.spec.micro_batch_size
        metrics = self.evaluate(examples[:enough], max_batches=2)
        if not math.isfinite(metrics["loss"]):
            raise RuntimeError(f"the loss before training is {metrics['loss']}: check the model "
                               "and the data (bf16 overflow? empty responses?)")
        note, extra = self.settings_note()
        self.emit(f"Verified settings: loss before training={metrics['loss']:.4f}{note}, "
                  f"{self.total_steps} steps ({self.hp.n_epochs} epochs × "
                  f"{self.steps_per_epoch} steps of {self.hp.batch_size} {self.noun})",
                  data={"initial_loss": metrics["loss"], "initial_metrics": metrics,
                        "total_steps": self.total_steps, "hyperparameters": self.hp.as_dict(),
                        **extra})

    # -- train ---------------------------------------------------------------------------------

    def train(self) -> None:
        order_epoch, order = -1, []
        while self.state.step < self.total_steps:
            epoch, step_in_epoch = divmod(self.state.step, self.steps_per_epoch)
            if epoch != order_epoch:
                order_epoch = epoch
                order = packing.epoch_order(self.train_sources, self.weights, self.spec.seed,
                                            epoch)
            started = time.perf_counter()
            with self.memory_probe():
                sums = self.step_at(order, step_in_epoch)
            self.after_step(sums, time.perf_counter() - started, epoch)
            if self.stopping:
                self.emit(f"Stopped at step {self.state.step} on a preemption notice; the run "
                          "resumes from its checkpoint there", level="warn",
                          data={"preempted_at_step": self.state.step})
                return
        self.checkpointing.wait()  # the last checkpoint is stored before the final adapter
        self.finish()

    def step_at(self, order: list[int], step_in_epoch: int) -> torch.Tensor:
        """``train_step`` on this rank's share of a step of the epoch ``order``."""
        return self.train_step(self.step_examples(order, step_in_epoch))

    def step_examples(self, order: list[int], step_in_epoch: int) -> list[E]:
        share = packing.rank_share(order, step_in_epoch, self.hp.batch_size, self.rank,
                                   self.world_size)
        return [self.train_examples[i] for i in share]

    def train_step(self, examples: list[E]) -> torch.Tensor:
        """Forward/backward over this rank's share of a step; all-reduce; one optimizer step.

        Returns the global sums (``SUMS``) of the step. The run's two flags ride on the same
        all-reduce, so every rank acts on them at the same step: some rank is asked to stop,
        and rank 0's clock says a checkpoint is due (``checkpoint_every_seconds``).
        """
        sums = self.forward_backward(examples)
        flags = torch.tensor([float(self.context.stop_requested()),
                              float(self.checkpointing.due())])
        reduced = self.all_reduce_grads(torch.cat([sums.float(), flags]))
        self.step_optimizer()
        self.stop_flag, self.due_flag = bool(reduced[-2] > 0), bool(reduced[-1] > 0)
        return reduced[:-2]

    def step_optimizer(self) -> None:
        """Clip the (already all-reduced) gradients, step, advance the schedule."""
        self.grad_norm = sharding.clip_grad_norm(self.params, self.spec.max_grad_norm)
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_reduce_grads(self, extra: torch.Tensor) -> torch.Tensor:
        """Sum the gradients (and ``extra``) over ranks in one flat all-reduce.

        A method divides its loss by a global count (tokens, pairs), so the *sum* of the ranks'
        gradients is the gradient of the global mean. Done by hand rather than with DDP: a rank
        can have no example in the last batch of an epoch (it contributes zeros), and one
        reduction per optimizer step is all gradient accumulation needs.
        """
        if self.world_size == 1:
            return extra
        if self.sharded:  # FSDP has summed the gradients into each rank's shard already
            return self.all_reduce(extra.clone())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [extra.to(self.device)])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(self.params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
        return flat[offset:].cpu()

    def even_batches(self, batches: list[dict[str, torch.Tensor]]
                     ) -> list[dict[str, torch.Tensor]]:
        """``batches``, and under FSDP empty ones up to the most any rank has."""
        if not self.sharded:
            return batches
        return sharding.even_batches(batches, self.batches(self.train_examples[:1])[0])

    def after_step(self, sums: torch.Tensor, seconds: float, epoch: int) -> None:
        state = self.state
        state.step += 1
        state.metrics = self.step_metrics(sums, seconds, epoch)
        if self._memory_note is None:
            self.note_memory()
        epoch_end = state.step % self.steps_per_epoch == 0
        every = self.spec.checkpoint_every_steps
        self.stopping = self.stop_flag and state.step < self.total_steps
        if epoch_end or (every and state.step % every == 0) or self.due_flag or self.stopping:
            if self.valid_examples and not self.stopping and self.validates_at_checkpoints:
                state.metrics.update(self.valid_metrics(self.valid_examples[:VALID_EXAMPLES],
                                                        "valid_"))
            self.log_metrics()
            self.save_checkpoint()
        else:
            self.log_metrics()

    def step_metrics(self, sums: torch.Tensor, seconds: float, epoch: int) -> dict[str, Any]:
        """The metrics of the step just done (``state.step``) from its global sums."""
        s = dict(zip(self.SUMS, sums.tolist(), strict=True))
        state = self.state
        state.trained_tokens += int(s["tokens"])
        state.supervised_tokens += int(s["supervised"])
        return {"step": state.step, "epoch": epoch + 1, **self.train_metrics(s, seconds),
                "learning_rate": self.step_lr, "tokens_per_second": s["tokens"] / seconds,
                "grad_norm": self.grad_norm, "step_seconds": seconds,
                "trained_tokens": state.trained_tokens}

    _memory_note: dict[str, int] | None = None

    @contextlib.contextmanager
    def memory_probe(self):
        """With ``spec.extra["measure_memory"]``, the second step's peak tensor memory on this
        rank (``training.memory``), said in an event: what the estimate is checked against."""
        if not self.spec.extra.get("measure_memory") or self.state.step != 1:
            yield
            return
        from training import memory
        from training.losses.cross_entropy import _SCRATCH

        held = [*self.model.parameters(), *self.model.buffers(),
                *(v for s in self.optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor)),
                *getattr(_SCRATCH, "buffers", {}).values()]
        with memory.peak_bytes(memory.tensor_bytes(held)) as measured:
            yield
        self.emit(f"Measured peak tensor memory of step 2 on worker {self.rank}: "
                  f"{measured['peak'] / 2**20:.1f} MiB",
                  data={"peak_bytes": measured["peak"], "held_bytes": measured["held_before"]})

    def note_memory(self) -> None:
        """Once, after the first step (the optimizer state exists): what this rank holds."""
        held = sharding.state_bytes(self.params, list(self.model.parameters()), self.optimizer)
        self._memory_note = held
        mib = {k: v / 2**20 for k, v in held.items()}
        self.emit(f"Worker {self.rank}/{self.world_size} ({self.spec.parallelism}) holds "
                  f"{mib['weights']:.1f} MiB of weights, {mib['gradients']:.1f} MiB of "
                  f"gradients, {mib['optimizer']:.1f} MiB of optimizer state",
                  data={"state_bytes": held, "parallelism": self.spec.parallelism})

    def log_metrics(self) -> None:
        if self.events is not None:
            self.events.metrics(self.state.metrics, self.total_steps)

    # -- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, examples: list[E], max_batches: int | None = None) -> dict[str, float]:
        """``eval_metrics`` over ``examples`` (sharded over ranks), in eval mode."""
        self.model.eval()
        sums = torch.zeros(len(self.SUMS))
        for batch in self.even_batches(
                self.batches(examples[self.rank::self.world_size])[:max_batches]):
            sums += self.eval_sums(batch)
        self.model.train()
        return self.eval_metrics(dict(zip(self.SUMS, self.all_reduce(sums).tolist(), strict=True)))

    def valid_metrics(self, examples: list[E], prefix: str) -> dict[str, float]:
        """``evaluate``'s metrics over ``examples``, each name with ``prefix``."""
        # The final full validation often scores exactly what the last checkpoint scored (a
        # small validation file, same step, same weights): reuse that instead of a second pass.
        key = (self.state.step, len(examples))
        if self._last_validation is None or self._last_validation[0] != key:
            self._last_validation = (key, self.evaluate(examples))
        return {f"{prefix}{name}": value for name, value in self._last_validation[1].items()}

    # -- checkpoints and the result --------------------------------------------------------------

    def save_checkpoint(self) -> None:
        manifest = self.manifest() if self.rank == 0 else None

        def stored(weights_dir: Path, step: int) -> None:  # rank 0, in the upload thread
            export_adapter(self.storage, weights_dir, adapter_prefix(self.spec.job_id, step),
                           manifest)
            self.emit(f"Checkpoint saved at step {step}", data={"step": step})

        self.checkpointing.save(self.state, self.model, self.optimizer, self.scheduler, stored,
                                wait=self.stopping)
        self.context.report({**self.report_metrics(), "preempted": self.stopping})

    def report_metrics(self) -> dict[str, Any]:
        return {**self.state.metrics, "total_steps": self.total_steps,
                "resumed_from_step": self.resumed_from,
                "supervised_tokens_total": self.state.supervised_tokens}

    def manifest(self) -> dict[str, Any]:
        return build_manifest(
            self.spec, fingerprint=self.fingerprint,
            eot_token_ids=chat.end_of_turn_ids(self.tokenizer), target_modules=self.target_modules,
            data_hashes=self.data_hashes(), hyperparameters=self.hp, metrics=self.state.metrics,
            step=self.state.step)

    def data_hashes(self) -> dict[str, str]:
        hashes: dict[str, str] = {}
        for stats in self.stats.values():
            hashes.update(stats.file_hashes)
        return hashes

    def finish(self) -> None:
        """After the last step: full validation, then the final adapter (manifest last)."""
        if self.valid_examples:
            self.state.metrics.update(self.valid_metrics(self.valid_examples, "full_valid_"))
        if self.sharded:  # every rank gathers; rank 0 writes the same files as unsharded
            folder = checkpoints.local_dir(self.spec.job_id, self.rank, "export")
            sharding.save_full(self.model, folder, self.rank)
            if self.rank == 0:
                export_adapter(self.storage, folder, adapter_prefix(self.spec.job_id),
                               self.manifest())
        elif self.rank == 0:
            export_model(self.storage, self.model, adapter_prefix(self.spec.job_id),
                         self.manifest())
        if self.rank == 0:
            self.emit(f"Final adapter written to {adapter_prefix(self.spec.job_id)}")

    def emit(self, message: str, level: str = "info", data: dict | None = None) -> None:
        log.info("rank %d: %s", self.rank, message)
        if self.events is not None:
            self.events.add(message, level=level, data=data)  # type: ignore[arg-type]

    def cleanup(self) -> None:
        if self.world_size > 1:
            dist.barrier()
        checkpoints.remove_local_dirs(self.spec.job_id, self.rank)
