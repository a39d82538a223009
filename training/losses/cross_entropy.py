"""Response-masked cross-entropy, normalised by the supervised tokens of the global batch.

A global batch is split over gradient-accumulation micro-batches and data-parallel ranks. Averaging
per micro-batch (litgpt's ``fit``) over-weights the tokens of short responses; instead every
micro-batch returns the *sum* of its token losses divided by the number of supervised tokens in
the whole global batch (summed over micro-batches and all-reduced over ranks before the step).
Summing the resulting gradients over micro-batches and ranks then gives exactly the gradient of
the mean token loss of the global batch, whatever the split.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.model.chat import IGNORE_INDEX


@dataclass
class TokenSums:
    """Sums over the supervised tokens of one micro-batch (not yet normalised)."""

    loss: torch.Tensor
    """Scalar, differentiable: sum of the token cross-entropies (nats)."""
    correct: int
    """Supervised tokens whose arg-max prediction equals the label."""
    count: int
    """Supervised tokens."""


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the hidden state predicting them: ``labels[:, 1:]``, shape (B, T-1)."""
    return labels[:, 1:]


def supervised_count(labels: torch.Tensor) -> int:
    """Number of positions that carry loss in an (unshifted) ``labels`` tensor (B, T)."""
    return int((shifted_labels(labels) != IGNORE_INDEX).sum())


def masked_token_sums(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module,
                      logit_softcap: float | None = None) -> TokenSums:
    """Cross-entropy summed over supervised tokens, computing logits only where there is a label.

    Args:
        hidden: (B, T, C) final hidden states of the decoder (after its last norm), or (N, C):
            those already taken at the N positions that predict a label, in order.
        labels: (B, T) token ids, ``IGNORE_INDEX`` where no loss is taken; ``labels[:, t]`` is
            predicted from ``hidden[:, t-1]`` (the Hugging Face convention).
        lm_head: the output projection C → V.
        logit_softcap: Gemma-2 style ``cap * tanh(logits / cap)``; None for most models.

    Skipping the prompt positions before ``lm_head`` saves the (N_prompt, V) logits, their fp32
    copy and their gradient: with a 49k vocabulary that is the largest activation of a step.
    """
    targets = shifted_labels(labels)
    keep = targets != IGNORE_INDEX  # (B, T-1)
    h = hidden if hidden.dim() == 2 else hidden[:, :-1][keep]  # (N, C)
    y = targets[keep]  # (N,)
    weight = getattr(lm_head, "weight", None)
    if isinstance(lm_head, torch.nn.Linear) and lm_head.bias is None and weight is not None:
        grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
        loss, correct = LinearCrossEntropy.apply(h, weight, y, logit_softcap, grads)
        return TokenSums(loss=loss, correct=int(correct), count=int(y.numel()))
    logits = lm_head(h).float()  # (N, V); the loss is taken in fp32 even under bf16 autocast
    if logit_softcap:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    loss = F.cross_entropy(logits, y, reduction="sum")
    with torch.no_grad():
        correct = int((logits.argmax(dim=-1) == y).sum())
    return TokenSums(loss=loss, correct=correct, count=int(y.numel()))


CHUNK = 512
"""Positions whose logits exist at once in ``LinearCrossEntropy``: at a 49k vocabulary 150 MB
(bf16 and fp32), kept between steps by ``scratch`` in each thread that computed a loss."""


