"""Task data for the before/after demo: training and held-out sets, in two formats.

Deterministic for a seed (the examples come from ``service.cli.eval_tasks``). For each task it writes

    DIR/<task>-train.chat.jsonl      {"messages": [user, assistant]}
    DIR/<task>-train.alpaca.jsonl    {"instruction", "input", "output"} (the seed's format)
    DIR/<task>-heldout.chat.jsonl    the held-out prompts with their reference answers
    DIR/<task>-heldout.alpaca.jsonl
    DIR/<task>-preference-train.jsonl / -preference-heldout.jsonl (with --preferences)
                                     {"prompt": [user], "chosen": concise, "rejected": rambling}

Both formats hold the same conversations: the service renders ``instruction`` + ``input`` as the
user message exactly as the chat file spells it. No held-out prompt is in a training set.

    python bench/quality/make_data.py --out DIR [--task sort] [--n-train 3000] [--n-heldout 200]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from service.cli import eval_tasks

OPENINGS = (
    "Sure! I would be happy to help you with this task.",
    "Of course. Let me go through this carefully, one step at a time.",
    "Great question! Here is what I found after looking at it closely.",
    "Okay, let me think about this for a moment before I answer.",
)
CLOSINGS = (
    "I hope this helps, and let me know if you need anything else!",
    "Please double-check it yourself in case I made a mistake somewhere.",
    "Feel free to ask me if you would like a more detailed explanation.",
)


def rambling(answer: str, rng: random.Random) -> str:
    """The same correct answer, wrapped in filler (the rejected response of a pair)."""
    return f"{rng.choice(OPENINGS)} The answer is {answer}. {rng.choice(CLOSINGS)}"


def preference(example: eval_tasks.Example, rng: random.Random) -> dict:
    return {"prompt": [{"role": "user", "content": example.prompt}],
            "chosen": example.output, "rejected": rambling(example.output, rng)}


def datasets(task: str, n_train: int, n_heldout: int, seed: int = 0,
             preferences: bool = False) -> dict[str, list[dict]]:
    """File name → rows, for one task."""
    train = eval_tasks.train(task, n_train, seed)
    held = eval_tasks.heldout(task, n_heldout, seed)
    files = {f"{task}-train.chat.jsonl": [e.chat() for e in train],
             f"{task}-train.alpaca.jsonl": [e.alpaca() for e in train],
             f"{task}-heldout.chat.jsonl": [e.chat() for e in held],
             f"{task}-heldout.alpaca.jsonl": [e.alpaca() for e in held]}
    if preferences:
        rng = random.Random(f"{task}:{seed}:preferences")
        files[f"{task}-preference-train.jsonl"] = [preference(e, rng) for e in train]
        files[f"{task}-preference-heldout.jsonl"] = [preference(e, rng) for e in held]
    return files


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write(out: Path, files: dict[str, list[dict]]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in files.items():
        paths[name] = out / name
        paths[name].write_text(to_jsonl(rows))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--task", choices=sorted(eval_tasks.TASKS), action="append",
                        help="repeat for several (default: all)")
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-heldout", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preferences", action="store_true",
                        help="also write preference pairs (concise vs rambling) for DPO")
    args = parser.parse_args(argv)
    for task in args.task or sorted(eval_tasks.TASKS):
        for name in write(args.out, datasets(task, args.n_train, args.n_heldout, args.seed,
                                             args.preferences)):
            sys.stdout.write(f"{args.out / name}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
