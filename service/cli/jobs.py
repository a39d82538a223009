"""``tuneserve jobs …``: create, list, get, cancel, and follow a job live.

``jobs follow`` reads the job's event stream (``GET …/events?stream=true``, server-sent events
until the job ends) and shows the status, a progress bar over steps with an ETA, the latest loss
and token accuracy, and every event as it comes. On a terminal the bar is drawn in place
(rich); otherwise each step is one line, so a log or a test sees the steps advance. It exits 0
when the job succeeded, 1 when it failed and 2 when it was cancelled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from service.cli.client import (CliError, Client, emit_json, make_client, show_list, stderr,
                                upload_file, when)

EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 2}
RECONNECTS = 30
"""A dropped event stream (an API replica restarting) is re-opened this often, a second apart."""


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    jobs = sub.add_parser("jobs", help="create, watch and manage fine-tuning jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)

    create = jsub.add_parser("create", parents=[common], help="start a fine-tuning job")
    create.add_argument("--model", "-m", required=True, help="base model or ft:… model to tune")
    create.add_argument("--training-file", "-t", required=True,
                        help="a file id, or a local JSONL path (uploaded first)")
    create.add_argument("--validation-file", "-v", help="a file id or a local JSONL path")
    create.add_argument("--method", choices=("supervised", "dpo"), default="supervised")
    create.add_argument("--n-epochs", type=int)
    create.add_argument("--batch-size", type=int)
    create.add_argument("--lr-multiplier", type=float, help="learning rate multiplier")
    create.add_argument("--beta", type=float, help="DPO beta (with --method dpo)")
    create.add_argument("--suffix", help="part of the tuned model's name")
    create.add_argument("--seed", type=int)
    create.add_argument("--follow", "-f", action="store_true", help="then follow it to its end")
    create.set_defaults(func=cmd_create)

    jsub.add_parser("list", parents=[common], help="list your jobs").set_defaults(func=cmd_list)
    for name, func, text in (("get", cmd_get, "show one job"),
                             ("cancel", cmd_cancel, "cancel an unfinished job"),
                             ("follow", cmd_follow, "watch a job live until it ends")):
        command = jsub.add_parser(name, parents=[common], help=text)
        command.add_argument("job_id")
        command.set_defaults(func=func)


# --- create, list, get, cancel --------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    if args.beta is not None and args.method != "dpo":
        raise CliError("--beta applies to --method dpo only")
    client = make_client(args, timeout=600)
    body: dict[str, Any] = {"model": args.model,
                            "training_file": _file_id(client, args.training_file, args.json)}
    if args.validation_file:
        body["validation_file"] = _file_id(client, args.validation_file, args.json)
    hp = {k: v for k, v in {"n_epochs": args.n_epochs, "batch_size": args.batch_size,
                            "learning_rate_multiplier": args.lr_multiplier,
                            "beta": args.beta}.items() if v is not None}
    body["method"] = {"type": args.method, args.method: {"hyperparameters": hp}}
    if args.suffix is not None:
        body["suffix"] = args.suffix
    if args.seed is not None:
        body["seed"] = args.seed
    job = client.post("/fine_tuning/jobs", body)
    if args.json and not args.follow:
        emit_json(job)
        return 0
    if not args.json:
        sys.stdout.write(f"created {job['id']} ({job['status']}): tuning {job['model']} on "
                         f"{job['training_file']}\n")
        sys.stdout.flush()
    return follow(client, job["id"], as_json=args.json) if args.follow else 0


def _file_id(client: Client, value: str, quiet: bool) -> str:
    """A file id as is; a local path is uploaded first."""
    path = Path(value)
    if path.is_file():
        uploaded = upload_file(client, path, quiet=quiet)
        if not quiet:
            stderr(f"uploaded {path} as {uploaded['id']}")
        return uploaded["id"]
    if value.startswith("file-"):
        return value
    raise CliError(f"{value!r} is neither a local file nor a file id (file-…)")


def cmd_list(args: argparse.Namespace) -> int:
    return show_list(args, make_client(args).get("/fine_tuning/jobs", limit=100),
                     ["ID", "STATUS", "MODEL", "CREATED", "FINE-TUNED MODEL"],
                     lambda j: [j["id"], j["status"], j["model"], when(j["created_at"]),
                                j.get("fine_tuned_model")])


def cmd_get(args: argparse.Namespace) -> int:
    job = make_client(args).get(f"/fine_tuning/jobs/{_job_id(args.job_id)}")
    if args.json:
        emit_json(job)
        return 0
    _describe(job)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = make_client(args).post(f"/fine_tuning/jobs/{_job_id(args.job_id)}/cancel")
    if args.json:
        emit_json(job)
    else:
        sys.stdout.write(f"{job['id']}: {job['status']}\n")
    return 0


def _job_id(value: str) -> str:
    # Keep a typo from turning into another path of the API.
    if not value.replace("-", "").replace("_", "").isalnum():
        raise CliError(f"not a job id: {value!r}")
    return value


def _describe(job: dict) -> None:
    method = job.get("method") or {}
    kind = method.get("type", "supervised")
    hp = ((method.get(kind) or {}).get("hyperparameters")) or job.get("hyperparameters") or {}
    lines = [("id", job["id"]), ("status", job["status"]), ("model", job["model"]),
             ("method", kind), ("hyperparameters",
                                ", ".join(f"{k}={v}" for k, v in hp.items())),
             ("training file", job["training_file"]),
             ("validation file", job.get("validation_file")),
             ("created", when(job["created_at"])), ("finished", when(job.get("finished_at"))),
             ("fine-tuned model", job.get("fine_tuned_model")),
             ("trained tokens", job.get("trained_tokens")),
             ("error", (job.get("error") or {}).get("message"))]
    for name, value in lines:
        if value not in (None, ""):
            sys.stdout.write(f"{name + ':':<18}{value}\n")


# --- follow ---------------------------------------------------------------------------------


def cmd_follow(args: argparse.Namespace) -> int:
    return follow(make_client(args), _job_id(args.job_id), as_json=args.json)


def follow(client: Client, job_id: str, *, as_json: bool = False) -> int:
    job = client.get(f"/fine_tuning/jobs/{job_id}")
    view = JsonView() if as_json else (TerminalView() if sys.stdout.isatty() else LineView())
    view.start(job)
    seen: set[str] = set()
    try:
        for attempt in range(RECONNECTS + 1):
            try:
                for event in client.sse("GET", f"/fine_tuning/jobs/{job_id}/events",
                                        params={"stream": "true"}):
                    if event["id"] not in seen:
                        seen.add(event["id"])
                        view.event(event)
                break  # [DONE]: the job has ended
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError):
                if attempt == RECONNECTS:
                    raise
                time.sleep(1)
        job = client.get(f"/fine_tuning/jobs/{job_id}")
    finally:
        view.stop()
    view.end(job)
    return EXIT_CODES.get(job["status"], 1)


DPO_LABELS = {"rewards/chosen": "chosen", "rewards/rejected": "rejected",
              "rewards/accuracies": "reward acc", "rewards/margins": "margin"}
"""The DPO step metrics the live view shows (the training ones; validation comes at checkpoints)."""


class Progress:
    """Step, loss, accuracy and an ETA from the metrics events' own timestamps (so a replay of
    a job's history on attach does not look like a burst of speed)."""

    def __init__(self) -> None:
        self.step = 0
        self.total: int | None = None
        self.stats = ""
        self._first: tuple[int, int] | None = None  # (step, created_at)
        self.eta: float | None = None

    def update(self, event: dict) -> None:
        data = event.get("data") or {}
        self.step, self.total = data.get("step", self.step), data.get("total_steps", self.total)
        if self._first is None:
            self._first = (self.step, event["created_at"])
        done = self.step - self._first[0]
        if done > 0 and self.total:
            per_step = (event["created_at"] - self._first[1]) / done
            self.eta = per_step * (self.total - self.step)
        parts = [f"loss {data['train_loss']:.4f}"] if data.get("train_loss") is not None else []
        if data.get("train_mean_token_accuracy") is not None:
            parts.append(f"acc {data['train_mean_token_accuracy']:.3f}")
        if data.get("valid_loss") is not None:
            parts.append(f"valid loss {data['valid_loss']:.4f}")
        for key, label in DPO_LABELS.items():
            if isinstance(data.get(key), (int, float)):
                parts.append(f"{label} {data[key]:.3f}")
        self.stats = "  ".join(parts)

    def eta_text(self) -> str:
        if self.eta is None:
            return "eta --:--"
        minutes, seconds = divmod(int(self.eta), 60)
        return f"eta {minutes}:{seconds:02d}"


