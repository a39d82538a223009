"""Which held-out misses can a reward on exact match reach? Sampling at the held-out misses.

RFT learns from a prompt only when some of its sampled completions are right and some wrong.
For a sort model's greedy misses on the held-out lists (the eval ``demo.py`` runs, through
``/v1/evals``), this asks the chat endpoint for ``--samples`` completions of each at
``--temperature`` and counts the right ones. A miss with none right in 16 is one a group of 8
almost never learns from: its fix can only come from what other prompts teach.

    python bench/quality/rft_reach.py --base-url http://127.0.0.1:8011/v1 --n-eval 1000 \\
        --reach-model ft:HuggingFaceTB/SmolLM2-135M-Instruct:sort:ftjob-…
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo

from service.cli import eval_tasks
from service.cli import evaluate as cli_eval
from service.cli.client import Client
from service.core import limits
from training.cpu.info import cpu_description


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--reach-model", action="append", required=True,
                       help="a model whose misses to sample (repeat for several)")
    extra.add_argument("--samples", type=int, default=16, help="completions per miss")
    extra.add_argument("--temperature", type=float, default=1.0)
    known, rest = extra.parse_known_args(argv)
    args = demo.parse_args(rest)
    for key, value in vars(known).items():
        setattr(args, key, value)
    return args


def reach(client: Client, args: argparse.Namespace, model: str) -> list[int]:
    """For each greedy miss of ``model`` on the held-out lists: how many of ``--samples``
    sampled answers are exactly right."""
    answers = cli_eval.EvalRun(client, args.task).answers(model, demo.heldout_cases(args),
                                                           max_tokens=args.max_tokens)
    counts = []
    for a in answers:
        if a.correct:
            continue
        right = 0
        for start in range(0, args.samples, limits.MAX_CHOICES):  # the API's cap on ``n``
            out = client.post("/chat/completions", {
                "model": model, "messages": [{"role": "user", "content": a.prompt}],
                "n": min(limits.MAX_CHOICES, args.samples - start),
                "temperature": args.temperature, "max_tokens": args.max_tokens})
            right += sum(eval_tasks.is_correct(args.task, c["message"]["content"], a.reference)
                         for c in out["choices"])
        counts.append(right)
    return counts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"{cpu_description()}; {args.n_eval} held-out lists, {args.samples} samples per miss "
          f"at temperature {args.temperature:g}")
    with demo.service(args) as base_url:
        client = Client(base_url, args.api_key, timeout=900)
        for model in args.reach_model:
            counts = reach(client, args, model)
            spread = collections.Counter(counts)
            print(f"\n{model}: {len(counts)} misses; right samples of {args.samples} per miss: "
                  + ", ".join(f"{k}: {spread[k]}" for k in sorted(spread)))
            print(f"  none right: {spread[0]}; at least one right: {len(counts) - spread[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
