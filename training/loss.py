"""Response-masked cross-entropy, normalised by the supervised tokens of the global batch.

A global batch is split over gradient-accumulation micro-batches and data-parallel ranks. Averaging
per micro-batch (litgpt's ``fit``) over-weights the tokens of short responses; instead every
micro-batch returns the *sum* of its token losses divided by the number of supervised tokens in
the whole global batch (summed over micro-batches and all-reduced over ranks before the step).
Summing the resulting gradients over micro-batches and ranks then gives exactly the gradient of
the mean token loss of the global batch, whatever the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.chat import IGNORE_INDEX



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
        hidden: (B, T, C) final hidden states of the decoder (after its last norm).
        labels: (B, T) token ids, ``IGNORE_INDEX`` where no loss is taken; ``labels[:, t]`` is
            predicted from ``hidden[:, t-1]`` (the Hugging Face convention).
        lm_head: the output projection C → V.
        logit_softcap: Gemma-2 style ``cap * tanh(logits / cap)``; None for most models.

    Skipping the prompt positions before ``lm_head`` saves the (N_prompt, V) logits, their fp32
    copy and their gradient: with a 49k vocabulary that is the largest activation of a step.
    """
    targets = shifted_labels(labels)
    keep = targets != IGNORE_INDEX  # (B, T-1)
    h = hidden[:, :-1][keep]  # (N, C)
    y = targets[keep]  # (N,)
    logits = lm_head(h).float()  # (N, V); the loss is taken in fp32 even under bf16 autocast
    if logit_softcap:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    loss = F.cross_entropy(logits, y, reduction="sum")
    with torch.no_grad():
        correct = int((logits.argmax(dim=-1) == y).sum())
    return TokenSums(loss=loss, correct=correct, count=int(y.numel()))


def normalised_loss(sums: TokenSums, global_count: int) -> torch.Tensor:
    """This micro-batch's share of the global mean token loss: ``sum / N_global``."""
    return sums.loss / max(global_count, 1)