class LineView:
    """One line per event; metrics as ``step 3/8 [####----] 37% loss … eta 0:12``."""

    def __init__(self) -> None:
        self.progress = Progress()

    def start(self, job: dict) -> None:
        self.write(f"job {job['id']}: {job['status']} (model {job['model']})")

    def event(self, event: dict) -> None:
        if event.get("type") == "metrics":
            self.progress.update(event)
            self.write(self.metrics_line())
        else:
            self.write(f"{when(event['created_at'])}  {event.get('level', 'info'):5}  "
                       f"{event['message']}")

    def metrics_line(self) -> str:
        p = self.progress
        total = p.total or 0
        filled = int(20 * p.step / total) if total else 0
        pct = f"{100 * p.step // total:3d}%" if total else ""
        return (f"step {p.step}/{total or '?'} [{'#' * filled}{'-' * (20 - filled)}] {pct}  "
                f"{p.stats}  {p.eta_text()}")

    def stop(self) -> None:
        pass

    def end(self, job: dict) -> None:
        line = f"job {job['id']}: {job['status']}"
        if job.get("fine_tuned_model"):
            line += f"; model {job['fine_tuned_model']}"
        if job.get("error"):
            line += f": {job['error'].get('message')}"
        self.write(line)

    def write(self, line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class TerminalView(LineView):
    """Events scroll above a live progress bar (rich), redrawn in place."""

    def start(self, job: dict) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn

        self.console = Console(highlight=False)
        self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[stats]}  {task.fields[eta]}"),
                       console=self.console, transient=True)
        self.task = self.bar.add_task(job["status"], total=None, stats="", eta="")
        self.bar.start()
        self.write(f"job {job['id']}: {job['status']} (model {job['model']})")

    def event(self, event: dict) -> None:
        if event.get("type") == "metrics":
            self.progress.update(event)
            self.bar.update(self.task, description="running", completed=self.progress.step,
                            total=self.progress.total, stats=self.progress.stats,
                            eta=self.progress.eta_text())
        else:
            super().event(event)

    def stop(self) -> None:
        self.bar.stop()
        if self.progress.step:
            super().write(self.metrics_line())

    def write(self, line: str) -> None:
        self.console.print(line, markup=False)


class JsonView:
    """One JSON object per line: every event, then the final job."""

    def start(self, job: dict) -> None:
        pass

    def event(self, event: dict) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    def stop(self) -> None:
        pass

    def end(self, job: dict) -> None:
        sys.stdout.write(json.dumps(job) + "\n")

