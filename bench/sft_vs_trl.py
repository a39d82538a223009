"""Our SFT step against TRL's ``SFTTrainer`` on this machine (issue 4's "must win").

Same model (the built-in SmolLM2-135M-Instruct), same tokens (a synthetic chat set with a
long-tail length distribution, about half prompt tokens, tokenised once with our chat template
and handed to both as ``input_ids`` + ``labels``), same effective batch (8 examples per optimizer
step), LoRA r=16 / alpha=32 on all linear layers, bf16 autocast, AdamW at the same rate.

Each run is a fresh subprocess (so peak memory is its own); the configurations are interleaved
and repeated, and medians are reported:

- ``trl_default``: TRL's defaults (padded batches of 8, gradient checkpointing on);
- ``trl_packing``: ``packing=True`` (BFD, padding-free rows holding ~8 examples);
- ``trl_padding_free``: ``padding_free=True`` (each batch of 8 flattened into one row);
- ``ours_packed`` / ``ours_unpacked``: ``training.recipes.sft.SFTRecipe.train_step``, the step the
  Ray Train workers run, packed (default) or padded; ``ours_packed_ckpt`` with activation
  checkpointing (as TRL's default does).

Also: the loss of the first batch (before any update) from TRL's ``compute_loss`` and ours, the
final loss of packed vs unpacked runs over the same batches, and MFU against the bf16 matmul
peak measured in the same run. Usage: ``python -m bench.sft_vs_trl [--reps 3] [--steps 4]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 8
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LEARNING_RATE = 1e-3
THREADS = 2
CONFIGS = ["ours_packed", "trl_default", "trl_packing", "ours_packed_ckpt", "trl_padding_free",
           "ours_unpacked"]
RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("the a model data train token value list step loss rate batch file job event run "
         "adapter chat answer question result number order sort short long text").split()

log = logging.getLogger("bench")


# -- data ------------------------------------------------------------------------------------

def synthetic_chats(n: int, seed: int = 0) -> list[dict]:
    """Prompt and response lengths drawn from a log-normal (long tail), medians 30 words."""
    rng = random.Random(seed)

    def text(median: float) -> str:
        words = max(3, min(400, int(rng.lognormvariate(0, 0.8) * median)))
        return " ".join(rng.choice(WORDS) for _ in range(words))
    return [{"messages": [{"role": "user", "content": text(30)},
                          {"role": "assistant", "content": text(30)}]} for _ in range(n)]


def tokenised(tokenizer, n: int) -> list[tuple[list[int], list[int]]]:
    from training.model import chat

    out = []
    for example in synthetic_chats(n):
        tokens = chat.tokenize_conversation(tokenizer, example["messages"], 1024)
        out.append((tokens.input_ids, tokens.labels))
    return out


def supervised(labels) -> int:
    return sum(1 for y in labels[1:] if y != -100)


# -- children ----------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Peak resident memory while training steps run (model loading excluded: both load the
    same fp32 checkpoint first), sampled every 5 ms."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self.running = False

    def start(self) -> None:
        import threading

        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak / 2 ** 20


SAMPLER = RssSampler()


def child(config: str, steps: int, warmup: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from training.model import registry

    model_dir = registry.resolve_model(registry.BUILTIN_MODEL_ID)
    tokenizer = registry.load_tokenizer(model_dir)
    examples = tokenised(tokenizer, (steps + warmup) * BATCH * 2)
    loaded_rss = peak_rss_mb()
    run = run_ours if config.startswith("ours") else run_trl
    times, counts, losses, computed = run(config, model_dir, tokenizer, examples, steps + warmup)
    timed = list(zip(times, counts))[warmup:]
    # MFU counts the tokens the model actually ran: ours computes a prefix its examples share
    # (the template's system prompt here) once per row, so fewer than the examples hold.
    total_tokens = computed if computed is not None else sum(
        len(ids) for ids, _ in examples[: (steps + warmup) * BATCH])
    return {"config": config, "step_seconds": [round(t, 3) for t in times],
            "supervised_tokens": counts, "losses": losses,
            "supervised_tokens_per_second": sum(c for _, c in timed) / sum(t for t, _ in timed),
            "tokens_per_step": total_tokens / (steps + warmup),
            "peak_rss_mb": SAMPLER.stop(), "process_max_rss_mb": peak_rss_mb(),
            "rss_before_model_mb": loaded_rss}


def run_ours(config: str, model_dir, tokenizer, examples, n_steps: int):
    from service.core.storage.config import StorageConfig
    from training.recipes.sft import SFTRecipe
    from training.spec import TrainSpec

    root = tempfile.mkdtemp(prefix="bench-ours-")
    file_id = "file-" + "0" * 24
    storage_config = StorageConfig(uri=root)
    spec = TrainSpec(job_id="ftjob-" + "0" * 24, base_model=str(model_dir),
                     training_files=((file_id, 1.0),), n_epochs=1, batch_size=BATCH,
                     lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                     packing=config.startswith("ours_packed"), micro_batch_size=BATCH,
                     activation_checkpointing=config.endswith("_ckpt"),
                     cpus_per_worker=THREADS, max_length=1024)
    trainer = SFTRecipe(spec, storage_config)  # rank 0 of 1, in this process
    # The engine reads its data from storage: hand it the bench's examples as a chat file.
    lines = "\n".join(json.dumps(e) for e in synthetic_chats(len(examples)))
    trainer.storage.put(f"files/{file_id}/content", lines.encode())
    trainer.setup()
    SAMPLER.start()
    times, counts, losses = [], [], []
    computed = 0
    for step in range(n_steps):
        batch = examples[step * BATCH:(step + 1) * BATCH]
        computed += sum(int(b["input_ids"].numel()) for b in trainer.batches(batch))
        started = time.perf_counter()
        sums = trainer.train_step(batch)
        times.append(time.perf_counter() - started)
        counts.append(int(sums[2]))
        losses.append(float(sums[0] / sums[2]))
    return times, counts, losses, computed


def trl_trainer(config: str, model_dir, examples, n_steps: int, mean_len: float):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from training.cpu.info import cpu_has_bf16
    from training.model import registry

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.started)

    class CountingSFT(SFTTrainer):
        counts: list[int] = []
        losses: list[float] = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.counts.append(int((inputs["labels"][:, 1:] != -100).sum()))
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.losses.append(float(loss))
            return loss

    packing = config == "trl_packing"
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_steps=n_steps,
        learning_rate=LEARNING_RATE,
        # bf16 where ours uses it: on a CPU without bf16 matmuls it is emulated, far slower
        per_device_train_batch_size=1 if packing else BATCH, use_cpu=True,
        bf16=cpu_has_bf16(),
        # A packed row holds about BATCH examples, so one row per step is the same batch.
        # padding_free without packing refuses a max_length (the inputs are already truncated)
        max_length=(int(mean_len * BATCH) if packing
                    else None if config == "trl_padding_free" else 1024),
        packing=packing,
        padding_free=config == "trl_padding_free", logging_steps=1, report_to="none",
        save_strategy="no", dataloader_num_workers=0, seed=0, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, disable_tqdm=True)
    dataset = Dataset.from_dict({"input_ids": [ids for ids, _ in examples],
                                 "labels": [labels for _, labels in examples]})
    model = registry.load_model(model_dir, torch.float32, attn_implementation="sdpa")
    timer = Timer()
    trainer = CountingSFT(model=model, args=args, train_dataset=dataset, callbacks=[timer],
                          peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                 lora_dropout=LORA["dropout"],
                                                 target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    return trainer, timer


def run_trl(config: str, model_dir, tokenizer, examples, n_steps: int):
    mean_len = statistics.mean(len(ids) for ids, _ in examples)
    trainer, timer = trl_trainer(config, model_dir, examples, n_steps, mean_len)
    SAMPLER.start()
    trainer.train()
    return timer.times, trainer.counts, trainer.losses, None


def first_loss_check(model_dir) -> dict:
    """The loss of the same first batch, before any update: TRL's compute_loss vs ours."""
    import torch

    from training.data.packing import collate_padded
    from training.losses.cross_entropy import masked_token_sums
    from training.model import registry
    from training.model.lora import apply_adapter
    from training.spec import TrainSpec

    torch.set_num_threads(THREADS)
    tokenizer = registry.load_tokenizer(model_dir)
    examples = tokenised(tokenizer, BATCH)
    trainer, _ = trl_trainer("trl_default", model_dir, examples, 1, 0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trl_loss = float(trainer.compute_loss(trainer.model, dict(batch)))
    spec = TrainSpec(job_id="ftjob-" + "0" * 24, base_model="x",
                     training_files=(("file-" + "0" * 24, 1.0),), lora_r=LORA["r"])
    ours = apply_adapter(registry.load_model(model_dir, attn_implementation="sdpa"), spec,
                         frozen_dtype=torch.bfloat16).get_base_model()
    padded = collate_padded(examples, tokenizer.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        labels = padded.pop("labels")
        hidden = ours.model(**padded, use_cache=False).last_hidden_state
        sums = masked_token_sums(hidden, labels, ours.lm_head)
    our_loss = float(sums.loss / sums.count)
    return {"trl_first_loss": trl_loss, "our_first_loss": our_loss,
            "relative_difference": abs(trl_loss - our_loss) / trl_loss}


def matmul_peak_tflops() -> float:
    """Best of a few bf16 matmuls (2048³) with the benchmark's thread count."""
    import torch

    torch.set_num_threads(THREADS)
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * 2048 ** 3 / best / 1e12


# -- parent --------------------------------------------------------------------------------------

def spawn(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "bench.sft_vs_trl", *args], env=env,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], loss_check: dict, peak: float, n_params: int) -> dict:
    by_config: dict[str, dict] = {}
    for config in CONFIGS:
        mine = [r for r in runs if r["config"] == config]
        tps = statistics.median(r["supervised_tokens_per_second"] for r in mine)
        step = statistics.median(statistics.median(r["step_seconds"][1:]) for r in mine)
        tokens_per_step = statistics.median(r["tokens_per_step"] for r in mine)
        by_config[config] = {
            "supervised_tokens_per_second": tps, "median_step_seconds": step,
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in mine),
            "process_max_rss_mb": statistics.median(r["process_max_rss_mb"] for r in mine),
            "final_loss": statistics.median(r["losses"][-1] for r in mine),
            # Model FLOPs over the measured bf16 matmul peak: 4 N per token run (2 N forward,
            # 2 N back to the inputs; LoRA computes no gradient for the N base weights, so the
            # usual 6 N would count work nobody does and exceed 100 %).
            "mfu": 4 * n_params * tokens_per_step / step / (peak * 1e12), "runs": len(mine)}
    trl = {k: v for k, v in by_config.items() if k.startswith("trl")}
    best = max(trl, key=lambda k: trl[k]["supervised_tokens_per_second"])

    def ratios(ours: dict) -> dict:
        return {"speedup_vs_trl_best": ours["supervised_tokens_per_second"]
                / trl[best]["supervised_tokens_per_second"],
                "speedup_vs_trl_default": ours["supervised_tokens_per_second"]
                / trl["trl_default"]["supervised_tokens_per_second"],
                "memory_ratio_vs_trl_best": ours["peak_rss_mb"] / trl[best]["peak_rss_mb"]}
    return {
        "configs": by_config, "bf16_matmul_peak_tflops": peak, "first_step_loss": loss_check,
        "trl_best_config": best,
        **ratios(by_config["ours_packed"]),
        "with_activation_checkpointing": ratios(by_config["ours_packed_ckpt"]),
        "packed_vs_unpacked_final_loss_difference": abs(
            by_config["ours_packed"]["final_loss"] - by_config["ours_unpacked"]["final_loss"]),
    }


