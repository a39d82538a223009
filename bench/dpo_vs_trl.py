"""DPO step throughput and memory: tuneserve's DPO step against TRL's ``DPOTrainer``.

Same model (the built-in SmolLM2-135M-Instruct), same data (the toy preference set of
``bench/data/make_preferences.py``), same batch (8 pairs per optimizer step), same β, LoRA r=16 on
all linear layers, 2 threads; bf16 autocast where the CPU has bf16 matmuls (AMX, AVX512-bf16),
fp32 elsewhere, on both sides. Variants, each in a fresh process so that peak
memory is its own, run interleaved for several rounds:

- ``ours``: the worker's DPO step (``training.recipes.dpo.DPORecipe.train_step``, the production
  code, driven without Ray) with reference log-probs precomputed in one pass before training;
- ``ours_inline``: the same step, but the reference computed inside every step (a no-grad
  forward with the adapter disabled), as TRL does by default: the difference is what
  precomputing saves;
- ``trl``: TRL's ``DPOTrainer`` with a PEFT model and no separate reference model, TRL's defaults
  (reference forward in every step with the adapter disabled; gradient checkpointing on);
- ``trl_precompute``: TRL with ``precompute_ref_log_probs=True`` and gradient checkpointing off,
  its fastest setting here.

Per run: warm-up steps, then timed steps (monotonic clock around each optimizer step); the run's
step time is the median, pairs/s = batch / median step time; peak memory is the process's
peak RSS (``ru_maxrss``). Reported: medians over rounds, ratios against each TRL variant.

    .venv/bin/python bench/dpo_vs_trl.py [--rounds 3] [--steps 5] [--warmup 1]

writes ``bench/results/dpo.json`` and ``bench/results/dpo.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
VARIANTS = ("ours", "trl", "ours_inline", "trl_precompute")
BATCH = 8
BETA = 0.1
LORA_R, LORA_ALPHA = 16, 32
MAX_LENGTH = 512
THREADS = 2
N_PAIRS = 128
SEED = 0


def set_batch(pairs: int) -> None:
    global BATCH
    BATCH = pairs


def toy_pairs() -> list[dict]:
    sys.path.insert(0, str(REPO / "bench" / "data"))
    from make_preferences import make_preferences

    train, _ = make_preferences(N_PAIRS, 0, seed=SEED)
    return train


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- ours ----------------------------------------------------------------------------------------

def run_ours(steps: int, warmup: int, inline_reference: bool) -> dict:
    """Drive ``DPORecipe.train_step`` in this process (rank 0 of 1, no Ray)."""
    import torch

    from service.core.storage.config import StorageConfig
    from training.data.preference import Pair
    from training.model import chat, registry
    from training.recipes import reference
    from training.recipes.base import Recipe
    from training.recipes.dpo import DPORecipe
    from training.spec import TrainSpec, resolve_hyperparameters

    class InlineReference(DPORecipe):
        """The reference forward inside every step (what precomputing avoids)."""

        def batch_loss(self, batch):
            with reference.reference_mode(self.model, None), torch.no_grad():
                ref_chosen, ref_rejected = self.score(batch)
            return super().batch_loss({**batch, "reference_chosen": ref_chosen,
                                       "reference_rejected": ref_rejected})

    torch.manual_seed(SEED)
    spec = TrainSpec(job_id="ftjob-" + "0" * 24, base_model=registry.BUILTIN_MODEL_ID,
                     training_files=(("file-" + "0" * 24, 1.0),), method="dpo",
                     batch_size=BATCH, n_epochs=1, beta=BETA, lora_r=LORA_R,
                     lora_alpha=LORA_ALPHA, max_length=MAX_LENGTH, cpus_per_worker=THREADS)
    # The recipe's setup piece by piece: the bench tokenises its own pairs and times the
    # reference pass itself, where ``setup`` would read files and the reference cache.
    trainer = (InlineReference if inline_reference else DPORecipe)(
        spec, StorageConfig(uri=tempfile.mkdtemp(prefix="bench-dpo-")))
    trainer.threads = trainer.device_strategy.set_threads(THREADS)
    trainer.use_bf16 = trainer.device_strategy.bf16_fast(trainer.device)
    model_dir = registry.resolve_model(registry.BUILTIN_MODEL_ID)
    trainer.tokenizer = registry.load_tokenizer(model_dir)
    pairs = []
    for i, row in enumerate(toy_pairs()):
        p = chat.tokenize_preference(trainer.tokenizer, row["prompt"], row["chosen"],
                                     row["rejected"], MAX_LENGTH)
        pairs.append(Pair(i, (p.chosen.input_ids, p.chosen.labels),
                          (p.rejected.input_ids, p.rejected.labels)))
    n_steps = warmup + steps
    trainer.hp = resolve_hyperparameters(trainer.spec, len(pairs), 0)
    trainer.total_steps = n_steps
    Recipe.setup_model(trainer, model_dir)  # the policy, without DPO's reference setup
    trainer.setup_optimizer()
    used = pairs[:n_steps * BATCH]
    started = time.perf_counter()
    if inline_reference:
        reference_seconds = 0.0
    else:  # the one pass before training (cached in storage by a real run)
        with reference.reference_mode(trainer.model, None):
            logps = reference.compute(trainer.score, trainer.batches(used), len(pairs))
        used = logps.attach(used)
        reference_seconds = time.perf_counter() - started
    times = []
    for step in range(n_steps):
        started = time.perf_counter()
        trainer.train_step(used[step * BATCH:(step + 1) * BATCH])
        times.append(time.perf_counter() - started)
    return {"step_seconds": times[warmup:], "reference_pass_seconds": reference_seconds,
            "reference_pass_pairs": 0 if inline_reference else len(used)}


# -- TRL -----------------------------------------------------------------------------------------

def run_trl(steps: int, warmup: int, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from training.cpu.info import cpu_has_bf16
    from training.model import registry
    from training.model.lora import TARGET_MODULES

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.started)

    torch.manual_seed(SEED)
    model_dir = registry.resolve_model(registry.BUILTIN_MODEL_ID)
    tokenizer = registry.load_tokenizer(model_dir)
    model = registry.load_model(model_dir, torch.float32, attn_implementation="sdpa")
    rows = [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in toy_pairs()]
    n_steps = warmup + steps
    rows = rows[:n_steps * BATCH]  # the pairs the run uses (TRL precomputes over all it gets)
    output = tempfile.mkdtemp(prefix="trl-dpo-")
    args = DPOConfig(
        # The precision ours picks: bf16 autocast only where the CPU has bf16 matmuls (AMX or
        # AVX512-bf16); elsewhere bf16 is emulated and many times slower, for TRL as for us.
        output_dir=output, use_cpu=True, bf16=cpu_has_bf16(),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, max_steps=n_steps, learning_rate=1e-3, beta=BETA,
        max_length=MAX_LENGTH, save_strategy="no", report_to=[], logging_steps=1, seed=SEED,
        dataloader_num_workers=0, precompute_ref_log_probs=precompute,
        gradient_checkpointing=not precompute)
    timer = StepTimer()
    peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                             target_modules=list(TARGET_MODULES["llama"]), task_type="CAUSAL_LM")
    started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])
    setup_seconds = time.perf_counter() - started  # includes the reference pass if precomputed
    trainer.train()
    return {"step_seconds": timer.times[warmup:], "setup_seconds": setup_seconds,
            "reference_pass_pairs": len(rows) if precompute else 0}


# -- driver --------------------------------------------------------------------------------------

def run_variant(variant: str, steps: int, warmup: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    runners = {
        "ours": lambda: run_ours(steps, warmup, inline_reference=False),
        "ours_inline": lambda: run_ours(steps, warmup, inline_reference=True),
        "trl": lambda: run_trl(steps, warmup, precompute=False),
        "trl_precompute": lambda: run_trl(steps, warmup, precompute=True),
    }
    result = runners[variant]()
    median = statistics.median(result["step_seconds"])
    return {"variant": variant, **result, "median_step_seconds": median,
            "pairs_per_second": BATCH / median, "peak_rss_mb": peak_rss_mb()}


def run_in_subprocess(variant: str, steps: int, warmup: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--variant", variant, "--steps", str(steps),
         "--warmup", str(warmup), "--batch", str(BATCH)], cwd=REPO, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in VARIANTS}
    med = {v: {"median_step_seconds": statistics.median(r["median_step_seconds"] for r in rs),
               "pairs_per_second": statistics.median(r["pairs_per_second"] for r in rs),
               "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs)}
           for v, rs in by_variant.items() if rs}
    ours = med.get("ours")
    if ours is None:
        return {"medians": med, "ratios": {}}
    ratios = {f"pairs_per_second_vs_{t}": ours["pairs_per_second"] / med[t]["pairs_per_second"]
              for t in ("trl", "trl_precompute") if t in med}
    ratios.update({f"peak_memory_vs_{t}": ours["peak_rss_mb"] / med[t]["peak_rss_mb"]
                   for t in ("trl", "trl_precompute") if t in med})
    if "ours_inline" in med:
        ratios["step_time_cut_by_precomputed_reference"] = (
            1 - ours["median_step_seconds"] / med["ours_inline"]["median_step_seconds"])
    return {"medians": med, "ratios": ratios}


def markdown(summary: dict, config: dict, runs: list[dict]) -> str:
    med, ratios = summary["medians"], summary["ratios"]
    loads = [load[0] for r in runs for load in [r.get("load_average") or [0.0]]]
    lines = ["# DPO: tuneserve vs TRL DPOTrainer", "",
             (f"SmolLM2-135M-Instruct, LoRA r={LORA_R} (all linear layers), β={BETA}, {BATCH} "
              f"pairs per step, {config.get('precision', 'bf16 autocast')}, {THREADS} CPU threads; "
              f"{config['rounds']} "
              f"interleaved rounds × {config['steps']} timed steps (medians). "
              "Command: `.venv/bin/python bench/dpo_vs_trl.py`."),
             (f"1-minute load average at the end of the runs: {min(loads):.0f}–{max(loads):.0f} "
              f"on {config.get('cpus')} CPUs"
              + (": other jobs shared the machine, so absolute times are inflated and the "
                 "ratios noisy; rerun on an idle machine for clean figures."
                 if max(loads) > config.get("cpus", 2) + 1 else " (nothing else running).")),
             "",
             "| variant | step time (s) | pairs/s | peak RSS (MB) |", "|---|---|---|---|"]
    for variant, m in med.items():
        lines.append(f"| {variant} | {m['median_step_seconds']:.2f} | "
                     f"{m['pairs_per_second']:.2f} | {m['peak_rss_mb']:.0f} |")
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    targets = {"pairs_per_second_vs_trl": "≥ 1.2", "step_time_cut_by_precomputed_reference":
               "≥ 0.30", "peak_memory_vs_trl": "≤ 1.0"}
    for name, value in ratios.items():
        lines.append(f"| {name} | {value:.2f} | {targets.get(name, '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DPO: tuneserve vs TRL")
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant (internal)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=BATCH, help="pairs per optimizer step")
    parser.add_argument("--summarise", action="store_true",
                        help="rewrite dpo.md from the runs in dpo.json (e.g. after a stopped run)")
    args = parser.parse_args(argv)
    set_batch(args.batch)
    if args.summarise:
        stored = json.loads((RESULTS / "dpo.json").read_text())
        set_batch(stored["config"]["batch_pairs"])
        (RESULTS / "dpo.md").write_text(markdown(summarise(stored["runs"]), stored["config"],
                                                 stored["runs"]))
        return
    if args.variant:
        sys.stdout.write(json.dumps(run_variant(args.variant, args.steps, args.warmup)) + "\n")
        return
    runs = []
    for round_ in range(args.rounds):
        for variant in VARIANTS:  # interleaved: machine noise hits every variant alike
            run = run_in_subprocess(variant, args.steps, args.warmup)
            runs.append({**run, "round": round_, "load_average": os.getloadavg()})
            sys.stderr.write(f"round {round_} {variant}: {run['median_step_seconds']:.2f} s/step, "
                             f"{run['peak_rss_mb']:.0f} MB\n")
            write_results(args, runs, rounds_done=round_ + (variant == VARIANTS[-1]))
    sys.stdout.write((RESULTS / "dpo.md").read_text())


def write_results(args: argparse.Namespace, runs: list[dict], rounds_done: int) -> None:
    """Rewritten after every run, so a long benchmark stopped early still leaves its figures."""
    from training.cpu.info import cpu_has_bf16

    config = {"rounds": rounds_done, "rounds_planned": args.rounds, "steps": args.steps,
              "warmup": args.warmup, "batch_pairs": BATCH, "beta": BETA, "lora_r": LORA_R,
              "threads": THREADS, "max_length": MAX_LENGTH,
              "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "cpus": os.cpu_count(),
              "precision": "bf16 autocast" if cpu_has_bf16()
              else "fp32 (this CPU has no bf16 matmuls)"}
    summary = summarise(runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dpo.json").write_text(json.dumps(
        {"config": config, **summary, "runs": runs}, indent=2) + "\n")
    (RESULTS / "dpo.md").write_text(markdown(summary, config, runs))


if __name__ == "__main__":
    main()
