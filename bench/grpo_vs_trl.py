"""GRPO step throughput and memory: tuneserve's reinforcement step against TRL's ``GRPOTrainer``.

Same model (the built-in SmolLM2-135M-Instruct), same prompts (the sort task of
``service.cli.eval_tasks``), same group size (4 completions per prompt), same batch (4 prompts,
16 completions per optimizer step), same completion length cap (32 tokens), same reward (a
``text_similarity`` ``fuzzy_match`` grader against the sorted list, through ``training.graders``
on both sides), same loss (token-level mean, "dapo" in TRL), β = 0.04 (the reference is the policy with
its adapter disabled on both sides), temperature 1, LoRA r=16 on all linear layers, 2 threads,
bf16 autocast where the CPU has bf16 matmuls (fp32 elsewhere) on both sides. Each variant runs
in a fresh process so that peak memory is its own, interleaved over rounds:

- ``ours``: the worker's step (``training.recipes.grpo.GRPORecipe.train_step``, production code
  driven without Ray): rollouts by ``training.model.sampler`` (prompt prefilled once per group,
  KV cache), grading, then each group packed in one row after its prompt;
- ``trl``: ``GRPOTrainer`` with a PEFT model (its generation is ``model.generate``), its defaults
  otherwise.

Per step: wall time (monotonic) split into rollout (generation), grade (the reward function)
and train (the rest: log-probs, reference, loss, backward, optimizer). Reported: the median
step, optimizer steps per hour, the split, peak RSS (``ru_maxrss``), and the ratios.

    .venv/bin/python bench/grpo_vs_trl.py [--rounds 2] [--steps 4] [--warmup 1]

writes ``bench/results/grpo_vs_trl.json`` and ``bench/results/grpo_vs_trl.md``.
"""

from __future__ import annotations

import argparse
import asyncio
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
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
VARIANTS = ("ours", "trl")
PROMPTS_PER_STEP = 4
GROUP = 4
MAX_COMPLETION = 32
BETA = 0.04
LORA_R, LORA_ALPHA = 16, 32
THREADS = 2
SEED = 0
# fuzzy_match, not exact match: the base model sorts no list exactly, so an exact-match reward
# gives every group the same reward (no signal): ours then trains on nothing, TRL still runs its
# backward pass, and the comparison would measure rollouts only.
GRADER = {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}


def prompts(n: int) -> list[dict]:
    from service.cli import eval_tasks

    return [{"messages": [{"role": "user", "content": e.prompt}], "answer": e.output}
            for e in eval_tasks.train("sort", n, seed=SEED)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- ours ----------------------------------------------------------------------------------------

def run_ours(steps: int, warmup: int) -> dict:
    import torch

    from service.core.storage.config import StorageConfig
    from training.model import chat, registry
    from training.recipes.grpo import GRPORecipe, Prompt
    from training.spec import TrainSpec, resolve_hyperparameters

    torch.manual_seed(SEED)
    n_steps = warmup + steps
    spec = TrainSpec(job_id="ftjob-" + "0" * 24, base_model=registry.BUILTIN_MODEL_ID,
                     training_files=(("file-" + "0" * 24, 1.0),), method="reinforcement",
                     batch_size=PROMPTS_PER_STEP, n_epochs=1, grader=GRADER, group_size=GROUP,
                     max_completion_tokens=MAX_COMPLETION, kl_beta=BETA, lora_r=LORA_R,
                     lora_alpha=LORA_ALPHA, cpus_per_worker=THREADS, seed=SEED).validate()
    trainer = GRPORecipe(spec, StorageConfig(uri=tempfile.mkdtemp(prefix="bench-grpo-")))
    trainer.threads = trainer.device_strategy.set_threads(THREADS)
    trainer.use_bf16 = trainer.device_strategy.bf16_fast(trainer.device)
    model_dir = registry.resolve_model(registry.BUILTIN_MODEL_ID)
    trainer.tokenizer = registry.load_tokenizer(model_dir)
    rows = prompts(n_steps * PROMPTS_PER_STEP)
    items = [Prompt(i, chat.render_prompt(trainer.tokenizer, r["messages"]), r)
             for i, r in enumerate(rows)]
    trainer.hp = resolve_hyperparameters(trainer.spec, len(items), 0)
    trainer.total_steps = n_steps
    trainer.setup_model(model_dir)
    trainer.setup_optimizer()
    trainer.state = type("S", (), {"step": 0})()
    trainer.checkpointing = type("C", (), {"due": staticmethod(lambda: False)})()
    splits, rewards = [], []
    for step in range(n_steps):
        trainer.state.step = step
        started = time.perf_counter()
        sums = trainer.train_step(items[step * PROMPTS_PER_STEP:(step + 1) * PROMPTS_PER_STEP])
        total = time.perf_counter() - started
        s = dict(zip(trainer.SUMS, sums.tolist(), strict=True))
        splits.append({"step": total, "rollout": s["rollout_seconds"],
                       "grade": s["grade_seconds"],
                       "train": total - s["rollout_seconds"] - s["grade_seconds"],
                       "completion_tokens": s["completion_tokens"]})
        rewards.append(s["reward"] / s["completions"])
    return {"steps": splits[warmup:], "rewards": rewards}


# -- TRL -----------------------------------------------------------------------------------------

def run_trl(steps: int, warmup: int) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from training import graders
    from training.cpu.info import cpu_has_bf16
    from training.model import registry
    from training.model.lora import TARGET_MODULES

    timing = {"rollout": 0.0, "grade": 0.0, "completion_tokens": 0}
    generate = transformers.GenerationMixin.generate

    def timed_generate(self, *args, **kwargs):
        started = time.perf_counter()
        out = generate(self, *args, **kwargs)
        timing["rollout"] += time.perf_counter() - started
        return out

    transformers.GenerationMixin.generate = timed_generate
    grader = graders.parse(GRADER)

    def reward(completions, answer, **_):
        started = time.perf_counter()

        async def every():
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return await asyncio.gather(*(graders.grade(grader, {"answer": a},
                                                        graders.Sample(t.strip()))
                                          for t, a in zip(texts, answer, strict=True)))
        scores = [r.score for r in asyncio.run(every())]
        timing["grade"] += time.perf_counter() - started
        return scores

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []

        def on_step_begin(self, args, state, control, **kwargs):
            timing.update(rollout=0.0, grade=0.0)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            total = time.perf_counter() - self.started
            self.steps.append({"step": total, "rollout": timing["rollout"],
                               "grade": timing["grade"],
                               "train": total - timing["rollout"] - timing["grade"]})

    torch.manual_seed(SEED)
    model_dir = registry.resolve_model(registry.BUILTIN_MODEL_ID)
    tokenizer = registry.load_tokenizer(model_dir)
    tokenizer.padding_side = "left"
    model = registry.load_model(model_dir, torch.float32, attn_implementation="sdpa")
    n_steps = warmup + steps
    rows = [{"prompt": r["messages"], "answer": r["answer"]}
            for r in prompts(n_steps * PROMPTS_PER_STEP)]
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-grpo-"), use_cpu=True, bf16=cpu_has_bf16(),
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP, num_generations=GROUP,
        gradient_accumulation_steps=1, steps_per_generation=1, max_steps=n_steps,
        max_completion_length=MAX_COMPLETION, beta=BETA, temperature=1.0, loss_type="dapo",
        learning_rate=5e-5, save_strategy="no", report_to=[], logging_steps=1, seed=SEED,
        dataloader_num_workers=0, shuffle_dataset=False)
    timer = StepTimer()
    peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                             target_modules=list(TARGET_MODULES["llama"]), task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=peft_config, callbacks=[timer])
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"steps": timer.steps[warmup:], "rewards": rewards}


