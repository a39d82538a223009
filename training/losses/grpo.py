"""The GRPO loss: group-relative advantages, a clipped policy gradient, a KL penalty.

Group Relative Policy Optimization (Shao et al., 2024, "DeepSeekMath", https://arxiv.org/abs/
2402.03300, §4.1) samples a group of G completions o_1..o_G per prompt q from the policy, scores
them with a reward r_i, and uses the reward's standing within its group as the advantage of every
token of o_i, with no value model:

    A_i = (r_i − mean(r)) / (std(r) + ε_std)            (std over the group, unbiased, as TRL)

Each completion token t of o_i then has the ratio ρ = π_θ(o_t|q, o_<t) / π_old(o_t|q, o_<t) to
the policy that sampled it, and the loss

    ℓ_t = −min(ρ·A_i, clip(ρ, 1−ε, 1+ε)·A_i) + β·KL_t,
    KL_t = π_ref/π_θ − log(π_ref/π_θ) − 1               (Schulman's k3 estimator, ≥ 0)

against the reference π_ref (the starting model). The step's loss is the sum of ℓ_t over every
completion token of the global batch divided by their number (token-level mean over the batch,
as DAPO and TRL's default do: long and short completions weigh by their tokens, however the
batch is split over micro-batches and ranks).

A group whose rewards are all equal has A_i = 0: no policy signal. Its completions are left out
of the loss altogether (and of the forward and backward passes), so it contributes no gradient,
the KL term included; the step reports the share of such groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STD_EPSILON = 1e-4
"""ε_std: keeps the advantage finite when a group's rewards barely differ (TRL's value)."""


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """(N,) rewards of N/G groups of G consecutive completions → (N,) advantages A_i; with
    ``scale`` False, r_i − mean(r) unscaled (Dr. GRPO, Liu et al., 2025,
    https://arxiv.org/abs/2503.20783: dividing by the std weighs up the groups whose rewards
    barely differ, such as one slip among many right answers, next to those the model gets
    half right)."""
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if not scale:
        return centred.view(-1)
    return (centred / (groups.std(dim=1, keepdim=True) + STD_EPSILON)).view(-1)


def zero_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N/G,) bool: the groups whose rewards are all equal (no advantage to learn from)."""
    groups = rewards.float().view(-1, group_size)
    return (groups.max(dim=1).values - groups.min(dim=1).values) == 0


@dataclass
class GRPOTokens:
    """Per-token values of a micro-batch's completion tokens, shape (T,)."""

    losses: torch.Tensor
    """ℓ_t, differentiable (sum them, divide by the global batch's completion tokens)."""
    kl: torch.Tensor
    """KL_t, detached (zeros without a reference)."""
    clipped: torch.Tensor
    """Bool: the clip was active (ρ outside [1−ε, 1+ε] on the side the advantage pushes)."""


def grpo_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      ref_logps: torch.Tensor | None = None, *, epsilon: float = 0.2,
                      beta: float = 0.04) -> GRPOTokens:
    """ℓ_t for each completion token.

    Args:
        logps: log π_θ(o_t|…) of each completion token (with grad), shape (T,).
        old_logps: log π_old of the same tokens: the policy that sampled them (no grad).
        advantages: A_i of each token's completion, shape (T,).
        ref_logps: log π_ref of the same tokens (no grad); None drops the KL term.
        epsilon: ε, the clip range of ρ.
        beta: β, the weight of the KL penalty.
    """
    ratio = torch.exp(logps - old_logps.to(logps.dtype))
    unclipped = ratio * advantages
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    losses = -torch.min(unclipped, clipped_ratio * advantages)
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    if ref_logps is not None and beta:
        delta = ref_logps.to(logps.dtype) - logps
        kl = torch.exp(delta) - delta - 1
        losses = losses + beta * kl
        kl = kl.detach()
    else:
        kl = torch.zeros_like(losses).detach()
    return GRPOTokens(losses=losses, kl=kl, clipped=clipped.detach())
