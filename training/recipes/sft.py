"""The per-worker training loop (what each Ray Train worker runs), shaped like a recipe:
``setup`` → ``train`` → ``cleanup``, with the step as its own function.

Ray Train touch points, kept few and visible:
  [1] rank, world size and device   (``ray.train.get_context``, ``ray.train.torch.get_device``)
  [2] the data shard                (``training.data.packing.rank_share``; the plan needs no messages)
  [3] gradient all-reduce           (``torch.distributed``, the gloo/NCCL group Ray set up)
  [4] report metrics + checkpoint   (``training.checkpoints.report`` → ``ray.train.report``)
  [5] resume                        (``training.checkpoints.restore_checkpoint``)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from service.core.errors import InvalidRequest
from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from training import checkpoints
from training.model import chat
from training.data import examples as data
from training.model import registry
from training.data import packing
from training.model.adapter import (
    MANIFEST,
    adapter_prefix,
    build_manifest,
    export_adapter,
    export_model,
    lora_settings,
)
from training.model.attention import shares_prefixes, use_packed_attention
from training.spec import MIN_LR_FRACTION, WARMUP_FRACTION, TrainSpec, resolve_hyperparameters
from service.core.events import EventLog
from training.cpu.lookahead import Lookahead
from training.model.lora import apply_adapter, default_target_modules
from training.losses.cross_entropy import masked_token_sums, normalised_loss, supervised_count

log = logging.getLogger(__name__)

VALID_EXAMPLES = 64
"""Validation examples scored at each checkpoint (all of them once, at the end)."""


def train_loop_per_worker(config: dict[str, Any]) -> None:
    from service.core.logs import job_logging  # (imported here: the logging seam of this worker)

    spec: TrainSpec = config["spec"]
    with job_logging(spec.job_id):  # every line of this worker names its job
        trainer = trainer_class(spec.method)(spec, StorageConfig(**config["storage"]))
        trainer.setup()
        trainer.train()
        trainer.cleanup()


def trainer_class(method: str) -> type[SFTTrainer]:
    """The worker class of a training method (they share this loop; each has its own step)."""
    from training.recipes.dpo import DPOTrainer  # imports this module: resolved at call time

    return {"supervised": SFTTrainer, "dpo": DPOTrainer}[method]


def set_threads(n: int) -> int:
    """Make torch use exactly the ``n`` CPUs Ray gave this worker; return what it uses."""
    torch.set_num_threads(n)
    used = torch.get_num_threads()
    if used != n:
        raise RuntimeError(f"torch uses {used} threads, expected cpus_per_worker={n}")
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else n
    if available < n:
        log.warning("worker may run on %d CPUs only, but was given %d", available, n)
    return used


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # bf16 matmuls are fast only with AVX512-bf16 or AMX; elsewhere they are emulated
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lr_lambda(total_steps: int):
    """Linear warmup over 5% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class SFTTrainer:
    """One worker's share of a supervised fine-tuning run."""

    looks_ahead = True
    """Whether a CPU worker runs the frozen lower layers of the next step ahead (``Lookahead``)."""

    def __init__(self, spec: TrainSpec, storage_config: StorageConfig, *, in_ray: bool = True):
        """``in_ray=False`` builds a single-process trainer (rank 0 of 1, no checkpoints through
        Ray) for benchmarks and debugging; a run always goes through Ray Train."""
        self.spec = spec
        self.storage = open_storage(storage_config)
        self.in_ray = in_ray
        self.rank, self.world_size, self.device = 0, 1, torch.device("cpu")
        if in_ray:
            context = ray.train.get_context()  # [1]
            self.rank = context.get_world_rank()
            self.world_size = context.get_world_size()
            self.device = ray.train.torch.get_device()
        self.events = EventLog(self.storage, spec.job_id) if self.rank == 0 else None
        self.resumed_from: int | None = None

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        spec = self.spec
        threads = set_threads(spec.cpus_per_worker)
        random.seed(spec.seed + self.rank)
        torch.manual_seed(spec.seed)  # same init everywhere (LoRA B is zero anyway)
        self.use_bf16 = spec.bf16 and bf16_supported(self.device)
        model_dir = registry.resolve_model(spec.base_model, self.storage)
        self.tokenizer = registry.load_tokenizer(model_dir)
        self.fingerprint = registry.model_fingerprint(model_dir)
        self.setup_data()
        self.hp = self.resolve_hyperparameters()
        self.setup_model(model_dir)
        self.lookahead = self.setup_lookahead(threads)
        self.setup_optimizer()
        checkpoint = ray.train.get_checkpoint() if self.in_ray else None  # [5]
        self.state = checkpoints.restore_checkpoint(
            checkpoint, spec.job_id, self.rank, self.model, self.optimizer, self.scheduler)
        if self.state is None:
            self.state = checkpoints.TrainState(hyperparameters=self.hp.as_dict())
        else:
            self.resumed_from = self.state.step
            self.emit(f"Resumed from the checkpoint at step {self.state.step}",
                      data={"resumed_from_step": self.state.step})
        ahead = (f" (one runs the {len(self.lookahead.lower.layers)} frozen layers of the next "
                 "step ahead)" if self.lookahead is not None else "")
        self.emit(f"Worker {self.rank}/{self.world_size}: {threads} torch threads{ahead}, "
                  f"bf16={'on' if self.use_bf16 else 'off'}, device={self.device}")
        self.verify_settings()

    def setup_data(self) -> None:
        spec = self.spec
        splits = {"train": [f for f, _ in spec.training_files]}
        if spec.validation_file:
            splits["valid"] = [spec.validation_file]
        self.stats: dict[str, data.SplitStats] = {}
        loaded: dict[str, tuple] = {}
        if self.rank == 0:
            for split, file_ids in splits.items():
                self.stats[split] = self.prepare_split(split, file_ids)
        if self.world_size > 1:
            dist.barrier()  # the others wait until rank 0 has stored the tokenised splits
        for split in splits:
            prefix = data.split_prefix(spec.job_id, split)
            if self.rank != 0:
                self.stats[split] = data.read_stats(self.storage, prefix)
            folder = checkpoints.local_dir(spec.job_id, self.rank, f"data-{split}")
            loaded[split] = data.load_split(self.storage, prefix, folder)
        ids, labels, sources = loaded["train"]
        self.train_examples = list(zip(ids, labels))
        self.train_sources = sources
        self.weights = [w for _, w in spec.training_files]
        self.valid_examples = list(zip(*loaded["valid"][:2])) if "valid" in loaded else []

    def prepare_split(self, split: str, file_ids: list[str]) -> data.SplitStats:
        """Rank 0: tokenise and store a split, or reuse the stored one (a resumed run)."""
        prefix = data.split_prefix(self.spec.job_id, split)
        wanted = data.fingerprint(file_ids, self.fingerprint["template_hash"], self.spec.max_length)
        stored = data.read_stats(self.storage, prefix)
        if stored is not None and stored.fingerprint == wanted:
            return stored
        dataset, stats = data.build_split(self.storage, self.tokenizer, file_ids,
                                          self.spec.max_length, self.fingerprint["template_hash"])
        data.write_split(self.storage, prefix, dataset, stats)
        dropped = stats.n_rejected + stats.n_truncated
        self.emit(f"{split} data: {stats.n_examples} examples, {stats.n_tokens} tokens "
                  f"({stats.n_supervised} supervised); dropped {dropped} "
                  f"({stats.n_rejected} with no derivable response mask, {stats.n_truncated} "
                  f"longer than max_length={self.spec.max_length})",
                  level="warn" if dropped else "info",
                  data={"split": split, **{k: v for k, v in stats.__dict__.items()
                                           if k not in ("file_hashes", "fingerprint")}})
        return stats

    def resolve_hyperparameters(self):
        n_seen = packing.epoch_length(self.train_sources, self.weights)
        mean_tokens = sum(len(ids) for ids, _ in self.train_examples) / len(self.train_examples)
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
        self.share_prefix = shares_prefixes(model)
        self.target_modules = ([] if self.spec.full_finetune else
                               list(self.spec.target_modules or default_target_modules(model)))
        frozen = torch.bfloat16 if self.use_bf16 else None
        self.model = apply_adapter(model, self.spec, frozen_dtype=frozen)
        registry.own_weights(self.model, torch.float32)
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
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.init_dir is not None:
            checkpoints.load_weights(self.model, self.init_dir)
            self.emit(f"Starting from the adapter {self.spec.init_adapter}")

    def setup_lookahead(self, threads: int) -> Lookahead | None:
        """A ``Lookahead`` where it applies: each step's forward then lends it one of the
        worker's ``threads`` (``train_step``)."""
        n_frozen = Lookahead.usable(self.decoder, self.device, threads) if self.looks_ahead else 0
        if not n_frozen or self.spec.activation_checkpointing:  # (that trades speed for memory)
            return None
        return Lookahead(self.decoder, n_frozen, self.use_bf16, threads)

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
        self.emit(f"Verified settings: loss before training={metrics['loss']:.4f}, "
                  f"{self.total_steps} steps ({self.hp.n_epochs} epochs × "
                  f"{self.steps_per_epoch} steps of {self.hp.batch_size} examples)",
                  data={"initial_loss": metrics["loss"], "total_steps": self.total_steps,
                        "hyperparameters": self.hp.as_dict()})

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
            sums = self.step_at(order, step_in_epoch)
            self.after_step(sums, time.perf_counter() - started, epoch)
        self.finish()

    def step_at(self, order: list[int], step_in_epoch: int) -> torch.Tensor:
        """``train_step`` on this rank's share of a step of the epoch ``order``, the next step's
        frozen layers started ahead (``Lookahead``) where they apply."""
        if self.lookahead is not None and step_in_epoch + 1 < self.steps_per_epoch:
            upcoming = self.step_examples(order, step_in_epoch + 1)
            self.lookahead.submit(upcoming, self.batches(upcoming))
        return self.train_step(self.step_examples(order, step_in_epoch))

    def step_examples(self, order: list[int], step_in_epoch: int) -> list[packing.Example]:
        share = packing.rank_share(order, step_in_epoch, self.hp.batch_size, self.rank,
                                   self.world_size)  # [2]
        return [self.train_examples[i] for i in share]

    def batches(self, examples: list[packing.Example]) -> list[dict[str, torch.Tensor]]:
        return packing.micro_batches(examples, packing=self.spec.packing,
                                     pack_length=self.spec.pack_length,
                                     micro_batch_size=self.spec.micro_batch_size,
                                     pad_id=self.tokenizer.pad_token_id or 0,
                                     share_prefix=self.share_prefix)

    def forward_sums(self, batch: dict[str, torch.Tensor], below: Future | None = None):
        """Token sums of ``batch``; ``below``: its frozen layers' output, looked ahead."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            if below is not None:
                hidden = self.lookahead.upper_hidden(below, batch, labels)
            else:
                hidden = self.decoder(**batch, use_cache=False).last_hidden_state
            return masked_token_sums(hidden, labels, self.lm_head, self.softcap)

    def train_step(self, examples: list[packing.Example]) -> torch.Tensor:
        """Forward/backward over this rank's micro-batches; all-reduce; one optimizer step.

        Returns the global sums ``[loss, correct, supervised, tokens]`` of the step.
        """
        ahead = self.lookahead.take(examples) if self.lookahead is not None else None
        micro, below = ahead or (self.batches(examples), None)
        local = torch.tensor([float(sum(supervised_count(b["labels"]) for b in micro))])
        global_count = int(self.all_reduce(local).item())
        sums = torch.zeros(4)
        for i, batch in enumerate(micro):
            # The first forward shares the CPUs with the next step's frozen layers.
            with (self.lookahead.sharing_threads() if below and i == 0
                  else contextlib.nullcontext()):
                token_sums = self.forward_sums(batch, below[i] if below else None)
            normalised_loss(token_sums, global_count).backward()
            sums[:3] += torch.tensor([token_sums.loss.item(), token_sums.correct, token_sums.count])
        # Trained tokens are the examples' own (what the caller sent), however they were batched.
        sums[3] = float(sum(len(ids) for ids, _ in examples))
        sums = self.all_reduce_grads(sums)  # [3]
        self.step_optimizer()
        return sums

    def step_optimizer(self) -> None:
        """Clip the (already all-reduced) gradients, step, advance the schedule."""
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.spec.max_grad_norm))
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

        The loss is already divided by the global supervised-token count, so the *sum* of the
        ranks' gradients is the gradient of the global mean. Done by hand rather than with DDP:
        a rank can have no example in the last batch of an epoch (it contributes zeros), and one
        reduction per optimizer step is all gradient accumulation needs.
        """
        if self.world_size == 1:
            return extra
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [extra.to(self.device)])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
        return flat[offset:].cpu()

    def after_step(self, sums: torch.Tensor, seconds: float, epoch: int) -> None:
        state = self.state
        state.step += 1
        state.metrics = self.step_metrics(sums, seconds, epoch)
        epoch_end = state.step % self.steps_per_epoch == 0
        every = self.spec.checkpoint_every_steps
        if epoch_end or (every and state.step % every == 0):
            if self.valid_examples:
                state.metrics.update(self.valid_metrics(self.valid_examples[:VALID_EXAMPLES],
                                                        "valid_"))
            self.log_metrics()
            self.save_checkpoint()
        else:
            self.log_metrics()

    def step_metrics(self, sums: torch.Tensor, seconds: float, epoch: int) -> dict[str, Any]:
        """The metrics of the step just done (``state.step``) from its global sums."""
        loss, correct, count, tokens = sums.tolist()
        state = self.state
        state.trained_tokens += int(tokens)
        state.supervised_tokens += int(count)
        return {
            "step": state.step, "epoch": epoch + 1, "train_loss": loss / max(count, 1),
            "train_mean_token_accuracy": correct / max(count, 1),
            "learning_rate": self.step_lr,
            "tokens_per_second": tokens / seconds, "supervised_tokens": int(count),
            "supervised_tokens_per_second": count / seconds, "grad_norm": self.grad_norm,
            "step_seconds": seconds, "trained_tokens": state.trained_tokens,
        }

    def valid_metrics(self, examples: list, prefix: str) -> dict[str, float]:
        """``<prefix>loss`` and ``<prefix>mean_token_accuracy`` over ``examples``."""
        valid = self.evaluate(examples)
        return {f"{prefix}loss": valid["loss"], f"{prefix}mean_token_accuracy": valid["accuracy"]}

    def log_metrics(self) -> None:
        if self.events is not None:
            self.events.metrics(self.state.metrics, self.total_steps)

    @torch.no_grad()
    def evaluate(self, examples: list[packing.Example], max_batches: int | None = None
                 ) -> dict[str, float]:
        """Mean token loss and accuracy over ``examples`` (sharded over ranks)."""
        self.model.eval()
        micro = self.batches(examples[self.rank::self.world_size])[:max_batches]
        sums = torch.zeros(3)
        for batch in micro:
            s = self.forward_sums(batch)
            sums += torch.tensor([s.loss.item(), s.correct, s.count])
        loss, correct, count = self.all_reduce(sums).tolist()
        self.model.train()
        return {"loss": loss / max(count, 1), "accuracy": correct / max(count, 1)}

    # -- checkpoints and the result --------------------------------------------------------------

    def save_checkpoint(self) -> None:
        step = self.state.step
        path = checkpoints.local_dir(self.spec.job_id, self.rank, checkpoints.checkpoint_name(step))
        checkpoints.save_checkpoint(path, rank=self.rank, model=self.model,
                                    optimizer=self.optimizer, scheduler=self.scheduler,
                                    state=self.state)
        if self.rank == 0:
            self.export(path / checkpoints.ADAPTER_DIR, step)
        checkpoints.report(self.report_metrics(), path, step)  # [4]
        self.emit(f"Checkpoint saved at step {step}", data={"step": step})

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

    def export(self, weights_dir: Path, step: int) -> None:
        """Rank 0: publish checkpoint ``step`` as an adapter (``ft:…:ckpt-step-N``)."""
        export_adapter(self.storage, weights_dir, adapter_prefix(self.spec.job_id, step),
                       self.manifest())

    def data_hashes(self) -> dict[str, str]:
        hashes: dict[str, str] = {}
        for stats in self.stats.values():
            hashes.update(stats.file_hashes)
        return hashes

    def finish(self) -> None:
        """After the last step: full validation, then the final adapter (manifest last)."""
        if self.valid_examples:
            self.state.metrics.update(self.valid_metrics(self.valid_examples, "full_valid_"))
        if self.rank == 0:
            export_model(self.storage, self.model, adapter_prefix(self.spec.job_id),
                         self.manifest())
            self.emit(f"Final adapter written to {adapter_prefix(self.spec.job_id)}")

    def emit(self, message: str, level: str = "info", data: dict | None = None) -> None:
        log.info("rank %d: %s", self.rank, message)
        if self.events is not None:
            self.events.add(message, level=level, data=data)  # type: ignore[arg-type]

    def cleanup(self) -> None:
        if self.lookahead is not None:
            self.lookahead.close()
        if self.world_size > 1:
            dist.barrier()
        checkpoints.remove_local_dirs(self.spec.job_id, self.rank)
