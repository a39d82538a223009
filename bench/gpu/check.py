"""The prepared GPU check (issue 35): training and chat on one GPU, against the CPU and against
TRL / ``transformers.generate``, in one table. ``bench/gpu/check.sh`` runs it; docs/gpu.md says
how to carry what it needs to a machine without network.

Needs torch, transformers, peft, accelerate (on the GPU machine already), trl and this repo's
small pure-Python dependencies; never Ray or vLLM. Sections:

1. parity: two steps of our SFT and DPO recipes on the built-in model (``--device cpu``: the tiny
   one), on the device in fp32 and bf16, against the CPU in fp32 (before and after one update);
2. our SFT step against TRL's ``SFTTrainer`` with packing, same data, LoRA and full fine-tuning,
   on a Llama of ~1B parameters with random weights (``--device cpu``: a small one);
3. our chat engine on the device: greedy tokens equal to the CPU's; decode tokens/s at batch 1
   and 16 against ``generate`` of a PEFT-wrapped model.

Usage: ``python -m bench.gpu.check [--device cuda|cpu] [--out bench/results/gpu-check.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
BATCH = 8
MODELS = {"cuda": "HuggingFaceTB/SmolLM2-135M-Instruct", "cpu": "tuneserve/tiny-llama"}
"""The model of the parity and engine checks: the built-in one on a GPU; on a CPU (the check's
end-to-end run) the tiny one, so that the run takes minutes."""
SIZES = {  # the Llama for the TRL comparison: ~1.1B parameters on a GPU, ~30M on a CPU
    "cuda": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
             "num_attention_heads": 32, "num_key_value_heads": 4, "steps": 6, "examples": 64},
    "cpu": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "steps": 3, "examples": 32},
}
FILE_ID = "file-" + "0" * 24
JOB_ID = "ftjob-" + "0" * 24


# -- 1. parity -----------------------------------------------------------------------------------

def recipe_losses(method: str, model_id: str, device: str, bf16: bool, steps: int = 2
                  ) -> list[float]:
    """The loss of ``steps`` steps of our recipe (rank 0 of 1, no Ray) on ``model_id``."""
    from service.core.storage.config import StorageConfig
    from training.recipes.context import WorkerContext
    from training.spec import TrainSpec

    if method == "sft":
        from bench.sft_vs_trl import synthetic_chats
        from training.recipes.sft import SFTRecipe as Recipe

        lines = synthetic_chats(BATCH * steps)
    else:
        import sys

        sys.path.insert(0, str(ROOT / "bench" / "data"))
        from make_preferences import make_preferences

        from training.recipes.dpo import DPORecipe as Recipe

        lines = make_preferences(BATCH * steps, 0, seed=0)[0]
    spec = TrainSpec(job_id=JOB_ID, base_model=model_id,
                     training_files=((FILE_ID, 1.0),), method=method, n_epochs=1,
                     batch_size=BATCH, lora_r=16, lora_alpha=32, max_length=512, bf16=bf16,
                     use_gpu=device == "cuda", cpus_per_worker=0 if device == "cuda" else 2)
    torch.manual_seed(0)
    recipe = Recipe(spec, StorageConfig(uri=tempfile.mkdtemp(prefix="gpu-check-")),
                    WorkerContext(device=torch.device(device)))
    recipe.storage.put(f"files/{FILE_ID}/content",
                       "\n".join(json.dumps(line) for line in lines).encode())
    recipe.setup()
    losses = []
    for step in range(steps):
        sums = recipe.train_step(recipe.train_examples[step * BATCH:(step + 1) * BATCH])
        metrics = recipe.eval_metrics(dict(zip(recipe.SUMS, sums.tolist(), strict=True)))
        losses.append(float(metrics["loss"]))
    return losses


def parity(device: str) -> list[dict[str, Any]]:
    rows = []
    for method in ("sft", "dpo"):
        reference = recipe_losses(method, MODELS[device], "cpu", bf16=False)
        for bf16, bound in ((False, 1e-3), (True, 2e-2)):
            got = recipe_losses(method, MODELS[device], device, bf16)
            worst = max(abs(g - r) / abs(r) for g, r in zip(got, reference, strict=True))
            rows.append({"check": f"{method} step loss, {device} {'bf16' if bf16 else 'fp32'} "
                                  "vs cpu fp32", "cpu": reference, "device": got,
                         "relative_difference": worst, "bound": bound, "ok": worst <= bound})
    return rows


# -- 2. against TRL ------------------------------------------------------------------------------

def llama_dir(device: str) -> Path:
    """A Llama of the size for ``device`` with random weights and the built-in tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.model import registry

    size = {k: v for k, v in SIZES[device].items() if k not in ("steps", "examples")}
    out = Path(tempfile.mkdtemp(prefix="gpu-check-llama-"))
    tokenizer = registry._load_builtin_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         max_position_embeddings=2048, tie_word_embeddings=False, **size)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def ours_sft(model_dir: Path, device: str, full: bool, examples: list[dict], steps: int) -> dict:
    from service.core.storage.config import StorageConfig
    from training.recipes.context import WorkerContext
    from training.recipes.sft import SFTRecipe
    from training.spec import TrainSpec

    spec = TrainSpec(job_id=JOB_ID, base_model=str(model_dir), training_files=((FILE_ID, 1.0),),
                     n_epochs=1, batch_size=BATCH, lora_r=16, lora_alpha=32, max_length=1024,
                     full_finetune=full, use_gpu=device == "cuda",
                     cpus_per_worker=0 if device == "cuda" else 2)
    recipe = SFTRecipe(spec, StorageConfig(uri=tempfile.mkdtemp(prefix="gpu-check-")),
                       WorkerContext(device=torch.device(device)))
    recipe.storage.put(f"files/{FILE_ID}/content",
                       "\n".join(json.dumps(e) for e in examples).encode())
    recipe.setup()
    _peak_reset(device)
    recipe.train_step(recipe.train_examples[:BATCH])  # warm-up (kernels, allocator)
    supervised, elapsed = 0, 0.0
    for step in range(1, steps):
        batch = recipe.train_examples[step * BATCH:(step + 1) * BATCH]
        started = time.perf_counter()
        sums = dict(zip(recipe.SUMS, recipe.train_step(batch).tolist(), strict=True))
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - started
        supervised += int(sums["supervised"])
    return {"tokens_per_s": supervised / elapsed, "peak_gib": _peak_gib(device)}


