"""Sharded training: torch's FSDP2 (``fully_shard``) for a recipe whose spec says
``parallelism="fsdp"``.

With DDP (the recipe's default) every worker holds the whole model, its gradients and its
optimizer state, and the recipe sums the gradients in one flat all-reduce. With FSDP each worker
holds ``1/world_size`` of every parameter (each decoder layer is one all-gather unit, the
embeddings, final norm and output head the root's), gathers a layer's weights just before it
runs and frees them after, and gets back its shard of the summed gradients (reduce-scatter). The
optimizer then steps on shards only: weights, gradients and AdamW state all shrink by the number
of workers, which is what lets a model larger than one device train.

What changes for the recipe, and only here:

- every rank must run the same number of forward and backward passes (each one gathers
  weights with all the others), so a rank with fewer micro-batches adds empty ones: the same
  shape, no supervised token, a zero loss (``even_batches``);
- the gradients arrive summed (``set_gradient_divide_factor(1)``: the loss is already divided
  by the global count, as with DDP); only the step's sums and flags are all-reduced by hand;
- checkpoints hold each rank's shards, written with ``torch.distributed.checkpoint`` (DCP)
  into ``dcp/``, and load into the same or another world size (``save_sharded``/``load_sharded``);
- the exported adapter or model is gathered to rank 0 first (``full_state_dict``): the same
  files as a DDP run, so serving is unchanged.

The mixed-precision policy computes in bf16 where the recipe uses bf16 (and reduces gradients in
fp32); in fp32 it changes nothing, which is how an FSDP run gives a DDP run's losses.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

DCP_DIR = "dcp"
"""A sharded checkpoint's folder (every rank's ``__<r>_0.distcp`` and rank 0's ``.metadata``)."""


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_model(model: torch.nn.Module, decoder: torch.nn.Module, device: torch.device,
                bf16: bool) -> Callable[..., Any]:
    """Shard ``model`` over every rank: each decoder layer a unit of its own, the rest
    (embeddings, final norm, output head: tied weights stay in one unit) the root's; the
    shards move to ``device``.

    Returns what the recipe calls instead of ``decoder`` (the transformer body): the recipe
    runs the body and then the output head inside its own loss, not ``model.forward``, so the
    body is registered as a forward method of the root; the root's weights then stay gathered
    until its gradients are reduced (FSDP keeps a root unsharded after forward)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32)
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # The recipe divides the loss by the global count: the gradient wanted is the sum.
            module.set_gradient_divide_factor(1.0)
            # Plain SUM collectives: gloo has neither AVG nor PREMUL_SUM.
            module.set_force_sum_reduction_for_comms(True)
    model.run_decoder = types.MethodType(lambda self, *args, **kwargs: decoder(*args, **kwargs),
                                         model)
    register_fsdp_forward_method(model, "run_decoder")
    return model.run_decoder


def even_batches(batches: list[dict[str, torch.Tensor]], spare: dict[str, torch.Tensor],
                 ignore_index: int = -100) -> list[dict[str, torch.Tensor]]:
    """``batches`` and as many empty ones as the rank with the most has more: each pass of an
    FSDP model is a collective. An empty batch is ``spare`` (or the rank's first batch) with no
    supervised token: its loss and every sum are zero."""
    count = torch.tensor([len(batches)])
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    template = batches[0] if batches else spare
    empty = {**template, "labels": torch.full_like(template["labels"], ignore_index)}
    return batches + [empty] * (int(count.item()) - len(batches))


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` over sharded gradients: the norm of the whole gradient."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable-or-not weight, whole, on rank 0's CPU (empty on the others); every rank
    must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def save_full(model: torch.nn.Module, folder: Path, rank: int) -> None:
    """Rank 0 saves what ``save_pretrained`` saves for an unsharded model (the PEFT adapter, or
    the whole model); every rank must call it (the weights are gathered)."""
    state = full_state_dict(model)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        # A PeftModel picks its adapter's tensors out of the full state; a plain model saves all.
        model.save_pretrained(str(folder), state_dict=state, safe_serialization=True)


def _trainable_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                     ) -> dict[str, Any]:
    """The model's and the optimizer's sharded state (frozen weights left out: they come from
    the base model, as in a DDP checkpoint)."""
    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optimizer": optim_state}


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write this rank's shards (every rank calls it) into ``folder`` (local to this rank;
    rank 0 adds ``.metadata``). The union of the ranks' folders is the checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    dcp.save(_trainable_state(model, optimizer), checkpoint_id=str(folder))


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint (every rank's files, downloaded into ``folder``) into this
    rank's shards of ``model`` and ``optimizer``; every rank calls it."""
    state = _trainable_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def state_bytes(params: list[torch.nn.Parameter], all_params: list[torch.nn.Parameter],
                optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds: its weights (all, frozen too), its trainable weights' gradients
    and its optimizer state, in bytes (shards only under FSDP)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    def size(t: torch.Tensor) -> int:
        t = local(t)
        return t.numel() * t.element_size()

    optim = sum(size(v) for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"weights": sum(size(p) for p in all_params),
            "gradients": sum(size(p) for p in params),
            "optimizer": optim}
