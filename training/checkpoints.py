"""Checkpoints: written every N steps or seconds, at epoch ends and on preemption; a restarted run
resumes from the newest *complete* one in storage.

A checkpoint (``<run>/<job_id>/checkpoint-step-<N>/`` in the job's storage, beside Ray Train's
own files) holds:

- ``adapter/``: the trainable weights (PEFT files), written by rank 0;
- ``trainer_state.pt``: optimizer, scheduler, the step (which is the data position: the batch
  plan is a pure function of seed, epoch and step), resolved hyperparameters, counters;
- ``rng-rank<r>.pt``: each rank's RNG states, written by that rank;
- ``dcp/`` (FSDP runs, ``training.sharding``): the trainable weights' and the optimizer's
  shards, each rank's file written by that rank with ``torch.distributed.checkpoint``
  (``trainer_state.pt`` then holds no optimizer; ``adapter/`` holds the gathered weights);
- ``parts/rank-<r>.json``: each rank's file list with sizes, written by that rank after its files;
- ``manifest.json``: every file of every rank with its size, written by rank 0 once all parts are
  in, and last. A checkpoint is complete when its manifest is there and every file it names is
  there at its size. Anything else (a rank killed mid-upload, a truncated file) is incomplete:
  never loaded, and removed when the run restarts.

Which checkpoint a restart resumes from is decided here, from storage, not from what Ray Train's
controller registered: the controller registers a report only when it next polls the workers, so
a worker killed just after a save resumed from the checkpoint before it, and a run restarted with
no registered checkpoint started over although complete ones were stored.

This module is the format (write locally, find, load, remove); when to save and the background
upload are the run's (``training.recipes.checkpointing``). It needs no Ray.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from service.core.names import run_key
from training import sharding

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"
MANIFEST = "manifest.json"
PARTS_DIR = "parts"
KEEP = 2
"""Complete checkpoints kept: the newest, and the one before in case the newest does not load."""


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


def checkpoints_prefix(job_id: str) -> str:
    """Where a job's checkpoints live: its Ray Train run folder (``RunConfig(name=job_id)``)."""
    return f"{run_key(job_id)}/{job_id}/"


def checkpoint_prefix(job_id: str, step: int) -> str:
    return f"{checkpoints_prefix(job_id)}{checkpoint_name(step)}/"


# -- local folders -------------------------------------------------------------------------------


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


# -- saving --------------------------------------------------------------------------------------


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


def write_local(path: Path, *, rank: int, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState) -> None:
    """Write this rank's part of the checkpoint into ``path`` (its own local folder)."""
    torch.save(rng_states(), path / f"rng-rank{rank}.pt")
    if sharding.is_sharded(model):  # every rank: gather the export, write its own shards
        sharding.save_full(model, path / ADAPTER_DIR, rank)
        sharding.save_sharded(path / sharding.DCP_DIR, model, optimizer)
        if rank == 0:
            torch.save({"scheduler": scheduler.state_dict(), "state": state.__dict__},
                       path / STATE_FILE)
        return
    if rank == 0:
        model.save_pretrained(str(path / ADAPTER_DIR), safe_serialization=True)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "state": state.__dict__}, path / STATE_FILE)


# -- finding and loading -------------------------------------------------------------------------


def scan(storage: Any, job_id: str) -> tuple[list[int], list[int]]:
    """``(complete, incomplete)``: the steps of the job's stored checkpoints, newest first."""
    root = checkpoints_prefix(job_id)
    sizes: dict[int, dict[str, int]] = {}
    for info in storage.iter(root + "checkpoint-step-"):
        name, _, rest = info.key[len(root):].partition("/")
        step = int(name.rsplit("-", 1)[1])
        sizes.setdefault(step, {})[rest] = info.size
    complete, incomplete = [], []
    for step in sorted(sizes, reverse=True):
        (complete if _is_complete(storage, job_id, step, sizes[step]) else incomplete).append(step)
    return complete, incomplete


def _is_complete(storage: Any, job_id: str, step: int, found: dict[str, int]) -> bool:
    if MANIFEST not in found:
        return False
    try:
        manifest = json.loads(storage.get(checkpoint_prefix(job_id, step) + MANIFEST))
        return all(found.get(name) == size for name, size in manifest["files"].items())
    except Exception:  # noqa: BLE001 - an unreadable manifest is an incomplete checkpoint
        return False


def remove(storage: Any, job_id: str, steps: list[int]) -> None:
    """Delete checkpoints, manifest first: a half-deleted one is incomplete, never loaded."""
    for step in steps:
        prefix = checkpoint_prefix(job_id, step)
        storage.delete(prefix + MANIFEST)
        storage.delete_prefix(prefix)


def prune(storage: Any, job_id: str, below: int) -> None:
    """Remove the checkpoints older than ``below`` beyond the newest ``KEEP`` complete ones.

    Only older ones: a newer folder may be a checkpoint another rank is uploading right now."""
    complete, incomplete = scan(storage, job_id)
    kept = [s for s in complete if s <= below][:KEEP]
    remove(storage, job_id, [s for s in complete + incomplete if s < below and s not in kept])