def trl_sft(model_dir: Path, device: str, full: bool, examples: list[dict], steps: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from training.model import chat, registry

    tokenizer = registry.load_tokenizer(model_dir)
    rows = [chat.tokenize_conversation(tokenizer, e["messages"], 1024) for e in examples]
    mean_len = sum(len(r.input_ids) for r in rows) / len(rows)
    timing: dict[str, Any] = {"times": [], "supervised": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            timing["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            timing["times"].append(time.perf_counter() - timing["start"])

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            timing["supervised"].append(int((inputs["labels"][:, 1:] != -100).sum()))
            return super().training_step(model, inputs, num_items_in_batch)

    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="gpu-check-trl-"), max_steps=steps,
                     per_device_train_batch_size=1, packing=True,
                     max_length=int(mean_len * BATCH), learning_rate=1e-4,
                     bf16=device == "cuda", use_cpu=device == "cpu", report_to="none",
                     save_strategy="no", logging_steps=1, disable_tqdm=True,
                     dataloader_num_workers=0, seed=0)
    dataset = Dataset.from_dict({"input_ids": [r.input_ids for r in rows],
                                 "labels": [r.labels for r in rows]})
    model = registry.load_model(model_dir, torch.float32, attn_implementation="sdpa")
    peft = None if full else LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                        target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = Counting(model=model, args=args, train_dataset=dataset, callbacks=[Timer()],
                       peft_config=peft)
    _peak_reset(device)
    trainer.train()
    tokens, times = timing["supervised"][1:], timing["times"][1:]  # the first warms up
    return {"tokens_per_s": sum(tokens) / sum(times), "peak_gib": _peak_gib(device)}


def against_trl(device: str) -> list[dict[str, Any]]:
    from bench.sft_vs_trl import synthetic_chats

    size = SIZES[device]
    model_dir = llama_dir(device)
    examples = synthetic_chats(size["examples"])
    rows = []
    for full in (False, True):
        ours = ours_sft(model_dir, device, full, examples, size["steps"])
        trl = trl_sft(model_dir, device, full, examples, size["steps"])
        rows.append({"check": f"SFT step {'full' if full else 'LoRA'} vs TRL SFTTrainer packing",
                     "ours_tokens_per_s": ours["tokens_per_s"],
                     "trl_tokens_per_s": trl["tokens_per_s"],
                     "ratio": ours["tokens_per_s"] / trl["tokens_per_s"],
                     "ours_peak_gib": ours["peak_gib"], "trl_peak_gib": trl["peak_gib"]})
    return rows


# -- 3. the chat engine --------------------------------------------------------------------------

def engine_checks(device: str) -> list[dict[str, Any]]:
    from peft import LoraConfig, get_peft_model

    from serving.engine.native import Engine
    from serving.engine.sampling import SamplingParams
    from training.model import chat, registry

    model_id = MODELS[device]
    dtype = "bfloat16" if device == "cuda" else "float32"
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "2+2?", "Hi"]
    greedy = SamplingParams(max_tokens=24, temperature=0)
    answers = {}
    for where in ("cpu", device):
        engine = Engine.for_base_model(model_id, dtype=dtype if where == device else "float32",
                                       device=where, max_batch=16)
        prompts = [chat.render_prompt(engine.tokenizer, [{"role": "user", "content": q}])
                   for q in questions]
        answers[where] = [engine.generate(p, greedy).text for p in prompts]
        if where == device:
            rates = {b: _engine_rate(engine, prompts[0], b) for b in (1, 16)}
        engine.close()
    rows = [{"check": f"engine greedy on {device} ({dtype}) vs cpu fp32",
             "equal": sum(a == b for a, b in zip(answers["cpu"], answers[device], strict=True)),
             "of": len(questions)}]
    model_dir = registry.resolve_model(model_id)
    tokenizer = registry.load_tokenizer(model_dir)
    model = registry.load_model(model_dir, getattr(torch, dtype)).to(device)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    prompt = chat.render_prompt(tokenizer, [{"role": "user", "content": questions[0]}])
    for batch in (1, 16):
        ids = torch.tensor([prompt] * batch, device=device)
        ours = rates[batch]
        theirs = _generate_rate(peft, ids, device)
        rows.append({"check": f"decode tokens/s at batch {batch} vs generate + PEFT",
                     "ours_tokens_per_s": ours, "generate_tokens_per_s": theirs,
                     "ratio": ours / theirs})
    return rows