class LinearCrossEntropy(torch.autograd.Function):
    """``sum_t CE(h_t W^T, y_t)`` and the arg-max hits, a chunk of positions at a time, with the
    gradient computed in the forward pass (the fused linear cross-entropy of Liger-Kernel).

    The (N, V) logits are a step's largest activation: at a 49k vocabulary 200 KB per supervised
    token in fp32, and autograd keeps them, their softmax and its gradient alive at once. Here
    one chunk's logits exist at a time and none is kept: the gradient w.r.t. ``h`` (N, C), and
    w.r.t. ``W`` if it trains, are stored instead and scaled by the incoming gradient in
    backward. Under autocast the matmuls run in its dtype, the softmax in fp32, as autograd's
    path would.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                softcap: float | None, grads: bool) -> tuple[torch.Tensor, torch.Tensor]:
        device = hidden.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else hidden.dtype)
        w = cast_frozen(weight, dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grads else None
        grad_weight = (torch.zeros_like(weight, dtype=torch.float32)
                       if grads and weight.requires_grad else None)
        with torch.autocast(device, enabled=False):
            for start in range(0, hidden.shape[0], CHUNK):
                h = hidden[start:start + CHUNK].to(dtype)
                y = targets[start:start + CHUNK]
                shape = (len(y), w.shape[0])
                raw = torch.mm(h, w.T, out=scratch("raw", shape, dtype, h.device))
                logits = raw if dtype == torch.float32 else scratch(
                    "fp32", shape, torch.float32, h.device).copy_(raw)
                if softcap:
                    capped = torch.tanh(logits / softcap)
                    logits = softcap * capped
                # One softmax pass and two max reductions over the (N, V) logits, not
                # logsumexp, arg-max, subtract and exp (4 passes, 2 unvectorised on CPU: 16 →
                # 6 ms of a ~0.4 s SmolLM2 step). The log-sum-exp comes from the top
                # probability, which is ≥ 1/V and so has an exact log; a token counts as correct
                # when its logit is the top one (a tie, which arg-max breaks by index, is rare).
                top = logits.amax(dim=-1)
                target = logits.gather(1, y[:, None]).squeeze(1)
                loss += target.neg().sum()
                correct += (target == top).sum()
                probs = torch._softmax(logits, -1, False, out=logits)  # in place: see scratch
                loss += (top - probs.amax(dim=-1).log()).sum()  # the log-sum-exps
                if grad_hidden is None:
                    continue
                grad = probs
                grad[torch.arange(len(y), device=grad.device), y] -= 1
                if softcap:
                    grad *= 1 - capped ** 2
                if grad.dtype != dtype:
                    grad = raw.copy_(grad)
                grad_hidden[start:start + CHUNK] = grad @ w
                if grad_weight is not None:
                    grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct: torch.Tensor | None):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight, None, None, None


_SCRATCH = threading.local()


def scratch(name: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
            ) -> torch.Tensor:
    """A buffer of ``shape`` for this thread's ``LinearCrossEntropy``, the same memory each step.

    Why not fresh tensors: on the CPU VMs measured here, memory freed and taken again a step
    later is often handed back by the host in between, and touching it faults page by page. A
    (90, 49k) fp32 softmax written into new memory took 10-15 ms in a SmolLM2 step, in place
    2.5 ms; the chunk's logits, their fp32 copy and the softmax now reuse two buffers.
    """
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    size = shape[0] * shape[1]
    if key not in buffers or buffers[key].numel() < size:
        buffers[key] = torch.empty(size, dtype=dtype, device=device)
    return buffers[key][:size].view(shape)


_FROZEN_CASTS: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def cast_frozen(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)``, made once while ``weight`` is frozen and unchanged.

    The output projection is frozen under LoRA (and often tied to the fp32 input embeddings):
    casting its 28M weights to bf16 anew for every micro-batch cost ~20 ms of a ~700 ms SmolLM2
    step on CPU (steps 3-5 % faster without it). A weight that trains, or that changed in place
    (``_version``), is cast again.
    """
    if weight.dtype == dtype or weight.requires_grad:
        return weight.to(dtype)
    key = id(weight)
    hit = _FROZEN_CASTS.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version \
            and hit[2].dtype == dtype:
        return hit[2]
    cast = weight.to(dtype)
    # The entry goes when the weight does, so a dead weight's copy is not kept.
    _FROZEN_CASTS[key] = (weakref.ref(weight, lambda _: _FROZEN_CASTS.pop(key, None)),
                          weight._version, cast)
    return cast


def normalised_loss(sums: TokenSums, global_count: int) -> torch.Tensor:
    """This micro-batch's share of the global mean token loss: ``sum / N_global``."""
    return sums.loss / max(global_count, 1)
