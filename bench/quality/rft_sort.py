"""Reinforcement fine-tuning after SFT, through the public API: the sort task on SmolLM2.

One command: start ``tuneserve up`` (unless ``--base-url``), train the SFT sort adapter as
``demo.py`` does (or start from ``--sft-model``), evaluate it on held-out lists, run a
``method: reinforcement`` job from that ``ft:`` model with a ``string_check`` grader on exact
match (``{{sample.output_text}}`` eq ``{{item.answer}}``), evaluate the result on the same
held-out lists, and write ``bench/results/quality-rft.{json,md}``. The goal: half the SFT
model's held-out error, answers still ending at end-of-turn.

    python bench/quality/rft_sort.py                              # SFT, then RFT
    python bench/quality/rft_sort.py --sft-model ft:…             # RFT from a given adapter
    python bench/quality/rft_sort.py --n-eval 1000 --n-rft 256

The best settings measured so far (``bench/results/quality-rft-amx.md``: 93.1 % → 95.2 %):
``--one-digit --n-rft 2048 --rft-batch 32 --compute-multiplier 2 --rft-lr-multiplier 4``;
``--hard`` in place of ``--one-digit`` did as well (95.0 %), no better.

The RFT prompts are sort lists of the training stream (``eval_tasks.train``, another seed than
the SFT set), never a held-out list. With ``--select-misses N`` they are the ones the SFT model
gets wrong among N such lists, found by an eval run of it through ``/v1/evals`` (greedy, as the
held-out eval): a prompt it already answers right at every sample teaches nothing (its group's
rewards are all equal), and the held-out misses are of the kind these are.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo

from service.cli import eval_tasks
from service.cli import evaluate as cli_eval
from service.cli.client import Client
from training.cpu.info import cpu_description

GRADER = {"type": "string_check", "name": "exact match", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}", "operation": "eq"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--sft-model", help="an ft: sort model to start from (else SFT first)")
    extra.add_argument("--n-rft", type=int, default=256, help="RFT training prompts")
    extra.add_argument("--n-rft-valid", type=int, default=32, help="RFT validation prompts")
    extra.add_argument("--rft-batch", type=int, default=8, help="prompts per RFT step")
    extra.add_argument("--rft-epochs", type=int, default=1)
    extra.add_argument("--compute-multiplier", type=float, default=2.0,
                       help="group size = 4 x this (completions per prompt)")
    extra.add_argument("--rft-lr-multiplier", type=float, default=1.0)
    extra.add_argument("--eval-interval", type=int, default=8)
    extra.add_argument("--rft-temperature", type=float,
                       help="the rollouts' sampling temperature (else the service's default, 1)")
    extra.add_argument("--unscaled-rewards", action="store_true",
                       help="scale_rewards: false (Dr. GRPO's advantages, not divided by the "
                            "group's spread)")
    extra.add_argument("--hard-prompt-samples", type=int, default=0,
                       help="hard_prompt_samples: more completions for a prompt whose group "
                            "scored alike and below the step's mean")
    extra.add_argument("--rft-seed", type=int,
                       help="seed of the RFT lists (else --seed; the held-out lists follow --seed), "
                            "so a second round from an RFT model trains on lists it never saw")
    extra.add_argument("--beside", help="what else ran on the machine (for the results)")
    extra.add_argument("--select-misses", type=int, metavar="N",
                       help="RFT on the lists the SFT model gets wrong among N training lists "
                            "(else on the first --n-rft)")
    extra.add_argument("--hard", action="store_true",
                       help="RFT prompts only from lists of 6 or 7 numbers that hold a one-digit "
                            "or a repeated number (where most of the SFT model's misses are)")
    extra.add_argument("--one-digit", action="store_true",
                       help="RFT prompts only from lists holding a one-digit number (where the "
                            "SFT model's misses are)")
    known, rest = extra.parse_known_args(argv)
    args = demo.parse_args(rest)
    for key, value in vars(known).items():
        setattr(args, key, value)
    return args


def is_hard(values: list[int]) -> bool:
    """A list of the kind most misses are of: 6 or 7 numbers, one of them one-digit or
    repeated."""
    return len(values) >= 6 and (min(values) < 10 or len(set(values)) < len(values))


def rft_rows(n: int, seed: int, one_digit: bool = False, hard: bool = False
             ) -> list[dict[str, Any]]:
    """Sort prompts with their answers (the grader's ``item.answer``), none held out; with
    ``one_digit``, only lists that hold a number under 10; with ``hard``, only ``is_hard``
    ones."""
    rows = []
    for e in eval_tasks.train("sort", 5 * n if one_digit or hard else n, seed=seed + 1000):
        values = json.loads(e.output)
        if (not one_digit or min(values) < 10) and (not hard or is_hard(values)):
            rows.append({"messages": [{"role": "user", "content": e.prompt}], "answer": e.output})
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} RFT prompts of the {n} asked for")
    return rows[:n]


def misses(client: Client, args: argparse.Namespace, model: str,
           rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows whose greedy answer by ``model`` is not exactly the sorted list (an eval run
    of ``rows``, graded as the held-out eval grades), and what the run found."""
    started = time.monotonic()
    run = cli_eval.EvalRun(client, args.task)
    answers = run.answers(model, [cli_eval.Case(r["messages"][0]["content"], r["answer"])
                                  for r in rows], max_tokens=args.max_tokens)
    wrong = {a.prompt for a in answers
             if not eval_tasks.is_correct(args.task, a.answer, a.reference)}
    kept = [r for r in rows if r["messages"][0]["content"] in wrong]
    demo.say(args, f"  {len(kept)} of {len(rows)} answered wrong")
    return kept, {**run.summary, "candidates": len(rows), "misses": len(kept),
                  "seconds": round(time.monotonic() - started)}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run_rft(client: Client, args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    jobs: dict[str, Any] = {}
    sft_model = args.sft_model
    if sft_model is None:
        demo.say(args, "[1/4] SFT: the sort adapter")
        sft = demo.run_sft(client, args, data_dir)
        sft_model = sft["jobs"]["sft"]["fine_tuned_model"]
        jobs["sft"] = sft["jobs"]["sft"]
        before = sft["rows"]["tuned"]
    else:
        demo.say(args, f"[1/4] evaluating {sft_model} on {args.n_eval} held-out lists")
        before = demo.evaluate(client, args, sft_model)
    n_train = args.select_misses or args.n_rft
    rft_seed = args.seed if args.rft_seed is None else args.rft_seed
    rows = rft_rows(n_train + args.n_rft_valid, rft_seed, args.one_digit, args.hard)
    train_rows, valid_rows = rows[:n_train], rows[n_train:]
    selection = None
    if args.select_misses:
        demo.say(args, f"[2/4] finding the SFT model's misses among {n_train} training lists")
        train_rows, selection = misses(client, args, sft_model, train_rows)
    demo.say(args, f"[2/4] uploading {len(train_rows)} RFT prompts")
    train = demo.upload(client, args, write_jsonl(data_dir / "rft-train.jsonl", train_rows))
    valid = demo.upload(client, args, write_jsonl(data_dir / "rft-valid.jsonl", valid_rows))
    demo.say(args, "[3/4] reinforcement fine-tuning")
    body = {"model": sft_model, "training_file": train, "validation_file": valid,
            "suffix": "rft", "seed": args.seed,
            "method": {"type": "reinforcement", "reinforcement": {
                "grader": GRADER, "hyperparameters": {
                    "n_epochs": args.rft_epochs, "batch_size": args.rft_batch,
                    "learning_rate_multiplier": args.rft_lr_multiplier,
                    "compute_multiplier": args.compute_multiplier,
                    "eval_interval": args.eval_interval, "eval_samples": args.n_rft_valid,
                    **({} if args.rft_temperature is None
                       else {"temperature": args.rft_temperature}),
                    **({"scale_rewards": False} if args.unscaled_rewards else {}),
                    **({"hard_prompt_samples": args.hard_prompt_samples}
                       if args.hard_prompt_samples else {})}}}}
    jobs["rft"] = demo.run_job(client, args, body)
    events = demo.all_events(client, jobs["rft"]["id"])
    settings = next((e["data"] for e in events if "initial_score" in (e.get("data") or {})), {})
    jobs["rft"].update(hyperparameters=settings.get("hyperparameters"),
                       total_steps=settings.get("total_steps"),
                       initial_score=settings.get("initial_score"))
    curve = [{k: e["data"].get(k) for k in ("step", "reward_mean", "zero_signal_share", "kl",
                                            "completion_length", "valid_score", "hard_prompts",
                                            "hard_prompts_rescued")}
             for e in events if e.get("type") == "metrics"]
    demo.say(args, f"[4/4] evaluating {jobs['rft']['fine_tuned_model']}")
    after = demo.evaluate(client, args, jobs["rft"]["fine_tuned_model"])
    return {"kind": "rft", "rows": {"SFT": before, "SFT + RFT": after}, "jobs": jobs,
            "selection": selection,
            "curve": curve,
            "error_before": 1 - before["exact_match"], "error_after": 1 - after["exact_match"]}


def markdown(result: dict[str, Any]) -> str:
    text = demo.markdown(result)
    halved = result["error_after"] <= result["error_before"] / 2
    if result.get("selection"):
        chosen = result["selection"]
        text += (f"\nRFT prompts: the {chosen['misses']} lists the SFT model answered wrong among "
                 f"{chosen['candidates']} training lists (eval run `{chosen['run_id']}`, "
                 f"{chosen['seconds']} s).\n")
    text += (f"\nHeld-out error: {result['error_before']:.1%} after SFT, "
             f"{result['error_after']:.1%} after RFT ({'halved' if halved else 'not halved'}).\n")
    initial = result["jobs"]["rft"].get("initial_score")
    if initial is not None:
        text += f"\nValidation score before training (step 0, the same prompts): {initial:.3f}.\n"
    if result["curve"]:
        hard = result["curve"][0].get("hard_prompts") is not None
        text += ("\n| step | mean reward | zero-signal groups | KL | completion tokens | "
                 "validation score |" + (" hard prompts (now with a signal) |" if hard else "")
                 + "\n|---|---|---|---|---|---|" + ("---|" if hard else "") + "\n")
        for c in result["curve"]:
            held = "" if c["valid_score"] is None else f"{c['valid_score']:.3f}"
            text += (f"| {c['step']} | {c['reward_mean']:.3f} | {c['zero_signal_share']:.2f} | "
                     f"{c['kl']:.4f} | {c['completion_length']:.1f} | {held} |"
                     + (f" {c['hard_prompts']} ({c['hard_prompts_rescued']}) |" if hard else "")
                     + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    meta = {"task": "sort", "model": args.model, "n_train": args.n_train, "n_eval": args.n_eval,
            "max_tokens": args.max_tokens, "seed": args.seed, "load_before": os.getloadavg(),
            "machine": cpu_description()
                       + (f", {args.beside}" if args.beside else ""),
            "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
            "command": "python " + " ".join(shlex.quote(a) for a in
                                            ["bench/quality/rft_sort.py",
                                             *(argv or sys.argv[1:])])}
    with demo.service(args) as base_url, tempfile.TemporaryDirectory(prefix="rft-data-") as tmp:
        client = Client(base_url, args.api_key, timeout=900)
        body = run_rft(client, args, Path(tmp))
    result = {**meta, **body, "total_seconds": round(time.time() - started)}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "quality-rft.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "quality-rft.md").write_text(markdown(result))
    sys.stdout.write("\n" + markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
