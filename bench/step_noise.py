"""What processes that wake briefly and often cost a training step (issue 11's in-service penalty).

Inside ``tuneserve up`` a job's step takes ~1.2x what it takes in a bare process. Beside the
training worker, ~20 Ray and Serve processes each wake every 10 ms (Ray's signal check in every
worker, hard-coded) and together take ~15-20 % of one core. This bench reproduces such loads
without the service: "wakers", processes that sleep 10 ms and then spin for a while, over and
over. Blocks of steps cycle through quiet and each load (the loads' wakers SIGCONTed for their
blocks, SIGSTOPped otherwise) in one process, so the machine's drift from minute to minute falls
on all alike:

- ``20 x 80 us``: what the service's processes take (~16 % of a core);
- the same with the wakers' timer slack at 10 ms (``service.ray.embedded.coalesce_timers``, as
  ``tuneserve up`` sets it for its Ray: the kernel may then fire their timers together);
- ``2 x 800 us``: the same CPU in a tenth of the wakeups.

The step is the demo's: ``SFTTrainer.step_at`` (the frozen layers of the next step run ahead on a
thread of their own) on 4 sort examples, SmolLM2-135M-Instruct, LoRA r=32 on the last 10 layers,
bf16, 2 CPUs, the training worker's allocator settings (set in the child's environment). Per
phase: the frozen stream (``Lookahead._lower``, on its own thread), this step's forward on the
rest (``forward_sums``), the backward (both threads) and the optimizer.

Usage: ``python -m bench.step_noise [--rounds 8]``; writes ``bench/results/step_noise.{json,md}``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BLOCK = 6  # steps per block; the first of each is dropped (it pays for the switch)
LOADS = {  # name: (wakers, microseconds spun per wakeup, timer slack in microseconds; 0: default)
    "20 x 80 us": (20, 80, 0),
    "20 x 80 us, timer slack 10 ms": (20, 80, 10_000),
    "2 x 800 us": (2, 800, 0),
}
WAKER = """
import time
if {slack_ns}:
    from service.ray.embedded import coalesce_timers
    coalesce_timers({slack_ns})
while True:
    time.sleep(0.01)
    t = time.perf_counter()
    while time.perf_counter() - t < {busy_us} * 1e-6:
        pass
"""


def timed(name: str, fn, totals: dict):
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - began
    return wrapper


def measure(rounds: int) -> dict:
    """In the child process: cycle blocks of steps through quiet and each load; medians per kind."""
    wakers = {name: [subprocess.Popen([sys.executable, "-c", WAKER.format(
                         busy_us=busy_us, slack_ns=slack_us * 1000)], cwd=REPO) for _ in range(n)]
              for name, (n, busy_us, slack_us) in LOADS.items()}
    try:
        for procs in wakers.values():
            for w in procs:
                os.kill(w.pid, signal.SIGSTOP)
        import torch

        sys.path[:0] = [str(REPO), str(REPO / "bench" / "quality")]
        from in_process import sort_trainer

        from training.data import packing

        trainer = sort_trainer(4800, 4, layers=10)
        phases: dict[str, float] = collections.defaultdict(float)
        lookahead = trainer.lookahead
        lookahead._lower = timed("frozen_stream", lookahead._lower, phases)
        trainer.forward_sums = timed("forward", trainer.forward_sums, phases)
        trainer.step_optimizer = timed("optimizer", trainer.step_optimizer, phases)
        backward = torch.Tensor.backward
        torch.Tensor.backward = timed("backward", backward, phases)
        order = packing.epoch_order(trainer.train_sources, trainer.weights, trainer.spec.seed, 0)
        kinds = ["quiet", *LOADS]
        per_kind: dict[str, dict[str, list[float]]] = {k: collections.defaultdict(list)
                                                       for k in kinds}
        step = 0
        for block in range(len(kinds) * (rounds + 1)):  # the first round warms up
            kind = kinds[block % len(kinds)]
            for name, procs in wakers.items():
                for w in procs:
                    os.kill(w.pid, signal.SIGCONT if name == kind else signal.SIGSTOP)
            for i in range(BLOCK):
                phases.clear()
                began = time.perf_counter()
                trainer.step_at(order, step)
                took = time.perf_counter() - began
                step += 1
                if block >= len(kinds) and i > 0:
                    per_kind[kind]["step"].append(took)
                    for name, seconds in phases.items():
                        per_kind[kind][name].append(seconds)
        torch.Tensor.backward = backward
    finally:
        for procs in wakers.values():
            for w in procs:
                w.kill()
    return {kind: {"steps": len(series["step"]),
                   **{f"{name}_s": statistics.median(v) for name, v in series.items()}}
            for kind, series in per_kind.items()}


PHASES = (("step_s", "**step**"), ("frozen_stream_s", "frozen layers (own thread)"),
          ("forward_s", "forward of the rest"), ("backward_s", "backward (both threads)"),
          ("optimizer_s", "optimizer"))


def markdown(result: dict) -> str:
    quiet = result["kinds"]["quiet"]
    loads = [k for k in result["kinds"] if k != "quiet"]
    lines = [
        "# A training step beside processes that wake every 10 ms",
        "",
        ("Wakers sleep 10 ms, spin, and sleep again. Blocks of "
         f"{BLOCK} steps cycle through quiet and each load in one process ({result['rounds']} "
         "rounds after one to warm up; the first step of a block dropped). The step: "
         "`SFTTrainer.step_at`, 4 sort examples, SmolLM2-135M-Instruct, LoRA r=32 on the last 10 "
         "layers, bf16, 2 CPUs, the frozen layers of the next step run ahead on their own thread. "
         f"Medians over {quiet['steps']} steps of each kind; under each load its ratio to quiet."),
        "",
        "| phase | quiet | " + " | ".join(f"{k} (~{LOADS[k][0] * LOADS[k][1] / 100:.0f} % of a core)"
                                         for k in loads) + " |",
        "|---|---|" + "---|" * len(loads),
    ]
    for key, label in PHASES:
        cells = [f"{result['kinds'][k][key]:.4f} s ({result['kinds'][k][key] / quiet[key]:.3f}×)"
                 for k in loads]
        lines.append(f"| {label} | {quiet[key]:.4f} s | " + " | ".join(cells) + " |")
    lines += ["", f"Machine: {result['machine']}. Measured {result['measured_at']}.", "",
              "Reproduce:", "", f"    {result['command']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8, help="timed rounds of one block per kind")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.rounds)))
        return 0
    # The training worker's allocator settings hold for the whole child process.
    from service.ray.embedded import CPU_TRAINING_ENV
    from training.cpu.info import cpu_description

    env = {**os.environ, **CPU_TRAINING_ENV}
    child = [sys.executable, "-m", "bench.step_noise", "--child", "--rounds", str(args.rounds)]
    out = subprocess.run(child, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    result = {"kinds": json.loads(out.stdout.strip().splitlines()[-1]), "rounds": args.rounds,
              "loads": {k: dict(zip(("wakers", "busy_us", "slack_us"), v, strict=True))
                        for k, v in LOADS.items()},
              "machine": f"{cpu_description()}, Python "
                         f"{platform.python_version()}",
              "measured_at": time.strftime("%Y-%m-%d %H:%M"),
              "command": " ".join(["python -m bench.step_noise", *(argv or sys.argv[1:])])}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "step_noise.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.results / "step_noise.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