def load(storage: Any, job_id: str, step: int, rank: int, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer, scheduler: Any,
         all_ok: Callable[[bool], bool] = lambda ok: ok) -> TrainState:
    """Load checkpoint ``step`` into this rank's model, optimizer, scheduler and RNGs. Raises if
    a file cannot be read; then nothing was changed."""
    prefix = checkpoint_prefix(job_id, step)
    path = local_dir(job_id, rank, "restore")
    try:
        if sharding.is_sharded(model):
            return _load_sharded(storage, prefix, path, rank, model, optimizer, scheduler,
                                 all_ok)
        for info in storage.iter(prefix + ADAPTER_DIR + "/"):
            storage.download_file(info.key, path / info.key[len(prefix):])
        storage.download_file(prefix + STATE_FILE, path / STATE_FILE)
        saved = torch.load(path / STATE_FILE, weights_only=False)
        rng = None
        rng_key = f"{prefix}rng-rank{rank}.pt"
        if storage.exists(rng_key):  # absent when the world size changed: the data plan holds
            storage.download_file(rng_key, path / "rng.pt")
            rng = torch.load(path / "rng.pt", weights_only=False)
        # Everything is read before anything changes, so a bad file leaves the model as it was.
        weights = _read_weights(model, path / ADAPTER_DIR)
        _apply_weights(model, weights)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if rng is not None:
            set_rng_states(rng)
        return TrainState(**saved["state"])
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _load_sharded(storage: Any, prefix: str, path: Path, rank: int, model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, scheduler: Any,
                  all_ok: Callable[[bool], bool]) -> TrainState:
    """``load`` of an FSDP checkpoint: every rank downloads every rank's shards (DCP reads the
    pieces of its own shard wherever they were written: the world size may have changed), then
    all load together (a collective: every rank must have its files first)."""
    try:
        shards = f"{prefix}{sharding.DCP_DIR}/"
        for info in storage.iter(shards):
            storage.download_file(info.key, path / sharding.DCP_DIR / info.key[len(shards):])
        storage.download_file(prefix + STATE_FILE, path / STATE_FILE)
        saved = torch.load(path / STATE_FILE, weights_only=False)
        rng_key = f"{prefix}rng-rank{rank}.pt"
        rng = None
        if storage.exists(rng_key):
            storage.download_file(rng_key, path / "rng.pt")
            rng = torch.load(path / "rng.pt", weights_only=False)
        ready = (path / sharding.DCP_DIR / ".metadata").exists()
    except Exception:
        log.warning("rank %d: sharded checkpoint %s unreadable", rank, prefix, exc_info=True)
        ready = False
    if not all_ok(ready):
        raise RuntimeError(f"some rank could not read the sharded checkpoint {prefix}")
    sharding.load_sharded(path / sharding.DCP_DIR, model, optimizer)
    scheduler.load_state_dict(saved["scheduler"])
    if rng is not None:
        set_rng_states(rng)
    return TrainState(**saved["state"])


def restore(storage: Any, job_id: str, rank: int, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: Any, *,
            share: Callable[[Any], Any] = lambda x: x,
            all_ok: Callable[[bool], bool] = lambda ok: ok) -> TrainState | None:
    """Load the newest complete checkpoint that every rank can read; None without one.

    Rank 0 lists the candidates and ``share`` hands its list to every rank (all ranks load the
    same step); ``all_ok`` tells whether every rank loaded it. A checkpoint that some rank cannot
    read is skipped for the one before it. Rank 0 then removes the incomplete ones and those
    that did not load: nothing writes to a run's checkpoints while its workers restart.
    """
    complete, incomplete = scan(storage, job_id) if rank == 0 else ([], [])
    candidates: list[int] = share(complete)
    state, failed, changed = None, [], False
    for step in candidates:
        try:
            loaded = load(storage, job_id, step, rank, model, optimizer, scheduler, all_ok)
            changed = True
        except Exception as exc:  # noqa: BLE001 - any unreadable file means: try the previous
            log.warning("rank %d: checkpoint %d is unreadable (%s: %s)", rank, step,
                        type(exc).__name__, exc)
            loaded = None
        if all_ok(loaded is not None):
            state = loaded
            break
        failed.append(step)
    if rank == 0 and (incomplete or failed):
        log.warning("removing incomplete checkpoints %s and unreadable ones %s", incomplete,
                    failed)
        remove(storage, job_id, incomplete + failed)
    if state is None and candidates and not all_ok(not changed):
        # A rank holds a checkpoint that another could not read: starting over from
        # inconsistent weights is worse than failing (the retry then starts over cleanly).
        raise RuntimeError(f"none of the stored checkpoints {candidates} loads on every rank")
    return state


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load saved trainable weights (PEFT adapter or full model) into ``model`` in place."""
    _apply_weights(model, _read_weights(model, folder))


def _read_weights(model: torch.nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    if isinstance(model, PeftModel):
        return load_file(str(folder / "adapter_model.safetensors"))
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    return weights


def _apply_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, weights)
        return
    _, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint holds weights the model does not: {unexpected[:5]}")
