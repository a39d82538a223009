"""Will a job fit, how long will it take, what will it cost: estimated before it runs.

From the model's config (parameters, layers, hidden and MLP sizes, vocabulary), the method
(LoRA rank, targets and layers, or full), precision, parallelism and workers, and the training
files' token counts: each worker's memory at its peak (weights, gradients, optimizer state,
activations of the longest row, the loss's logits), the tokens trained, the seconds and, with a
price per GPU-hour, the cost. Torch-free: the API replica computes it at ``POST`` time.

The memory is what tensors hold (``torch.cuda.max_memory_allocated`` on a GPU, the profiler's
count on a CPU: ``training.memory``), checked against measured peaks in tests/test_estimate.py
and bench/fsdp_vs_ddp.py; a framework's own overhead (CUDA context, allocator slack) is
``Settings.worker_memory_overhead_gb``'s to cover.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.core.names import BUILTIN_MODEL_ID, TINY_MODEL_ID
from training.spec import TrainSpec

LOSS_CHUNK = 512
"""Positions whose logits exist at once in the loss (``training.losses.cross_entropy.CHUNK``)."""

SAVED_BYTES = {True: 1.8, False: 2.5}
"""Bytes per element autograd keeps, bf16 autocast or not (under autocast some saved tensors
stay fp32; in fp32 some elements are views of others): fitted to the measured peaks of the tiny
model and SmolLM2 (tests/test_fsdp.py, bench/results/fsdp_vs_ddp.md)."""

TOKENS_PER_SECOND = {"cpu": 400.0, "gpu": 20_000.0}
"""Trained tokens per second per worker for a ~135M-parameter model, LoRA, scaled by
parameters below (a rough figure: measured step times replace the estimate's finish time)."""
REFERENCE_PARAMETERS = 135e6


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a decoder-only transformer (Llama family)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(hidden=hidden, intermediate=int(config["intermediate_size"]),
                   layers=int(config["num_hidden_layers"]), heads=heads,
                   kv_heads=int(config.get("num_key_value_heads") or heads),
                   head_dim=int(config.get("head_dim") or hidden // heads),
                   vocab=int(config["vocab_size"]),
                   tied=bool(config.get("tie_word_embeddings", True)))

    @property
    def linears(self) -> dict[str, tuple[int, int]]:
        """Each decoder layer's linear layers: ``name -> (in, out)``."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, \
            self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_parameters(self) -> int:
        return sum(a * b for a, b in self.linears.values()) + 2 * self.hidden

    @property
    def root_parameters(self) -> int:
        """Embeddings, output head (unless tied) and the final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def parameters(self) -> int:
        return self.layers * self.layer_parameters + self.root_parameters


_SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                 "vocab_size": 49152, "tie_word_embeddings": True}


def model_shape(model_id: str, overrides: dict[str, str] | None = None) -> ModelShape | None:
    """The shape of a base model from its config, without loading it: the built-in ones are
    known; another must be a local directory with a ``config.json``. None when unknown (a
    model in S3 or on the hub not yet fetched): then nothing is estimated."""
    if model_id == BUILTIN_MODEL_ID and not (overrides or {}).get(model_id):
        return ModelShape.from_config(_SMOLLM2_135M)
    if model_id == TINY_MODEL_ID and not (overrides or {}).get(model_id):
        from training.model.registry import TINY_CONFIG

        return ModelShape.from_config({**TINY_CONFIG, "vocab_size": 49152})
    location = (overrides or {}).get(model_id, model_id).removeprefix("file://")
    config = Path(location).expanduser() / "config.json"
    try:
        return ModelShape.from_config(json.loads(config.read_text()))
    except (OSError, ValueError, KeyError):
        return None


@dataclass(frozen=True)
class DataShape:
    """What the estimate needs of the training files."""

    examples: int
    """Examples one epoch sees (weights applied)."""
    tokens: int
    """Tokens one epoch sees."""
    longest: int
    """Tokens of the longest example (before truncation to ``max_length``)."""
    supervised_fraction: float = 1.0
    """Of the tokens, those trained on (the responses)."""

    @property
    def mean(self) -> float:
        return self.tokens / max(self.examples, 1)


@dataclass(frozen=True)
class Estimate:
    """Per-worker memory (bytes) by part, tokens, seconds and cost; ``as_dict`` is the job's
    ``estimate`` field."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    gathered: int
    """FSDP: the weights (and gradients) of the units gathered at once, whole; DDP under bf16
    autocast, full fine-tuning: the weights' bf16 copies."""
    tokens: int
    seconds: float
    cost: float | None
    parallelism: str
    workers: int
    longest_row: int

    @property
    def per_worker(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations
                + self.logits + self.gathered)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "memory_per_worker_bytes": self.per_worker,
                "memory_per_worker_gb": round(self.per_worker / 1e9, 3)}

    def describe(self) -> str:
        gb = lambda n: f"{n / 1e9:.2f} GB"
        return (f"{gb(self.per_worker)} per worker ({self.parallelism}, {self.workers} "
                f"workers: weights {gb(self.weights)}, gradients {gb(self.gradients)}, "
                f"optimizer {gb(self.optimizer)}, activations {gb(self.activations)} at "
                f"{self.longest_row} tokens, logits {gb(self.logits)}"
                + (f", gathered or cast weights {gb(self.gathered)}" if self.gathered else "")
                + ")")


