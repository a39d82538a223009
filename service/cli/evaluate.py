"""``tuneserve eval MODEL --task sort|extract``: score a model on held-out prompts over the API.

Every prompt goes through ``POST /v1/chat/completions`` with greedy decoding (temperature 0),
several at a time (the chat engine batches them). Reported:

* ``exact_match``: answers equal to the reference (``service.cli.eval_tasks.is_correct``), with
  its 95 % Wilson interval (``exact_match_ci95``): how far the held-out sample's figure may be
  from the model's true rate;
* ``valid_json``: answers that parse as JSON (a sorted list in Python notation does too);
* ``end_of_turn``: answers that ended at the model's end-of-turn token (``finish_reason``
  "stop") rather than at the length cap ("length").

The prompts are the task's seeded held-out set (never in a training set made by
``bench/quality/make_data.py`` with the same seed), or a chat JSONL given with ``--file`` whose
last assistant message is the reference.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.cli import eval_tasks
from service.cli.client import Client, CliError, emit_json, make_client


@dataclass(frozen=True)
class Case:
    prompt: str
    reference: str


@dataclass(frozen=True)
class Answer:
    prompt: str
    reference: str
    answer: str
    finish_reason: str | None
    completion_tokens: int
    correct: bool
    valid_json: bool


def add_command(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    cmd = sub.add_parser("eval", parents=[common],
                         help="score a model on held-out prompts (exact match, JSON, end of turn)")
    cmd.add_argument("model")
    cmd.add_argument("--task", required=True, choices=sorted(eval_tasks.TASKS))
    cmd.add_argument("--n", type=int, default=200, help="held-out prompts to score")
    cmd.add_argument("--seed", type=int, default=0, help="the data seed (as make_data.py)")
    cmd.add_argument("--file", help="a chat JSONL of held-out conversations instead")
    cmd.add_argument("--max-tokens", type=int, default=64, help="the length cap per answer")
    cmd.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    cmd.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.n < 1 or args.concurrency < 1 or args.max_tokens < 1:
        raise CliError("--n, --concurrency and --max-tokens must be ≥ 1")
    cases = load_cases(args)
    client = make_client(args, timeout=900)
    started = time.monotonic()
    answers = run_cases(client, args.model, args.task, cases, max_tokens=args.max_tokens,
                        concurrency=args.concurrency)
    report = summarize(args.model, args.task, answers, time.monotonic() - started)
    if args.json:
        emit_json({**report, "answers": [asdict(a) for a in answers]})
    else:
        write_report(report, answers)
    return 0


def load_cases(args: argparse.Namespace) -> list[Case]:
    if not args.file:
        if args.n > eval_tasks.HELDOUT_POOL:
            raise CliError(f"--n is at most {eval_tasks.HELDOUT_POOL} for the built-in "
                           "held-out set")
        return [Case(e.prompt, e.output) for e in eval_tasks.heldout(args.task, args.n, args.seed)]
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"no such file: {path}")
    cases = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            user = [m["content"] for m in messages if m["role"] == "user"][-1]
            reference = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        except (ValueError, KeyError, IndexError, TypeError):
            reference = None
        if reference is None:
            raise CliError(f"{path}:{number}: expected {{\"messages\": [..., user, assistant]}} "
                           "with the reference answer last")
        cases.append(Case(user, reference))
    return cases[:args.n]


def run_cases(client: Client, model: str, task: str, cases: list[Case], *, max_tokens: int,
              concurrency: int) -> list[Answer]:
    def ask(case: Case) -> Answer:
        body = {"model": model, "messages": [{"role": "user", "content": case.prompt}],
                "temperature": 0, "max_tokens": max_tokens}
        reply: dict[str, Any] = client.post("/chat/completions", body)
        choice = reply["choices"][0]
        text = choice["message"]["content"] or ""
        return Answer(case.prompt, case.reference, text, choice.get("finish_reason"),
                      int((reply.get("usage") or {}).get("completion_tokens", 0)),
                      eval_tasks.is_correct(task, text, case.reference),
                      eval_tasks.parse_json(text.strip())[0])

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(ask, cases))


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion (the textbook formula; unlike the normal
    approximation it stays inside 0..1 and is sound near 0 % and 100 %)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


def summarize(model: str, task: str, answers: list[Answer], seconds: float) -> dict[str, Any]:
    n = len(answers)

    def share(flags: list[bool]) -> float:
        return round(sum(flags) / n, 4) if n else 0.0
    hits = sum(a.correct for a in answers)
    return {"model": model, "task": task, "n": n,
            "exact_match": share([a.correct for a in answers]),
            "exact_match_ci95": list(wilson_interval(hits, n)),
            "valid_json": share([a.valid_json for a in answers]),
            "end_of_turn": share([a.finish_reason == "stop" for a in answers]),
            "mean_completion_tokens": round(statistics.fmean(
                [a.completion_tokens for a in answers]), 1) if n else 0.0,
            "seconds": round(seconds, 1)}


def write_report(report: dict[str, Any], answers: list[Answer], shown: int = 3) -> None:
    out = sys.stdout
    out.write(f"{report['model']} on {report['task']} ({report['n']} held-out prompts, "
              f"{report['seconds']} s)\n")
    low, high = report["exact_match_ci95"]
    out.write(f"  exact match  {report['exact_match']:.1%}  (95 % interval {low:.1%}-{high:.1%})\n"
              f"  valid JSON   {report['valid_json']:.1%}\n"
              f"  end of turn  {report['end_of_turn']:.1%}  (the rest hit the length cap)\n"
              f"  mean answer  {report['mean_completion_tokens']} tokens\n")
    wrong = [a for a in answers if not a.correct][:shown]
    for a in wrong:
        out.write(f"  e.g. {a.prompt!r}\n    expected {a.reference!r}\n    got      "
                  f"{a.answer[:200]!r} ({a.finish_reason})\n")
