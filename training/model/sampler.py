"""Batched sampling from the model being trained: the rollouts of reinforcement fine-tuning.

Rollouts must come from the policy's current weights at every step. The serving engine
(``serving.engine.native``) runs its own copy of the model with its own LoRA kernels on a
background thread: using it from a trainer would mean a second copy of the base weights and
re-loading the adapter after every optimizer step. This sampler instead runs the trainer's own
(PEFT) model, in place, under ``torch.no_grad``: whatever the adapter holds now is what samples.
It lives in ``training.model`` (which serving may import) and needs nothing of serving.

One call samples ``n`` completions for each of several prompts in one batch: the prompts are
prefilled once (left-padded, one forward pass), their KV cache is repeated ``n`` times, and every
completion then decodes one token per forward pass until it ends (an end-of-turn token) or
reaches ``max_new_tokens``. Each sampled token's log-probability under the sampling
distribution comes back with it (the ratio's denominator in GRPO).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache


@dataclass(frozen=True)
class Completion:
    tokens: list[int]
    """The sampled tokens, the end-of-turn token included when one ended it."""
    logps: list[float]
    """log p(token) of each sampled token under the sampling distribution."""
    finished: bool
    """Ended by an end-of-turn token (False: cut at ``max_new_tokens``)."""


@torch.no_grad()
def sample(decoder: torch.nn.Module, lm_head: torch.nn.Module, prompts: list[list[int]], n: int,
           *, max_new_tokens: int, eot_ids: Iterable[int], pad_id: int,
           temperature: float = 1.0, greedy: bool = False,
           generator: torch.Generator | None = None, bf16: bool = False,
           softcap: float | None = None) -> list[list[Completion]]:
    """``n`` completions of each prompt (``result[p][k]``: the k-th of prompt p).

    Args:
        decoder: the transformer body (``model.base_model`` of a causal LM, adapters inside).
        lm_head: its output projection.
        temperature: logits are divided by it before sampling and for the log-probs.
        greedy: take the most likely token instead of sampling (held-out evaluation).
        bf16: run under bf16 autocast (as training does where it pays).
    """
    device = lm_head.weight.device
    eot = torch.tensor(sorted(set(eot_ids)), device=device)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
    if n > 1:
        cache.batch_repeat_interleave(n)
        hidden = hidden.repeat_interleave(n, dim=0)
        mask = mask.repeat_interleave(n, dim=0)
        positions = positions.repeat_interleave(n, dim=0)
    rows = hidden.shape[0]
    next_position = positions[:, -1:] + 1
    tokens = torch.zeros((rows, 0), dtype=torch.long, device=device)
    logps = torch.zeros((rows, 0), device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    length = torch.zeros(rows, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        logits = lm_head(hidden).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        log_probs = F.log_softmax(logits / temperature, dim=-1)
        if greedy:
            token = log_probs.argmax(dim=-1)
        else:
            token = draw(log_probs.exp(), generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        logps = torch.cat([logps, log_probs.gather(-1, token[:, None])], dim=1)
        length = torch.where(done, length, length + 1)
        done = done | torch.isin(token, eot)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = decoder(input_ids=token[:, None], attention_mask=mask,
                             position_ids=next_position, past_key_values=cache,
                             use_cache=True).last_hidden_state[:, -1]
        next_position = next_position + 1
    out: list[list[Completion]] = []
    tokens, logps, length, done = tokens.cpu(), logps.cpu(), length.cpu(), done.cpu()
    for p in range(len(prompts)):
        group = []
        for k in range(n):
            row = p * n + k
            size = int(length[row])
            group.append(Completion(tokens[row, :size].tolist(), logps[row, :size].tolist(),
                                    bool(done[row])))
        out.append(group)
    return out


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs`` (rows × vocabulary), drawn by its probabilities.

    By inverting each row's cumulative distribution at a uniform draw: over a 49k vocabulary
    ``torch.multinomial`` costs about a third of a CPU decode step, this a few hundredths.
    """
    cdf = probs.cumsum(dim=-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1).squeeze(-1)