def trainable_parameters(shape: ModelShape, spec: TrainSpec) -> int:
    if spec.full_finetune:
        return shape.parameters
    targets = spec.target_modules or tuple(shape.linears)
    per_layer = sum(spec.lora_r * (a + b) for name, (a, b) in shape.linears.items()
                    if name in targets)
    layers = min(spec.lora_layers or shape.layers, shape.layers)
    return per_layer * layers


def longest_row(spec: TrainSpec, data: DataShape) -> int:
    """Tokens of the longest micro-batch: a packed row holds a worker's share of a step up to
    ``pack_length`` (an example longer than that gets its own row, up to ``max_length``);
    unpacked, ``micro_batch_size`` examples padded to the longest."""
    longest = min(data.longest, spec.max_length)
    batch = spec.batch_size if isinstance(spec.batch_size, int) else 32
    share = math.ceil(batch / spec.num_workers)
    if not spec.packing:
        return min(spec.micro_batch_size, share) * longest
    return max(min(spec.pack_length, math.ceil(share * data.mean)), longest)


def estimate(shape: ModelShape, spec: TrainSpec, data: DataShape, *, bf16: bool,
             gpu_price_per_hour: float | None = None) -> Estimate:
    """Each worker's memory, the tokens, the seconds and the cost of ``spec`` (resolved: its
    epochs are numbers) on ``data``. ``bf16``: whether the workers compute in bf16."""
    workers = spec.num_workers
    sharded = spec.parallelism == "fsdp" and workers > 1
    total, trainable = shape.parameters, trainable_parameters(shape, spec)
    compute = 2 if bf16 else 4
    frozen = 0 if spec.full_finetune else total
    if sharded:
        weights = 4 * (total + (0 if spec.full_finetune else trainable)) // workers
        # The root (embeddings, head) stays gathered through the step, one or two layers too;
        # and their gradients, whole, until reduced.
        units = shape.root_parameters + 2 * shape.layer_parameters
        gathered = compute * units + (4 * units if spec.full_finetune else 0)
        gradients = 4 * trainable // workers
        optimizer = 8 * trainable // workers
    else:
        linear = shape.layers * sum(a * b for a, b in shape.linears.values())
        frozen_bytes = (2 * linear + 4 * (frozen - linear)) if bf16 and frozen else 4 * frozen
        weights = frozen_bytes + 4 * trainable
        gathered = 0
        gradients, optimizer = 4 * trainable, 8 * trainable
        if bf16 and spec.full_finetune:
            gathered = 2 * total  # autocast's bf16 copy of every fp32 weight, kept for backward
    row = longest_row(spec, data)
    activations = int(row * _saved_per_token(shape, spec, SAVED_BYTES[bf16]))
    supervised = min(math.ceil(row * data.supervised_fraction), LOSS_CHUNK)
    # The loss keeps one chunk's logits (compute dtype) and their fp32 softmax between steps, as
    # large as the largest chunk so far: a step's, or scoring's (the settings check before step
    # 1 packs 2 × micro_batch_size examples a worker, validation up to 64 over the workers,
    # logits only); under bf16 as much again while a step's gradient is formed; the hidden
    # states' gradient; a trained head's fp32 gradient, accumulated over the chunks.
    scored = max(2 * spec.micro_batch_size,
                 math.ceil(64 / workers) if spec.validation_file else 0)
    scored_row = min(spec.pack_length, math.ceil(scored * data.mean))
    scored_chunk = min(math.ceil(scored_row * data.supervised_fraction), LOSS_CHUNK)
    step_chunk = supervised * shape.vocab * (compute + 4)
    logits = (max(step_chunk, scored_chunk * shape.vocab * compute)
              + (step_chunk if bf16 else 0) + 4 * row * shape.hidden)
    if spec.full_finetune and not sharded:
        logits += 4 * shape.vocab * shape.hidden
    epochs = spec.n_epochs if isinstance(spec.n_epochs, int) else 1
    tokens = data.tokens * epochs
    seconds = tokens / (workers * _tokens_per_second(shape, spec))
    cost = (seconds / 3600 * workers * gpu_price_per_hour
            if gpu_price_per_hour is not None and spec.use_gpu else None)
    return Estimate(weights=int(weights), gradients=int(gradients), optimizer=int(optimizer),
                    activations=activations, logits=int(logits), gathered=int(gathered),
                    tokens=int(tokens), seconds=round(seconds, 1),
                    cost=None if cost is None else round(cost, 4),
                    parallelism="fsdp" if sharded else "ddp", workers=workers,
                    longest_row=row)


