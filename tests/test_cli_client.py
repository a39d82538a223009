"""The CLI's client commands without a running service: local validation, one-line errors,
and ``jobs follow``'s exit status, driven against the app through FastAPI's TestClient."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.cli.client import Client, upload_file
from service.cli.jobs import follow
from service.core.names import new_job_id
from service.jobs.store import JobRecord, JobStore
from service.core.settings import Settings
from tests.helpers import REPO, free_port
from service.core.events import EventLog

GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}]})


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli.main", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=120)


def test_validate_names_each_broken_line_and_exits_1(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n[1, 2]\n{GOOD}\n{{\"messages\": []}}\n")
    out = run("files", "validate", str(path))
    assert out.returncode == 1
    assert f"{path}:2: " in out.stdout and f"{path}:4: " in out.stdout
    assert f"{path}:1: " not in out.stdout and "2 problems in 4 lines" in out.stdout
    as_json = json.loads(run("files", "validate", str(path), "--json").stdout)
    assert as_json["ok"] is False and [p["line"] for p in as_json["problems"]] == [2, 4]


def test_validate_describes_a_good_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n{GOOD}\n")
    out = run("files", "validate", str(path))
    assert out.returncode == 0
    assert "OK, 2 examples in format openai_chat (sft), 1 duplicates" in out.stdout
    assert "warning: line 2 duplicates line 1" in out.stdout


def test_an_unreachable_service_is_one_line_not_a_traceback():
    out = run("jobs", "list", "--base-url", f"http://127.0.0.1:{free_port()}/v1")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "cannot connect to" in out.stderr
    missing = run("files", "upload", "/no/such/file.jsonl")
    assert missing.returncode == 1
    assert missing.stderr == "tuneserve: no such file: /no/such/file.jsonl\n"


@pytest.fixture
def api(tmp_path):
    app = create_app(Settings(storage=str(tmp_path / "storage"), builtin_models=False,
                              tiny_model=False))
    client = Client("http://testserver/v1", None)
    client.http = TestClient(app, base_url="http://testserver/v1")
    return app, client


def finished_job(app, status: str, steps: int) -> str:
    storage = app.state.storage
    job = JobRecord(id=new_job_id(), created_at=int(time.time()), model="tuneserve/tiny-llama",
                    training_file="file-" + "0" * 24, seed=1, organization_id="local",
                    status=status)
    JobStore(storage).create(job)
    events = EventLog(storage, job.id)
    for step in range(1, steps + 1):
        events.metrics({"step": step, "train_loss": 1.0 / step,
                        "train_mean_token_accuracy": 0.5}, 10)
    events.add(f"The job was {status}", level="error" if status == "failed" else "info")
    return job.id


@pytest.mark.parametrize(("status", "code"), [("succeeded", 0), ("failed", 1), ("cancelled", 2)])
def test_follow_replays_the_events_and_exits_by_the_outcome(api, capsys, status, code):
    app, client = api
    job_id = finished_job(app, status, 3)
    assert follow(client, job_id) == code
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == [
        "1/10", "2/10", "3/10"]
    assert "loss 0.3333  acc 0.500" in out and f"The job was {status}" in out
    assert out.rstrip().endswith(f"job {job_id}: {status}")


def test_upload_sends_the_file_through_the_progress_reader(api, tmp_path):
    _, client = api
    path = tmp_path / "train.jsonl"
    path.write_text(f"{GOOD}\n")
    uploaded = upload_file(client, path)
    assert uploaded["bytes"] == path.stat().st_size and uploaded["filename"] == "train.jsonl"


def test_follow_shows_the_dpo_step_metrics_by_name():
    from service.cli.jobs import Progress

    progress = Progress()
    progress.update({"created_at": 1, "data": {
        "step": 3, "total_steps": 8, "train_loss": 0.5, "rewards/chosen": -0.1,
        "rewards/rejected": -1.4, "rewards/accuracies": 1.0, "rewards/margins": 1.3,
        "valid_rewards/margins": 9.0}})
    assert progress.stats == ("loss 0.5000  chosen -0.100  rejected -1.400  reward acc 1.000  "
                              "margin 1.300")


def test_follow_shows_an_eta_from_the_steps_own_times():
    from service.cli.jobs import LineView

    view = LineView()
    lines = []
    view.write = lines.append
    for step, at in ((1, 100), (2, 110), (3, 120)):  # 10 s a step, 7 steps to go after step 3
        view.event({"type": "metrics", "created_at": at, "data": {
            "step": step, "total_steps": 10, "train_loss": 1.0, "train_mean_token_accuracy": 0.5}})
    assert lines[0].endswith("eta --:--")  # one step tells no pace yet
    assert lines[-1].startswith("step 3/10 [######--------------]  30%")
    assert lines[-1].endswith("eta 1:10"), lines[-1]


def test_upload_feeds_the_whole_file_to_the_progress_bar_and_files_list_shows_it(
        api, tmp_path, monkeypatch, capsys):
    import argparse

    from service.cli import client as cli_client

    _, client = api
    fed = []

    class Counting(cli_client._ProgressReader):
        def __init__(self, file, advance):
            super().__init__(file, lambda n: (fed.append(n), advance(n)))

    monkeypatch.setattr(cli_client, "_ProgressReader", Counting)
    monkeypatch.setattr(cli_client, "make_client", lambda args, timeout=60.0: client)
    path = tmp_path / "train.jsonl"
    path.write_text(f"{GOOD}\n" * 3)
    uploaded = upload_file(client, path)
    assert sum(fed) == path.stat().st_size  # the bar reaches the file's size

    assert cli_client.cmd_files_list(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "BYTES", "CREATED", "PURPOSE", "FILENAME", "EXAMPLES"]
    assert [line.split()[0] for line in out[1:]] == [uploaded["id"]]
    assert f"{path.stat().st_size}" in out[1] and "train.jsonl" in out[1]
    assert cli_client.cmd_files_list(argparse.Namespace(json=True)) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [f["id"] for f in listed["data"]] == [uploaded["id"]]
