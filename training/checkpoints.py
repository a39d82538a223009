"""Checkpoints: save every N steps and at epoch ends, resume after a failure.

A checkpoint folder (``checkpoint-step-<N>`` in the run's storage) holds:

- ``adapter/``: the trainable weights (PEFT files), written by rank 0;
- ``trainer_state.pt``: optimizer, scheduler, the step (which is the data position: the batch
  plan is a pure function of seed, epoch and step), resolved hyperparameters, counters;
- ``rng-rank<r>.pt``: each rank's RNG states, written by that rank.

Every rank writes into its *own* local folder (Ray merges the folders of one report into one
checkpoint), and restores into its own folder too: ranks sharing one temporary directory race
on restore (ray-project/ray#48726). Where the folders go after a save and where the stored ones
come from is the launcher's business (``training.worker``: Ray Train's report and checkpoints);
this module needs no Ray.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"


class StoredCheckpoint(Protocol):
    """A checkpoint kept by the launcher (``ray.train.Checkpoint`` is one)."""

    @property
    def path(self) -> str: ...

    def to_directory(self, path: str) -> str:
        """Copy the checkpoint's files into the local folder ``path``."""
        ...


@dataclass
class TrainState:
    """What a resumed run needs besides the weights and the optimizer."""

    step: int = 0
    """Optimizer steps done; the next step computes batch ``step`` of the plan."""
    trained_tokens: int = 0
    supervised_tokens: int = 0
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    """The metrics of the last step (rank 0's view)."""


def checkpoint_name(step: int) -> str:
    return f"checkpoint-step-{step:06d}"


def local_dir(job_id: str, rank: int, name: str) -> Path:
    """A fresh folder only this rank of this job uses."""
    path = local_dir_root(job_id, rank) / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def local_dir_root(job_id: str, rank: int) -> Path:
    return Path(tempfile.gettempdir()) / "tuneserve" / job_id / f"rank-{rank}"


def remove_local_dirs(job_id: str, rank: int) -> None:
    shutil.rmtree(local_dir_root(job_id, rank), ignore_errors=True)


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, *, rank: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState) -> None:
    """Write this rank's part of the checkpoint into ``path`` (its own local folder)."""
    torch.save(rng_states(), path / f"rng-rank{rank}.pt")
    if rank == 0:
        model.save_pretrained(str(path / ADAPTER_DIR), safe_serialization=True)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "state": state.__dict__}, path / STATE_FILE)


def restore_checkpoint(candidates: list[StoredCheckpoint], job_id: str, rank: int,
                       model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any) -> TrainState | None:
    """Load the newest readable of ``candidates`` (the run's checkpoints, newest first) into this
    rank's model, optimizer, scheduler and RNGs; return its state, or None without one.

    A checkpoint that cannot be read (a partial upload, a corrupt file) is skipped in favour
    of the one before it (``CheckpointConfig(num_to_keep=2)`` keeps one); with none readable
    the run starts over rather than failing the same way on every retry.
    """
    if not candidates:
        return None
    for candidate in candidates:
        try:
            state = _restore(candidate, job_id, rank, model, optimizer, scheduler)
        except Exception as exc:  # noqa: BLE001 - any unreadable file means: try the previous
            log.warning("rank %d: checkpoint %s is unreadable (%s: %s); trying the one before",
                        rank, candidate.path, type(exc).__name__, exc)
            continue
        log.info("rank %d resumed from step %d", rank, state.step)
        return state
    log.warning("rank %d: no readable checkpoint; starting over", rank)
    return None


def _restore(checkpoint: StoredCheckpoint, job_id: str, rank: int, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
    path = local_dir(job_id, rank, "restore")
    try:
        checkpoint.to_directory(str(path))
        saved = torch.load(path / STATE_FILE, weights_only=False)
        # Read everything before changing anything, so a bad file leaves the model as it was.
        rng_file = path / f"rng-rank{rank}.pt"
        rng = torch.load(rng_file, weights_only=False) if rng_file.exists() else None
        load_weights(model, path / ADAPTER_DIR)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if rng is not None:  # absent when the world size changed: the data plan still holds
            set_rng_states(rng)
        return TrainState(**saved["state"])
    finally:
        shutil.rmtree(path, ignore_errors=True)


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load saved trainable weights (PEFT adapter or full model) into ``model`` in place."""
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        return
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint holds weights the model does not: {unexpected[:5]}")
