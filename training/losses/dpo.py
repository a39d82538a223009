"""The DPO loss and the log-probs it compares, summed over response tokens only.

Direct Preference Optimization (Rafailov et al., 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model", https://arxiv.org/abs/2305.18290) trains the policy
π_θ on pairs (x, y_w, y_l) of a prompt, a chosen and a rejected response, against a frozen
reference π_ref, without a reward model. With

    h = β · [(log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))]

the sigmoid loss with label smoothing ε (conservative DPO, Mitchell 2023, for noisy labels) is

    L = −(1 − ε) · log σ(h) − ε · log σ(−h)

and the IPO loss (Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from
Human Preferences", https://arxiv.org/abs/2310.12036, eq. 17, with τ = β) is

    L = (h/β − 1/(2β))²

The implicit rewards are r_w = β(log π_θ(y_w|x) − log π_ref(y_w|x)) and likewise r_l; reward
accuracy is the share of pairs with r_w > r_l. When π_θ = π_ref (step 0), h = 0 and the sigmoid
loss is ln 2 whatever ε.

Log-probs are sums over the supervised tokens of each response (its end-of-turn marker
included), never the prompt: the prompt is the same in both responses and cancels anyway.
Chosen and rejected sequences of a micro-batch go through the model in ONE forward pass (stacked
rows, or packed into shared rows); ``sequence_logps`` splits the token log-probs back into
per-sequence sums by a sequence index per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from training.model.chat import IGNORE_INDEX

LossType = Literal["sigmoid", "ipo"]


@dataclass
class DPOOutput:
    """Per-pair values of one batch, shape (P,)."""

    losses: torch.Tensor
    """Differentiable per-pair losses (mean or sum them for the batch loss)."""
    chosen_rewards: torch.Tensor
    """β(log π_θ(y_w|x) − log π_ref(y_w|x)), detached."""
    rejected_rewards: torch.Tensor
    """β(log π_θ(y_l|x) − log π_ref(y_l|x)), detached."""


def _sigmoid(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def _ipo(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return (h / beta - 1 / (2 * beta)) ** 2


LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "ipo": _ipo,
}
"""Loss of the scaled log-ratio difference h, per ``TrainSpec.dpo_loss``."""


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             reference_chosen: torch.Tensor, reference_rejected: torch.Tensor, *,
             beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: LossType = "sigmoid", rpo_alpha: float = 0.0,
             chosen_tokens: torch.Tensor | None = None) -> DPOOutput:
    """DPO (or IPO) loss per pair from summed response log-probs, each of shape (P,).

    Args:
        policy_chosen, policy_rejected: log π_θ(y|x) summed over response tokens (with grad).
        reference_chosen, reference_rejected: log π_ref(y|x), the same sums (no grad needed).
        beta: β, the strength of the pull towards the reference (0.1 is the usual default).
        label_smoothing: ε, the assumed probability that a label is flipped (sigmoid only).
        loss_type: "sigmoid" (DPO) or "ipo".
        rpo_alpha, chosen_tokens: RPO adds ``rpo_alpha`` × the chosen answer's mean token NLL
            (``-policy_chosen / chosen_tokens``) to each pair's loss.
    """
    chosen_ratio = policy_chosen - reference_chosen.to(policy_chosen.dtype)
    rejected_ratio = policy_rejected - reference_rejected.to(policy_rejected.dtype)
    h = beta * (chosen_ratio - rejected_ratio)
    losses = LOSSES[loss_type](h, beta, label_smoothing)
    if rpo_alpha:
        losses = losses - rpo_alpha * policy_chosen / chosen_tokens.clamp(min=1)
    return DPOOutput(losses=losses, chosen_rewards=beta * chosen_ratio.detach(),
                     rejected_rewards=beta * rejected_ratio.detach())


def sequence_logps(hidden: torch.Tensor, labels: torch.Tensor, sequence_ids: torch.Tensor,
                   n_sequences: int, lm_head: torch.nn.Module,
                   logit_softcap: float | None = None) -> torch.Tensor:
    """Summed log-probs of the supervised tokens of each sequence in a micro-batch.

    Args:
        hidden: (B, T, C) final hidden states of the decoder.
        labels: (B, T) token ids, ``IGNORE_INDEX`` where nothing is scored; ``labels[:, t]`` is
            predicted from ``hidden[:, t-1]``.
        sequence_ids: (B, T) which sequence (0 … n_sequences−1) the token at ``t`` belongs to;
            −1 on padding. Several sequences may share a row (packing).
        n_sequences: S, the number of sequences.
        lm_head: the output projection C → V.
        logit_softcap: Gemma-2 style ``cap * tanh(logits / cap)``; None for most models.

    Returns:
        (S,) float32 sums of log p(label) over each sequence's supervised tokens.

    Logits are computed only at supervised positions: the (N_prompt, V) logits of the prompt
    tokens are never materialised (with a 49k vocabulary, the largest activation of a step).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (B, T-1)
    h = hidden[:, :-1][keep]  # (N, C)
    y = targets[keep]  # (N,)
    owner = sequence_ids[:, 1:][keep]  # (N,)
    logits = lm_head(h).float()  # (N, V); log-softmax in fp32 even under bf16 autocast
    if logit_softcap:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    token_logps = -F.cross_entropy(logits, y, reduction="none")  # (N,)
    sums = torch.zeros(n_sequences, dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, owner, token_logps)
