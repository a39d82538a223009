"""``tuneserve eval MODEL --task sort|extract``: score a model on held-out prompts, as a client
of the Evals API (``/v1/evals``).

The built-in tasks are ready-made evals: the first ``tuneserve eval --task sort`` creates the
eval "tuneserve: sort" (items ``{"prompt", "reference"}``, one ``string_check`` criterion: the
answer equals the reference) and later ones reuse it. The held-out items are uploaded as a file
of purpose ``evals`` and run with greedy decoding (temperature 0); the server samples them many
at a time (the chat engine batches them) off its API replica. Reported from the run's items:

* ``exact_match``: answers equal to the reference (``service.cli.eval_tasks.is_correct``), with
  its 95 % Wilson interval (``exact_match_ci95``): how far the held-out sample's figure may be
  from the model's true rate; ``pass_rate`` is the eval's own criterion (for ``sort`` the same
  up to surrounding whitespace; for ``extract`` the exact JSON text, where exact match compares
  the parsed objects);
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
    cmd.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.n < 1 or args.max_tokens < 1:
        raise CliError("--n and --max-tokens must be ≥ 1")
    cases = load_cases(args)
    client = make_client(args, timeout=900)
    started = time.monotonic()
    run = EvalRun(client, args.task, file=args.file)
    answers = run.answers(args.model, cases, max_tokens=args.max_tokens)
    report = {**summarize(args.model, args.task, answers, time.monotonic() - started),
              **run.summary}
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


ITEM_SCHEMA = {"type": "object", "required": ["prompt", "reference"],
               "properties": {"prompt": {"type": "string"}, "reference": {"type": "string"}}}
EXACT = {"type": "string_check", "name": "exact match", "operation": "eq",
         "input": "{{sample.output_text}}", "reference": "{{item.reference}}"}
TASK_KEY = "tuneserve_task"
"""The metadata key that marks a ready-made eval of a built-in task."""
POLL_S = 1.0


class EvalRun:
    """One run of the task's eval (created on first use) on a model, through ``/v1/evals``."""

    def __init__(self, client: Client, task: str, *, file: str | None = None):
        self.client, self.task, self.file = client, task, file
        self.summary: dict[str, Any] = {}

    def eval_id(self) -> str:
        if self.file is None:
            for found in self._evals():
                if (found.get("metadata") or {}).get(TASK_KEY) == self.task:
                    return found["id"]
        name = f"tuneserve: {self.task}" + (f" ({Path(self.file).name})" if self.file else "")
        metadata = {TASK_KEY: self.task} if self.file is None else None
        created = self.client.post("/evals", {
            "name": name, "metadata": metadata, "testing_criteria": [EXACT],
            "data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA}})
        return created["id"]

    def _evals(self) -> list[dict[str, Any]]:
        found, after = [], None
        while True:
            page = self.client.get("/evals", limit=100, after=after)
            found += page["data"]
            if not page["has_more"]:
                return found
            after = page["last_id"]

    def answers(self, model: str, cases: list[Case], *, max_tokens: int) -> list[Answer]:
        eval_id = self.eval_id()
        lines = "".join(json.dumps({"item": {"prompt": c.prompt, "reference": c.reference}})
                        + "\n" for c in cases)
        upload = self.client.request("POST", "/files", data={"purpose": "evals"},
                                     files={"file": ("items.jsonl", lines.encode())})
        run = self.client.post(f"/evals/{eval_id}/runs", {
            "name": f"tuneserve eval {model}", "data_source": {
                "type": "completions", "model": model,
                "source": {"type": "file_id", "id": upload["id"]},
                "input_messages": {"type": "template", "template": [
                    {"role": "user", "content": "{{item.prompt}}"}]},
                "sampling_params": {"temperature": 0, "max_completion_tokens": max_tokens}}})
        while run["status"] not in ("completed", "failed", "canceled"):
            time.sleep(POLL_S)
            run = self.client.get(f"/evals/{eval_id}/runs/{run['id']}")
        self.client.request("DELETE", f"/files/{upload['id']}")
        if run["status"] != "completed":
            raise CliError(f"eval run {run['id']} {run['status']}: "
                           f"{(run.get('error') or {}).get('message', '')}")
        counts = run["result_counts"]
        self.summary = {"eval_id": eval_id, "run_id": run["id"],
                        "pass_rate": round(counts["passed"] / counts["total"], 4)
                        if counts["total"] else 0.0}
        return [self._answer(item) for item in self._items(eval_id, run["id"])]

    def _items(self, eval_id: str, run_id: str) -> list[dict[str, Any]]:
        items, after = [], None
        while True:
            page = self.client.get(f"/evals/{eval_id}/runs/{run_id}/output_items", limit=1000,
                                   after=after)
            items += page["data"]
            if not page["has_more"]:
                return items
            after = page["last_id"]

    def _answer(self, item: dict[str, Any]) -> Answer:
        sample, case = item["sample"], item["datasource_item"]
        text = (sample["output"] or [{}])[0].get("content") or ""
        return Answer(case["prompt"], case["reference"], text, sample["finish_reason"],
                      int((sample.get("usage") or {}).get("completion_tokens", 0)),
                      eval_tasks.is_correct(self.task, text, case["reference"]),
                      eval_tasks.parse_json(text.strip())[0])


def run_cases(client: Client, model: str, task: str, cases: list[Case], *,
              max_tokens: int) -> list[Answer]:
    """The model's answers to ``cases``, graded, through one eval run."""
    return EvalRun(client, task).answers(model, cases, max_tokens=max_tokens)


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
    if "run_id" in report:
        out.write(f"  pass rate    {report['pass_rate']:.1%}  (the eval's criterion; eval "
                  f"{report['eval_id']}, run {report['run_id']})\n")
    wrong = [a for a in answers if not a.correct][:shown]
    for a in wrong:
        out.write(f"  e.g. {a.prompt!r}\n    expected {a.reference!r}\n    got      "
                  f"{a.answer[:200]!r} ({a.finish_reason})\n")
