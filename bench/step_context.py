"""Where a training step loses time inside the service: the same SFT step in a bare process, in
a Ray task, beside idle Ray actors, and in a Ray Train worker (issue 11's in-service penalty).

Every context times ``training.recipes.sft.SFTTrainer.train_step`` on the same batches of 4 sort
examples (``bench/quality/make_data.py``), SmolLM2-135M-Instruct, LoRA r=32, bf16, 2 torch
threads, and reports the median step and its ratio to the bare process. The contexts run one
after another in fresh processes (a local Ray is started and stopped for each Ray context):

- ``bare``: this script's own child process, nice 0;
- ``ray_task``: a Ray task holding 2 CPUs (Ray runs workers at nice 15);
- ``ray_task_6_actors``: the same beside 6 idle actors (a Ray Train run starts 6 helper actors);
- ``ray_train``: a one-worker ``TorchTrainer``, the way ``training.run`` runs a job.

Usage: ``python -m bench.step_context [--steps 40]``; writes ``bench/results/step_context.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from training.cpu.info import cpu_description

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CONTEXTS = ("bare", "ray_task", "ray_task_6_actors", "ray_train")
BATCH, THREADS, WARMUP = 4, 2, 5


def step_times(steps: int) -> dict:
    """Build the trainer on 200 sort examples and time ``steps`` steps after a warm-up."""
    import torch

    sys.path[:0] = [str(REPO), str(REPO / "bench" / "quality")]
    from in_process import sort_trainer

    trainer = sort_trainer(200, BATCH)
    examples = trainer.train_examples
    times = []
    for i in range(WARMUP + steps):
        start = (i * BATCH) % (len(examples) - BATCH)
        began = time.perf_counter()
        trainer.train_step(examples[start:start + BATCH])
        times.append(time.perf_counter() - began)
    return {"median_s": statistics.median(times[WARMUP:]), "mean_s": statistics.mean(times[WARMUP:]),
            "nice": os.nice(0), "torch_threads": torch.get_num_threads()}


def run_context(context: str, steps: int) -> dict:
    """In this (child) process: time the step in ``context``."""
    if context == "bare":
        return step_times(steps)
    import ray

    ray.init(num_cpus=THREADS, include_dashboard=False, log_to_driver=False)
    try:
        if context.startswith("ray_task"):
            idle = [ray.remote(num_cpus=0)(Idle).remote() for _ in range(6)] \
                if context.endswith("actors") else []
            ray.get([actor.ping.remote() for actor in idle])
            return ray.get(ray.remote(num_cpus=THREADS)(step_times).remote(steps))
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        out = Path(tempfile.mkdtemp()) / "result.json"

        def loop(_config):
            out.write_text(json.dumps(step_times(steps)))
        TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1,
                                                        resources_per_worker={"CPU": THREADS}),
                     run_config=RunConfig(storage_path=str(out.parent / "run"))).fit()
        return json.loads(out.read_text())
    finally:
        ray.shutdown()


class Idle:
    def ping(self) -> int:
        return 1


def markdown(result: dict) -> str:
    bare = result["contexts"]["bare"]["median_s"]
    lines = ["# One SFT step in and out of Ray", "",
             (f"{result['measured']}, {result['machine']}; load average at the start "
             f"{result['load_at_start']}. Median of {result['steps']} steps of {BATCH} sort "
             f"examples (SmolLM2-135M-Instruct, LoRA r=32, bf16, {THREADS} torch threads) after "
             f"{WARMUP} warm-up steps. Command: `python -m bench.step_context "
             f"--steps {result['steps']}`."), "",
             "| context | median step s | mean s | × bare | worker nice |", "|---|---|---|---|---|"]
    for name, c in result["contexts"].items():
        lines.append(f"| {name} | {c['median_s']:.3f} | {c['mean_s']:.3f} | "
                     f"{c['median_s'] / bare:.2f} | {c['nice']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--context", choices=CONTEXTS, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.context:
        print("RESULT " + json.dumps(run_context(args.context, args.steps)), flush=True)
        return 0
    result = {"measured": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": args.steps,
              "machine": cpu_description(),
              "load_at_start": [round(x, 2) for x in os.getloadavg()], "contexts": {}}
    for context in CONTEXTS:
        proc = subprocess.run([sys.executable, "-m", "bench.step_context", "--context", context,
                               "--steps", str(args.steps)], cwd=REPO, capture_output=True,
                              text=True, check=True)
        line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULT "))
        result["contexts"][context] = json.loads(line.removeprefix("RESULT "))
        print(context, result["contexts"][context], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "step_context.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "step_context.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
