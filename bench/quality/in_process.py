"""Sort-task sweeps without the service: train ``SFTRecipe`` in this process, score greedily.

A quicker, noisier stand-in for ``demo.py`` when comparing settings (no Ray, no API, no
background processes; ~5 minutes for 1,600 examples here): builds the trainer exactly as a job
does, takes one epoch in the job's example order, then generates greedily for ``--n-eval``
held-out prompts (left-padded batches under bf16 autocast, at most 48 new tokens) and scores
them with ``service.cli.eval_tasks.is_correct``. Appends one JSON line per run to ``--out``, with the
misses (prompt and answer). ``--fp32`` trains without bf16 autocast.

``--lora-plus K`` trains the LoRA B matrices at K times the rate of the A matrices (LoRA+,
Hayou et al. 2024), an option the product does not have; it is here because it was measured.

Usage: ``python bench/quality/in_process.py --n 1600 [--batch 4] [--lrm 1.5] [--layers N] [--seed S --job-seed S] [--fp32]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "bench" / "quality")]

import make_data

from service.cli import eval_tasks
from service.core.storage.config import StorageConfig
from training.data import packing
from training.model import registry
from training.recipes.base import lr_lambda
from training.recipes.sft import SFTRecipe
from training.spec import TrainSpec


def sort_trainer(n: int, batch: int, r: int = 32, lrm: float | str = "auto",
                 layers: int | None = None, bf16: bool = True, seed: int = 0,
                 job_seed: int = 42) -> SFTRecipe:
    """A set-up single-process trainer on ``n`` sort examples, as a job would build it.

    ``seed`` picks the training lists, ``job_seed`` the job's own seed (its example order)."""
    rows = make_data.datasets("sort", n, 0, seed=seed)["sort-train.chat.jsonl"]
    file_id = "file-" + "0" * 24
    spec = TrainSpec(job_id="ftjob-" + "0" * 24,
                     base_model=str(registry.resolve_model(registry.BUILTIN_MODEL_ID)),
                     training_files=((file_id, 1.0),), n_epochs=1, batch_size=batch,
                     lora_r=r, lora_alpha=2 * r, cpus_per_worker=2,
                     learning_rate_multiplier=lrm, lora_layers=layers, bf16=bf16,
                     seed=job_seed)
    trainer = SFTRecipe(spec, StorageConfig(uri=tempfile.mkdtemp()))  # rank 0 of 1
    trainer.storage.put(f"files/{file_id}/content", make_data.to_jsonl(rows).encode())
    trainer.setup()
    return trainer


def train(args: argparse.Namespace) -> SFTRecipe:
    trainer = sort_trainer(args.n, args.batch, args.r, args.lrm, args.layers or None,
                           bf16=not args.fp32, seed=args.seed, job_seed=args.job_seed)
    if args.lora_plus != 1:
        named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
        lr = trainer.hp.learning_rate
        groups = [{"params": [p for n, p in named if "lora_B" not in n], "lr": lr},
                  {"params": [p for n, p in named if "lora_B" in n], "lr": lr * args.lora_plus}]
        trainer.optimizer = torch.optim.AdamW(groups, lr=lr,
                                              weight_decay=trainer.spec.weight_decay, fused=True)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer,
                                                              lr_lambda(trainer.total_steps))
    order = packing.epoch_order(trainer.train_sources, trainer.weights, trainer.spec.seed, 0)
    for step in range(trainer.total_steps):
        trainer.step_at(order, step)
    return trainer


@torch.no_grad()
def exact_match(trainer: SFTRecipe, n_eval: int, seed: int = 0) -> tuple[float, list[dict]]:
    """The share of ``n_eval`` held-out lists sorted exactly, and the misses."""
    model, tokenizer = trainer.model, trainer.tokenizer
    model.eval()
    tokenizer.padding_side = "left"
    held = eval_tasks.heldout("sort", n_eval, seed)
    misses = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(held), 25):
            chunk = held[i:i + 25]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": e.prompt}],
                                                   tokenize=False, add_generation_prompt=True)
                     for e in chunk]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**batch, max_new_tokens=48, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            for example, row in zip(chunk, out[:, batch["input_ids"].shape[1]:], strict=True):
                answer = tokenizer.decode(row, skip_special_tokens=True)
                if not eval_tasks.is_correct("sort", answer, example.output):
                    misses.append({"prompt": example.prompt, "answer": answer})
    return 1 - len(misses) / len(held), misses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1600, help="training examples")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lrm", type=float, default=1.5, help="learning-rate multiplier")
    parser.add_argument("--r", type=int, default=32, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--lora-plus", type=float, default=1.0)
    parser.add_argument("--layers", type=int, default=0, help="adapt the last N layers (0: all)")
    parser.add_argument("--fp32", action="store_true", help="train without bf16 autocast")
    parser.add_argument("--n-eval", type=int, default=200)
    # demo.py --seed S gives the job the seed S too: --seed S --job-seed S stands in for it.
    parser.add_argument("--seed", type=int, default=0, help="the training and held-out lists")
    parser.add_argument("--job-seed", type=int, default=42, help="the job's seed (its order)")
    parser.add_argument("--out", default="/tmp/in_process.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    began = time.time()
    trainer = train(args)
    seconds = time.time() - began
    score, misses = exact_match(trainer, args.n_eval, args.seed)
    result = {**vars(args), "steps": trainer.total_steps, "train_s": round(seconds),
              "exact_match": score, "misses": misses}
    print(json.dumps(result))
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
