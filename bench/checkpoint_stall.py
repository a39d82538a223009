"""How long a checkpoint stalls training (issue 40): the background upload against an inline one.

A checkpoint is saved locally in the training thread (``checkpoints.write_local``: the adapter,
the optimizer state, the RNGs) and uploaded with its manifest in a background thread
(``training.recipes.checkpointing.Uploader``). "Inline" is the same save with the training thread
waiting for the upload to finish, which is what a synchronous ``ray.train.report(checkpoint=…)``
did before. Measured per checkpoint in one plain process (rank 0 of 1, one torch thread, as a
CPU worker of ``tuneserve up`` with one CPU): the stall (``Recipe.save_checkpoint``, in the
training thread) and the upload (in its thread), beside the median step, for the tiny model and
SmolLM2-135M-Instruct (LoRA r=16 on every linear layer), on local storage and SeaweedFS S3.

Usage: ``python -m bench.checkpoint_stall [--steps 12] [--every 2] [--no-s3]``; writes
``bench/results/checkpoint_stall.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))

from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from tests.helpers import sorting_lines
from training.cpu.info import cpu_description
from training.model import registry
from training.recipes import checkpointing, run_recipe
from training.recipes.base import Recipe
from training.spec import TrainSpec

FILE = "file-" + "b" * 24
MODELS = {"tiny": registry.TINY_MODEL_ID, "SmolLM2-135M": registry.BUILTIN_MODEL_ID}


def measure(model: str, config: StorageConfig, mode: str, steps: int, every: int) -> dict:
    """One run: each checkpoint's stall and upload seconds, and the steps' median."""
    stalls: list[float] = []
    uploads: list[float] = []
    step_seconds: list[float] = []
    save, upload, after = (Recipe.save_checkpoint, checkpointing.Uploader._upload,
                           Recipe.after_step)
    save_local = checkpointing.Checkpointing.save

    def timed_save(self):
        started = time.perf_counter()
        save(self)
        stalls.append(time.perf_counter() - started)

    def timed_upload(self, *args):
        started = time.perf_counter()
        upload(self, *args)
        uploads.append(time.perf_counter() - started)

    def noted_step(self, sums, seconds, epoch):
        step_seconds.append(seconds)
        after(self, sums, seconds, epoch)

    def inline(self, *args, wait):
        save_local(self, *args, wait=True)

    Recipe.save_checkpoint, checkpointing.Uploader._upload = timed_save, timed_upload
    Recipe.after_step = noted_step
    if mode == "inline":
        checkpointing.Checkpointing.save = inline
    try:
        storage = open_storage(config)
        storage.put(f"files/{FILE}/content", sorting_lines(4 * steps, seed=1))
        job_id = f"ftjob-{time.time_ns() % 10**24:024d}"
        spec = TrainSpec(job_id=job_id, base_model=model, training_files=((FILE, 1.0),),
                         n_epochs=1, batch_size=4, checkpoint_every_steps=every,
                         checkpoint_every_seconds=0, lora_r=16, lora_alpha=32, seed=1)
        run_recipe(spec.validate(), config)
    finally:
        Recipe.save_checkpoint, checkpointing.Uploader._upload = save, upload
        Recipe.after_step = after
        checkpointing.Checkpointing.save = save_local
    return {"stall_s": stalls, "upload_s": uploads,
            "median_stall_s": statistics.median(stalls),
            "median_upload_s": statistics.median(uploads),
            "median_step_s": statistics.median(step_seconds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--no-s3", action="store_true")
    args = parser.parse_args(argv)
    stores: dict[str, StorageConfig] = {}
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-stall-"))
    stores["local"] = StorageConfig(uri=str(tmp / "local"))
    server = None
    if not args.no_s3:
        import os

        from tests.s3server import S3Server

        server = S3Server(tmp / "s3")
        server.start()
        os.environ.update(server.env)
        stores["s3"] = StorageConfig(uri=f"s3://{server.bucket}/bench",
                                     endpoint_url=server.endpoint_url)
    rows = []
    try:
        for model_name, model in MODELS.items():
            for store, config in stores.items():
                for mode in ("background", "inline"):
                    result = measure(model, config, mode, args.steps, args.every)
                    rows.append({"model": model_name, "storage": store, "mode": mode, **result})
                    print(json.dumps({k: v for k, v in rows[-1].items()
                                      if not isinstance(v, list)}), flush=True)
    finally:
        if server is not None:
            server.stop()
    report = {"cpu": cpu_description(), "threads": 1, "steps": args.steps, "every": args.every,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checkpoint_stall.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Checkpoint stall ({report['date']}, {report['cpu']}, 1 torch thread)", "",
             (f"Per checkpoint, medians over a run of {args.steps} steps of 4 examples with a "
              f"checkpoint every {args.every}: the training thread's stall, the upload "
              "(background: in its own thread), one step."),
             "", "| model | storage | upload | stall | upload time | step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['storage']} | {r['mode']} | "
                     f"{1000 * r['median_stall_s']:.0f} ms | {1000 * r['median_upload_s']:.0f} ms"
                     f" | {1000 * r['median_step_s']:.0f} ms |")
    (RESULTS / "checkpoint_stall.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