def _engine_rate(engine: Any, prompt: list[int], batch: int, tokens: int = 64) -> float:
    from serving.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eot=True)
    list(engine.submit(prompt, params))  # warm-up
    started = time.perf_counter()
    generations = [engine.submit(prompt, params) for _ in range(batch)]
    for generation in generations:
        list(generation)
    return batch * tokens / (time.perf_counter() - started)


def _generate_rate(model: Any, ids: torch.Tensor, device: str, tokens: int = 64) -> float:
    kwargs = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False,
              "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        model.generate(ids, **kwargs)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(ids, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
    return ids.shape[0] * tokens / (time.perf_counter() - started)


# -- the table -----------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| check | result |", "| --- | --- |"]
    for row in rows:
        rest = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "check")
        lines.append(f"| {row['check']} | {rest} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", choices=["parity", "trl", "engine"], action="append")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU")
    started = time.perf_counter()
    sections = {"parity": parity, "trl": against_trl, "engine": engine_checks}
    rows: list[dict[str, Any]] = []
    for name in args.only or sections:
        t0 = time.perf_counter()
        rows += sections[name](args.device)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else
            platform.processor() or platform.machine(), "torch": torch.__version__,
            "seconds": round(time.perf_counter() - started)}
    report = (f"GPU check on {meta['device']} (torch {meta['torch']}, --device {args.device}), "
              f"{meta['seconds']} s\n\n{table(rows)}\n")
    print("\n" + report)
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text("# " + report)
    failed = [r["check"] for r in rows if r.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