def markdown(summary: dict, meta: dict) -> str:
    rows = ["| configuration | supervised tok/s | step s (median) | peak RSS while training, MB "
            "| MFU | final loss |",
            "|---|---|---|---|---|---|"]
    for name, c in summary["configs"].items():
        rows.append(f"| {name} | {c['supervised_tokens_per_second']:.1f} | "
                    f"{c['median_step_seconds']:.2f} | {c['peak_rss_mb']:.0f} | "
                    f"{100 * c['mfu']:.1f}% | {c['final_loss']:.4f} |")
    first = summary["first_step_loss"]
    rows += ["", f"- ours vs TRL best ({summary['trl_best_config']}): "
             f"**{summary['speedup_vs_trl_best']:.2f}×** supervised tokens/s at "
             f"**{summary['memory_ratio_vs_trl_best']:.2f}×** its peak memory",
             f"- ours vs TRL defaults: **{summary['speedup_vs_trl_default']:.2f}×**",
             "- ours with activation checkpointing vs TRL best: "
             f"{summary['with_activation_checkpointing']['speedup_vs_trl_best']:.2f}× at "
             f"{summary['with_activation_checkpointing']['memory_ratio_vs_trl_best']:.2f}× memory",
             f"- first-step loss: TRL {first['trl_first_loss']:.5f}, ours "
             f"{first['our_first_loss']:.5f} (relative difference "
             f"{first['relative_difference']:.1e})",
             f"- packed vs unpacked final loss: difference "
             f"{summary['packed_vs_unpacked_final_loss_difference']:.4f}",
             f"- bf16 matmul peak measured: {summary['bf16_matmul_peak_tflops']:.3f} TFLOP/s "
             f"({THREADS} threads); MFU = 4·N·tokens/s / peak (LoRA: no base-weight gradients), "
             "tokens the model ran (a shared prefix once per row)",
             f"- {meta['reps']} interleaved repetitions × {meta['steps']} timed steps "
             f"(+{meta['warmup']} warm-up) of {BATCH} examples; {meta['seconds']:.0f} s in all"]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--loss-check", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--render", action="store_true",
                        help="summarise the runs recorded in the results JSON again, measure nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.render:
        recorded = json.loads((RESULTS / "sft_vs_trl.json").read_text())
        meta = recorded["meta"]
        summary = summarise(recorded["runs"], recorded["first_step_loss"],
                            recorded["bf16_matmul_peak_tflops"], meta["n_params"])
        return write_results(summary, meta, recorded["runs"])
    if args.child:
        sys.stdout.write(json.dumps(child(args.child, args.steps, args.warmup)) + "\n")
        return 0
    from training.model import registry

    model_dir = registry.resolve_model(registry.BUILTIN_MODEL_ID)
    if args.loss_check:
        sys.stdout.write(json.dumps(first_loss_check(model_dir)) + "\n")
        return 0
    started = time.monotonic()
    peak = matmul_peak_tflops()
    loss_check = spawn(["--loss-check"])
    runs = []
    for rep in range(args.reps):
        for config in CONFIGS if rep % 2 == 0 else CONFIGS[::-1]:
            result = spawn(["--child", config, "--steps", str(args.steps),
                            "--warmup", str(args.warmup)])
            log.warning("rep %d %s: %.1f supervised tok/s, peak %.0f MB", rep, config,
                        result["supervised_tokens_per_second"], result["peak_rss_mb"])
            runs.append(result)
    n_params = sum(p.numel() for p in registry.load_model(model_dir).parameters())
    summary = summarise(runs, loss_check, peak, n_params)
    meta = {"reps": args.reps, "steps": args.steps, "warmup": args.warmup,
            "seconds": time.monotonic() - started, "threads": THREADS, "batch": BATCH,
            "lora": LORA, "n_params": n_params}
    return write_results(summary, meta, runs)


def write_results(summary: dict, meta: dict, runs: list[dict]) -> int:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sft_vs_trl.json").write_text(json.dumps({**summary, "meta": meta, "runs": runs},
                                                        indent=2))
    (RESULTS / "sft_vs_trl.md").write_text(markdown(summary, meta))
    sys.stdout.write(markdown(summary, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
