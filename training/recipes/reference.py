"""DPO reference log-probs: computed in one pass before training, cached in storage.

The reference model is never a second copy in memory. It is the policy itself with its LoRA
adapter disabled (PEFT ``disable_adapter()``), i.e. the base model; or, when DPO continues from an
SFT adapter, that adapter loaded next to the trainable one, frozen, and active for the pass only.
Since the reference never changes, its log-probs of every pair are computed once, before the
first step, and each training step needs one forward/backward of the policy only.

They are cached under ``cache/ref-logps/<hash>.safetensors`` (tensors ``chosen`` and ``rejected``,
one value per pair of the split, in split order). The hash covers everything they depend on:
the contents of the data files (not their ids: the same data uploaded again hits), the chat
template and max_length (which decide the tokens and the dropped pairs), the base weights, the
reference adapter's weights and the precision of the pass. Later epochs, a resumed run and
later jobs on the same data read the file instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from service.core import names
from service.core.errors import NotFound
from training.data.preference import Pair

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bump when the way log-probs are computed changes: old cache entries are then ignored."""
REFERENCE_ADAPTER = "reference"
"""PEFT name of the frozen reference adapter while it is loaded."""

Scorer = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
"""Batch → (chosen log-probs (m,), rejected log-probs (m,)) of its m pairs."""


@dataclass
class ReferenceLogps:
    """One value per pair of a split, in split order, shape (N,) float32."""

    chosen: torch.Tensor
    rejected: torch.Tensor

    def attach(self, pairs: list[Pair]) -> list[Pair]:
        """The pairs with their reference log-probs (batches of them then carry the values)."""
        return [replace(p, reference=(float(self.chosen[p.index]), float(self.rejected[p.index])))
                for p in pairs]


def cache_key(*, data_hashes: Iterable[str], template_hash: str, max_length: int,
              base_weights_hash: str, reference_adapter_hash: str | None, bf16: bool) -> str:
    """``cache/ref-logps/<hash>.safetensors`` for one split under one reference model."""
    text = json.dumps({"data": list(data_hashes), "template": template_hash,
                       "max_length": max_length, "base": base_weights_hash,
                       "reference_adapter": reference_adapter_hash, "bf16": bf16,
                       "version": CACHE_VERSION}, sort_keys=True)
    return names.ref_logps_key(hashlib.sha256(text.encode()).hexdigest()[:32])


def adapter_hash(folder: Path) -> str:
    """sha256 over an adapter folder's weights and config (what its outputs depend on)."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def load_cached(storage: Any, key: str, n_pairs: int) -> ReferenceLogps | None:
    """The cached log-probs, or None when absent (or of another length: never trust those)."""
    try:
        tensors = load_safetensors(storage.get(key))
    except NotFound:
        return None
    found = ReferenceLogps(tensors["chosen"], tensors["rejected"])
    if found.chosen.numel() != n_pairs or found.rejected.numel() != n_pairs:
        log.warning("ignoring %s: it holds %d values, the split has %d pairs", key,
                    found.chosen.numel(), n_pairs)
        return None
    return found


def store(storage: Any, key: str, logps: ReferenceLogps) -> None:
    """One PUT: a reader sees the whole file or none (two runs writing it write the same)."""
    storage.put(key, save_safetensors({"chosen": logps.chosen.contiguous(),
                                       "rejected": logps.rejected.contiguous()}))


@contextmanager
def reference_mode(model: Any, reference_dir: Path | None) -> Iterator[None]:
    """Make the policy compute the reference: adapter disabled, or the frozen reference adapter
    active; eval mode (no dropout) in both cases. Everything is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        if reference_dir is None:
            with model.disable_adapter():
                yield
        else:
            model.load_adapter(str(reference_dir), adapter_name=REFERENCE_ADAPTER,
                               is_trainable=False)
            active = model.active_adapter
            model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
            try:
                yield
            finally:
                model.set_adapter(active)  # makes the policy's adapter trainable again
                model.delete_adapter(REFERENCE_ADAPTER)  # frees its weights
    finally:
        model.train(was_training)


@torch.no_grad()
def compute(score: Scorer, batches: Iterable[dict[str, torch.Tensor]],
            n_pairs: int) -> ReferenceLogps:
    """Score ``batches`` (one rank's share); pairs not in them stay 0, so summing the result
    over ranks (all-reduce) assembles the whole split."""
    logps = ReferenceLogps(torch.zeros(n_pairs), torch.zeros(n_pairs))
    for batch in batches:
        chosen, rejected = score(batch)
        logps.chosen[batch["pair_index"]] = chosen.float().cpu()
        logps.rejected[batch["pair_index"]] = rejected.float().cpu()
    return logps
