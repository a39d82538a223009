"""A run's checkpoints: when to save, the background upload, and resuming with every rank.

Training waits only for the local save (``checkpoints.write_local``); the upload and the
manifest that makes a checkpoint complete run in a background thread (``Uploader``), one
checkpoint at a time. A checkpoint is due every ``checkpoint_every_steps`` steps, every
``checkpoint_every_seconds`` seconds of rank 0's clock (whichever comes first), at each epoch's
end, and when a rank was asked to stop (a preemption notice): the run then waits until that
checkpoint is complete and ends, to be resumed from it with nothing lost.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from training import checkpoints, resumes
from training.checkpoints import MANIFEST, PARTS_DIR, TrainState, checkpoint_prefix

log = logging.getLogger(__name__)

PART_WAIT_S = 600.0
"""How long rank 0 waits for the other ranks' parts before leaving a checkpoint incomplete."""


class Uploader:
    """Uploads one rank's checkpoint folders in a background thread, one at a time.

    Rank ``r`` uploads its files, then ``parts/rank-<r>.json``; rank 0 then waits for every
    rank's part, writes the manifest (the checkpoint is complete from here), removes the older
    checkpoints beyond ``checkpoints.KEEP`` and calls ``on_complete``. A failed upload is logged
    and leaves the checkpoint incomplete; the previous complete one still stands.
    """

    def __init__(self, storage: Any, job_id: str, rank: int, world_size: int):
        self.storage, self.job_id = storage, job_id
        self.rank, self.world_size = rank, world_size
        self._thread: threading.Thread | None = None
        self.failures = 0

    def start(self, step: int, folder: Path,
              on_complete: Callable[[int], None] | None = None) -> None:
        """Upload ``folder`` as this rank's part of checkpoint ``step``, in the background."""
        self.wait()
        self._thread = threading.Thread(target=self._upload, args=(step, folder, on_complete),
                                        name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Until the upload under way (if any) is done."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _upload(self, step: int, folder: Path, on_complete: Callable[[int], None] | None) -> None:
        prefix = checkpoint_prefix(self.job_id, step)
        try:
            files = {}
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                name = path.relative_to(folder).as_posix()
                self.storage.upload_file(path, prefix + name)
                files[name] = path.stat().st_size
            part = {"rank": self.rank, "world_size": self.world_size, "files": files}
            self.storage.put(f"{prefix}{PARTS_DIR}/rank-{self.rank}.json",
                             json.dumps(part).encode())
            if self.rank == 0:
                self._commit(step, prefix)
                checkpoints.prune(self.storage, self.job_id, below=step)
                if on_complete is not None:
                    on_complete(step)
        except Exception:  # a lost checkpoint must not end the run
            self.failures += 1
            log.warning("rank %d: checkpoint %d was not stored", self.rank, step, exc_info=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _commit(self, step: int, prefix: str) -> None:
        parts = [f"{prefix}{PARTS_DIR}/rank-{r}.json" for r in range(self.world_size)]
        deadline = time.monotonic() + PART_WAIT_S
        while not all(self.storage.exists(key) for key in parts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the other ranks' parts of checkpoint {step} never arrived")
            time.sleep(0.05)
        files: dict[str, int] = {}
        for key in parts:
            files.update(json.loads(self.storage.get(key))["files"])
        manifest = {"step": step, "world_size": self.world_size, "files": files,
                    "created_at": time.time()}
        self.storage.put(prefix + MANIFEST, json.dumps(manifest).encode())


class Checkpointing:
    """One rank's side of its run's checkpoints."""

    def __init__(self, storage: Any, job_id: str, rank: int, world_size: int,
                 every_seconds: float, emit: Callable[..., None]):
        self.storage, self.job_id = storage, job_id
        self.rank, self.world_size = rank, world_size
        self.every_seconds = every_seconds
        self.emit = emit
        self.uploader = Uploader(storage, job_id, rank, world_size)
        self.saved_at = time.monotonic()

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any) -> TrainState | None:
        """Load the newest complete checkpoint on every rank; rank 0 says what the restart
        cost. None on a first start (or with no complete checkpoint)."""
        state = checkpoints.restore(self.storage, self.job_id, self.rank, model, optimizer,
                                    scheduler, share=self.share, all_ok=self.all_ok)
        if self.rank == 0:
            self.note_resume(state)
        self.saved_at = time.monotonic()
        return state

    def due(self) -> bool:
        """Rank 0's clock: a time-based checkpoint is due (the recipe all-reduces the answer)."""
        return bool(self.every_seconds) and self.rank == 0 and (
            time.monotonic() - self.saved_at >= self.every_seconds)

    def save(self, state: TrainState, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: Any,
             on_stored: Callable[[Path, int], None], wait: bool) -> None:
        """Save this rank's part locally, then upload it in the background (``wait``: until the
        checkpoint is complete). ``on_stored(weights_dir, step)``: rank 0, once complete."""
        step = state.step
        self.uploader.wait()  # one upload at a time (the previous one is long done, normally)
        path = checkpoints.local_dir(self.job_id, self.rank, checkpoints.checkpoint_name(step))
        checkpoints.write_local(path, rank=self.rank, model=model, optimizer=optimizer,
                                scheduler=scheduler, state=state)
        self.uploader.start(step, path,
                            lambda s: on_stored(path / checkpoints.ADAPTER_DIR, s))
        self.saved_at = time.monotonic()
        if wait:
            self.wait()

    def wait(self) -> None:
        self.uploader.wait()

    def note_resume(self, state: TrainState | None) -> None:
        """Rank 0: say what a restart cost (steps done before it and now done again)."""
        reached = resumes.last_reported_step(self.storage, self.job_id)
        if state is None and reached == 0:
            return  # a first start
        start = state.step if state is not None else 0
        lost = max(0, reached - start)
        message = (f"Resumed from the checkpoint at step {start}; {lost} steps lost"
                   if state is not None else
                   f"Started over: no complete checkpoint; {lost} steps lost")
        self.emit(message, level="warn" if lost else "info",
                  data={"resumed_from_step": start, "steps_lost": lost})
        resumes.record(self.storage, self.job_id, start, lost)

    def share(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_ok(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank."""
        if self.world_size == 1:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0])
        dist.all_reduce(flag)
        return flag.item() == 0