# -- driver --------------------------------------------------------------------------------------

def run_variant(variant: str, steps: int, warmup: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    result = (run_ours if variant == "ours" else run_trl)(steps, warmup)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def summarise(runs: list[dict]) -> dict:
    steps = [s for run in runs for s in run["steps"]]
    median = {k: statistics.median(s[k] for s in steps) for k in ("step", "rollout", "grade",
                                                                  "train")}
    return {"median_seconds": median, "steps_per_hour": 3600 / median["step"],
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
            "rewards": [run["rewards"] for run in runs], "timed_steps": len(steps)}


def markdown(result: dict) -> str:
    ours, trl = result["ours"], result["trl"]
    lines = ["# GRPO step: tuneserve vs TRL GRPOTrainer", "",
             f"{result['machine']}; {result['settings']}", "",
             "| | step (s) | rollout | grade | train | optimizer steps/h | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|"]
    for name, s in (("tuneserve", ours), ("TRL 1.16 GRPOTrainer", trl)):
        m = s["median_seconds"]
        lines.append(f"| {name} | {m['step']:.2f} | {m['rollout']:.2f} | {m['grade']:.3f} | "
                     f"{m['train']:.2f} | {s['steps_per_hour']:.0f} | {s['peak_rss_mb']:.0f} |")
    ratios = (f"Steps/hour ratio (ours / TRL): **{result['ratio_steps_per_hour']:.2f}x**; "
              f"peak memory ratio: {result['ratio_peak_rss']:.2f}x.")
    lines += ["", ratios, "",
              "Command: `" + result["command"] + "`", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variant", choices=VARIANTS)
    p.add_argument("--beside", help="what else ran on the machine (for the results)")
    args = p.parse_args()
    if args.variant:  # one child process
        print(json.dumps(run_variant(args.variant, args.steps, args.warmup)))
        return 0
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps),
                 "--warmup", str(args.warmup)], capture_output=True, text=True, check=True,
                env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(variant, runs[variant][-1]["steps"], flush=True)
    result = {v: summarise(r) for v, r in runs.items()}
    result["ratio_steps_per_hour"] = (result["ours"]["steps_per_hour"]
                                      / result["trl"]["steps_per_hour"])
    result["ratio_peak_rss"] = result["ours"]["peak_rss_mb"] / result["trl"]["peak_rss_mb"]
    from training.cpu.info import cpu_description

    result["machine"] = (f"{cpu_description()}, load average "
                         f"{load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end"
                         + (f", {args.beside}" if args.beside else ""))
    result["settings"] = (f"SmolLM2-135M-Instruct, LoRA r={LORA_R}, {PROMPTS_PER_STEP} sort "
                          f"prompts × {GROUP} completions per step, ≤ {MAX_COMPLETION} completion "
                          f"tokens, fuzzy_match reward, beta={BETA}, {THREADS} threads, "
                          f"{args.rounds} rounds × {args.steps} timed steps (+{args.warmup} warm-up)")
    result["command"] = " ".join(["python", "bench/grpo_vs_trl.py", *sys.argv[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grpo_vs_trl.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "grpo_vs_trl.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
