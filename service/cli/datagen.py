"""``tuneserve data self-instruct SEED_FILE --model M --count N [--follow]``: grow an
instruction dataset from seed tasks with a served model (``/v1/data_generation/jobs``).

``--follow`` polls the job and its events until it ends, drawing a progress bar over the
examples kept (rich, on a terminal; one line per round otherwise) with how many candidates each
filter removed, then prints the result file's id. Exit status: 0 succeeded, 1 failed,
2 cancelled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from service.cli.client import Client, emit_json, make_client
from service.cli.jobs import EXIT_CODES, _file_id

POLL_S = 1.0


def add_command(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    data = sub.add_parser("data", help="generate training data with a served model")
    dsub = data.add_subparsers(dest="data_command", required=True)
    si = dsub.add_parser("self-instruct", parents=[common],
                         help="grow an instruction dataset from seed tasks (Self-Instruct)")
    si.add_argument("seed_file", help="a file id, or a local file of seed tasks (uploaded "
                    "first): Self-Instruct's instruction + instances, or any instruction format")
    si.add_argument("--model", "-m", required=True, help="the generator: a base or ft: model")
    si.add_argument("--count", "-n", type=int, required=True, help="examples to generate")
    si.add_argument("--temperature", type=float)
    si.add_argument("--top-p", type=float)
    si.add_argument("--max-tokens", type=int, help="per generator reply")
    si.add_argument("--seed", type=int)
    si.add_argument("--instance-temperature", type=float,
                    help="for the instances (default 0: greedy, as the paper)")
    si.add_argument("--prompts-per-round", type=int, help="instruction prompts sent together")
    si.add_argument("--rouge-l-threshold", type=float,
                    help="drop candidates this similar to a pool instruction (default 0.7)")
    si.add_argument("--follow", "-f", action="store_true", help="then follow it to its end")
    si.set_defaults(func=cmd_self_instruct)


def cmd_self_instruct(args: argparse.Namespace) -> int:
    client = make_client(args, timeout=600)
    body = {"seed_file": _file_id(client, args.seed_file, args.json), "model": args.model,
            "count": args.count}
    sampling = {k: v for k, v in {"temperature": args.temperature, "top_p": args.top_p,
                                  "max_tokens": args.max_tokens, "seed": args.seed,
                                  "instance_temperature": args.instance_temperature}.items()
                if v is not None}
    if sampling:
        body["sampling"] = sampling
    if args.rouge_l_threshold is not None:
        body["filters"] = {"rouge_l_threshold": args.rouge_l_threshold}
    if args.prompts_per_round is not None:
        body["prompts_per_round"] = args.prompts_per_round
    job = client.post("/data_generation/jobs", body)
    if args.json and not args.follow:
        emit_json(job)
        return 0
    if not args.json:
        _write(f"created {job['id']} ({job['status']}): {job['count']} examples with "
               f"{job['model']} from {job['seed_tasks']} seed tasks")
    return follow(client, job["id"], as_json=args.json) if args.follow else 0


def _removed(removed: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in removed.items() if v) or "none"


def follow(client: Client, job_id: str, *, as_json: bool = False) -> int:
    path = f"/data_generation/jobs/{job_id}"
    view = _Bar() if sys.stdout.isatty() and not as_json else None
    last: str | None = None
    try:
        while True:
            job = client.get(path)
            page = client.get(f"{path}/events", after=last, limit=1000)
            for event in page["data"]:
                last = event["id"]
                if as_json:
                    _write(json.dumps(event))
                elif view is not None and event["type"] == "metrics":
                    view.update(event["data"])
                elif event["type"] == "metrics":
                    _write(_line(event["data"]))
                elif view is not None:
                    view.console.print(event["message"], markup=False)
                else:
                    _write(f"{event['level']:5}  {event['message']}")
            if job["status"] in EXIT_CODES and not page["has_more"]:
                break
            time.sleep(POLL_S)
    finally:
        if view is not None:
            view.stop()
    if as_json:
        _write(json.dumps(job))
    else:
        line = f"job {job['id']}: {job['status']}"
        if job.get("result_file"):
            line += f"; {job['examples']} examples in {job['result_file']}"
        if job.get("error"):
            line += f": {job['error'].get('message')}"
        _write(line + f" (removed: {_removed(job.get('removed') or {})})")
    return EXIT_CODES.get(job["status"], 1)


def _line(data: dict) -> str:
    count, done = data["count"], data["examples"]
    filled = int(20 * min(done, count) / count) if count else 0
    return (f"round {data['round']}: examples {done}/{count} [{'#' * filled}{'-' * (20 - filled)}]"
            f" {100 * done // max(count, 1):3d}%  candidates {data['candidates']}, removed: "
            f"{_removed(data['removed'])}")


class _Bar:
    """A live bar over the examples kept, redrawn in place (rich)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.console = Console(highlight=False)
        self.bar = Progress(TextColumn("examples"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[stats]}"), console=self.console,
                            transient=False)
        self.task = self.bar.add_task("examples", total=None, stats="")
        self.bar.start()

    def update(self, data: dict) -> None:
        self.bar.update(self.task, completed=data["examples"], total=data["count"],
                        stats=f"round {data['round']}, removed: {_removed(data['removed'])}")

    def stop(self) -> None:
        self.bar.stop()


def _write(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
