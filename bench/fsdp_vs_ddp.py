"""Sharded training against data-parallel training: FSDP2 vs DDP at 2 workers (issue 36).

For the built-in model (SmolLM2-135M-Instruct), LoRA and full fine-tuning, bf16 where the CPU
has it: the same recipe as a job, two processes over gloo (``torch.multiprocessing``, the
recipe's plain launcher: what Ray Train adds is the process placement, not the step). Each run
reports:

- step time: the median of its steps from the third on (the second is profiled);
- peak tensor memory per worker: step 2, profiled (``training.memory``);
- what each worker holds: weights, gradients, optimizer state (``training.sharding.state_bytes``);
- the estimate (``training.estimate``) beside the measured peak.

    .venv/bin/python -m bench.fsdp_vs_ddp [--model tuneserve/tiny-llama] [--steps 5]

Writes bench/results/fsdp_vs_ddp.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FILE = "file-" + "b" * 24


def _worker(rank: int, spec, root: str, port: int) -> None:
    import torch.distributed as dist

    from service.core.storage.config import StorageConfig
    from training.recipes import run_recipe
    from training.recipes.context import WorkerContext

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=spec.num_workers)
    try:
        run_recipe(spec, StorageConfig(uri=root), WorkerContext(rank=rank,
                                                                world_size=spec.num_workers))
    finally:
        dist.destroy_process_group()


def run_case(model: str, method: str, parallelism: str, steps: int, root: str,
             data: bytes) -> dict:
    import torch.multiprocessing as mp

    from service.core.storage import open_storage
    from service.core.storage.config import StorageConfig
    from training import estimate as est
    from training.model import registry
    from training.spec import TrainSpec

    storage = open_storage(StorageConfig(uri=root))
    batch = 32
    spec = TrainSpec(job_id=f"ftjob-{os.urandom(12).hex()}", base_model=model,
                     training_files=((FILE, 1.0),), n_epochs=1, batch_size=batch,
                     num_workers=2, cpus_per_worker=1, checkpoint_every_steps=0,
                     checkpoint_every_seconds=0, seed=7, full_finetune=method == "full",
                     parallelism=parallelism, pack_length=512, extra={"measure_memory": True})
    started = time.monotonic()
    mp.spawn(_worker, args=(spec, root, 29400 + os.getpid() % 500), nprocs=2)
    wall = time.monotonic() - started
    events = [json.loads(storage.get(i.key)) for i in storage.iter(f"jobs/{spec.job_id}/events/")]
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    def data_of(key: str) -> dict:
        return next(e["data"] for e in events if key in (e.get("data") or {}))

    stats = next(e["data"] for e in events if (e.get("data") or {}).get("split") == "train")
    bf16 = any("bf16=on" in e["message"] for e in events)
    tokenizer = registry.load_tokenizer(registry.resolve_model(model))
    longest = max(len(tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True))
                  for line in data.decode().splitlines())
    shape = est.DataShape(examples=stats["n_examples"], tokens=stats["n_tokens"],
                          longest=longest,
                          supervised_fraction=stats["n_supervised"] / stats["n_tokens"])
    estimate = est.estimate(est.model_shape(model), spec, shape, bf16=bf16)
    peak = data_of("peak_bytes")["peak_bytes"]
    return {"model": model, "method": method, "parallelism": parallelism, "bf16": bf16,
            "steps": len(metrics), "wall_seconds": round(wall, 1),
            "step_seconds": round(statistics.median(m["step_seconds"] for m in metrics[2:]), 3),
            "losses": [round(m["train_loss"], 5) for m in metrics],
            "held_bytes": data_of("state_bytes")["state_bytes"], "peak_bytes": peak,
            "estimate_bytes": estimate.per_worker,
            "estimate_over_peak": round(estimate.per_worker / peak, 3)}


def main(argv: list[str] | None = None) -> int:
    from tests.helpers import sorting_lines
    from training.model import registry

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=registry.BUILTIN_MODEL_ID)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--out", default=str(RESULTS / "fsdp_vs_ddp"))
    args = parser.parse_args(argv)
    data = sorting_lines(32 * args.steps, seed=5)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fsdp-bench-") as root:
        from service.core.storage import open_storage
        from service.core.storage.config import StorageConfig

        open_storage(StorageConfig(uri=root)).put(f"files/{FILE}/content", data)
        for method in args.methods.split(","):
            for parallelism in ("ddp", "fsdp"):
                row = run_case(args.model, method, parallelism, args.steps, root, data)
                print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
                rows.append(row)
    summary = {}
    for method in args.methods.split(","):
        ddp, fsdp = (next(r for r in rows if r["method"] == method and r["parallelism"] == p)
                     for p in ("ddp", "fsdp"))
        summary[method] = {
            "step_time_ratio": round(fsdp["step_seconds"] / ddp["step_seconds"], 3),
            "peak_memory_ratio": round(fsdp["peak_bytes"] / ddp["peak_bytes"], 3),
            "state_ratio": round(sum(fsdp["held_bytes"].values())
                                 / sum(ddp["held_bytes"].values()), 3)}
    from training.cpu.info import cpu_description

    machine = {"cpu": cpu_description(), "load_average": os.getloadavg(), "python": platform.python_version(),
               "note": "2-core machine shared by four engineers while this ran"}
    result = {"rows": rows, "summary": summary, "machine": machine}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out + ".md").write_text(_markdown(result))
    print(json.dumps(summary, indent=2))
    return 0


def _markdown(result: dict) -> str:
    def mib(n: int) -> str:
        return f"{n / 2**20:.0f}"

    machine = result["machine"]
    lines = ["# FSDP vs DDP at 2 workers (issue 36)", "",
             (f"`.venv/bin/python -m bench.fsdp_vs_ddp`; {machine['cpu']}, load average "
              f"{machine['load_average'][0]:.1f} ({machine['note']}). Two processes over gloo, "
              "one thread each, pack_length 512, batch 32 (16 examples per worker per step)."),
             "",
             ("| model | method | parallelism | step s | peak MiB/worker | estimate MiB | "
              "est/peak | weights+grads+optimizer MiB |"), "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        held = r["held_bytes"]
        lines.append(f"| {r['model']} | {r['method']} | {r['parallelism']} | "
                     f"{r['step_seconds']} | {mib(r['peak_bytes'])} | "
                     f"{mib(r['estimate_bytes'])} | {r['estimate_over_peak']} | "
                     f"{mib(held['weights'])}+{mib(held['gradients'])}+"
                     f"{mib(held['optimizer'])} |")
    lines += ["", "| method | FSDP/DDP step time | FSDP/DDP peak memory | FSDP/DDP state |",
              "|---|---|---|---|"]
    for method, s in result["summary"].items():
        lines.append(f"| {method} | {s['step_time_ratio']} | {s['peak_memory_ratio']} | "
                     f"{s['state_ratio']} |")
    lines += ["", ("Peak: tensor memory of step 2 (allocations counted by torch's profiler, plus "
                   "what tensors held at its start), what `torch.cuda.max_memory_allocated` is "
                   "on a GPU. Not run on a GPU (none lent this session)."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