def _saved_per_token(shape: ModelShape, spec: TrainSpec, compute: float) -> float:
    """Bytes autograd keeps per token of a row, over all layers (every layer's inputs with
    activation checkpointing, plus one layer's worth being recomputed)."""
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # Per layer: two norms (input, output), q/k/v and their rotated copies, attention in and
    # out (k, v repeated to every head), the MLP's gate, up, activation and product.
    per_layer = compute * (4 * h + 5 * q + 2 * kv + 4 * i)
    if not spec.full_finetune:
        per_layer += 4 * spec.lora_r * len(spec.target_modules or shape.linears)
    if spec.activation_checkpointing:
        return shape.layers * compute * h + per_layer
    return shape.layers * per_layer + 4 * h


def _tokens_per_second(shape: ModelShape, spec: TrainSpec) -> float:
    rate = TOKENS_PER_SECOND["gpu" if spec.use_gpu else "cpu"]
    rate *= REFERENCE_PARAMETERS / max(shape.parameters, 1)
    if spec.full_finetune:
        rate /= 1.5  # every weight's gradient, not only the adapter's
    return rate


def fits(est: Estimate, worker_memory_bytes: int) -> bool:
    return est.per_worker <= worker_memory_bytes


def needs_sharding(shape: ModelShape, spec: TrainSpec, data: DataShape, *, bf16: bool,
                   worker_memory_bytes: int | None) -> bool:
    """The default parallelism: ``fsdp`` when the unsharded run does not fit one worker (with
    room for its activations) and sharding over the job's workers would help."""
    if worker_memory_bytes is None or spec.num_workers < 2:
        return False
    from dataclasses import replace

    return not fits(estimate(shape, replace(spec, parallelism="ddp"), data, bf16=bf16),
                    worker_memory_bytes)


def round_up_gb(n: int) -> int:
    return math.ceil(n / 1e9)
