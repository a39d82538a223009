"""The dashboard and /metrics over FastAPI's TestClient with a local store: log-in, tenancy,
the curves drawn from a job's metrics events (SFT and DPO), and Prometheus text."""

from __future__ import annotations

import io
import json
import re
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api.app import create_app
from service.core.names import new_job_id
from service.jobs.store import JobRecord, JobStore
from service.core.settings import Settings
from service.core.events import EventLog

KEYS = {"key-alice-0001": "alice", "key-bob-0002": "bob"}


@pytest.fixture
def app(tmp_path):
    # No base model: uploads are then described without token counts, and no tokenizer loads.
    return create_app(Settings(storage=str(tmp_path / "storage"), api_keys=KEYS,
                               builtin_models=False, tiny_model=False))


def logged_in(app, key: str = "key-alice-0001") -> TestClient:
    client = TestClient(app)
    response = client.post("/ui/login", data={"api_key": key}, follow_redirects=False)
    assert response.status_code == 303
    return client


def add_job(app, tenant: str, steps: int, *, dpo: bool = False, status: str = "succeeded") -> str:
    storage = app.state.storage
    job = JobRecord(id=new_job_id(), created_at=int(time.time()), model="tuneserve/tiny-llama",
                    training_file="file-" + "0" * 24, seed=1, organization_id=tenant,
                    status=status, method={"type": "dpo" if dpo else "supervised"})
    JobStore(storage).create(job)
    events = EventLog(storage, job.id)
    events.add("Fine-tuning job started")
    for step in range(1, steps + 1):
        data = {"step": step, "train_loss": 2.0 / step, "train_mean_token_accuracy": step / 10,
                "tokens_per_second": 100.0 * step}
        if step % 2 == 0:
            data["valid_loss"] = 2.2 / step
        if dpo:
            data |= {"rewards/margins": 0.1 * step, "rewards/accuracies": 0.5 + step / 100}
        events.metrics(data, steps)
    return job.id


def test_login_sets_an_httponly_strict_cookie_and_a_bad_key_is_refused(app):
    client = TestClient(app)
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/login"
    refused = client.post("/ui/login", data={"api_key": "nope"})
    assert refused.status_code == 401 and "not valid" in refused.text
    ok = client.post("/ui/login", data={"api_key": "key-alice-0001"}, follow_redirects=False)
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    page = client.get("/ui")
    assert page.status_code == 200 and "tenant: alice" in page.text
    assert "script-src 'nonce-" in page.headers["content-security-policy"]


def test_a_cookie_signed_post_needs_the_dashboard_header(app):
    client = logged_in(app)
    body = {"model": "tuneserve/tiny-llama", "training_file": "file-" + "0" * 24}
    forged = client.post("/v1/fine_tuning/jobs", json=body)
    assert forged.status_code == 401 and forged.json()["error"]["code"] == "missing_ui_header"
    from_ui = client.post("/v1/fine_tuning/jobs", json=body, headers={"X-Tuneserve-UI": "1"})
    # Authenticated: what is wrong now is the request itself (no such model here).
    assert from_ui.status_code == 400 and from_ui.json()["error"]["param"] == "model"


def test_jobs_page_lists_only_the_callers_jobs_with_progress(app):
    mine = add_job(app, "alice", 4, status="running")
    theirs = add_job(app, "bob", 3)
    page = logged_in(app).get("/ui").text
    assert f'data-job-id="{mine}"' in page and theirs not in page
    assert '<progress value="4" max="4">' in page
    assert logged_in(app).get(f"/ui/jobs/{theirs}").status_code == 404


def test_job_page_draws_one_point_per_reported_step(app):
    job_id = add_job(app, "alice", 6)
    page = logged_in(app).get(f"/ui/jobs/{job_id}").text
    loss = re.findall(r'<circle class="point" data-series="train_loss" data-step="(\d+)"', page)
    assert [int(s) for s in loss] == [1, 2, 3, 4, 5, 6]
    assert len(re.findall(r'data-series="valid_loss" data-step=', page)) == 3
    assert len(re.findall(r'data-series="train_mean_token_accuracy" data-step=', page)) == 6
    assert 'data-chart="margin"' not in page  # no DPO numbers, no reward chart
    assert "Step 6/6: training loss=0.3333" in page  # the events


def test_dpo_job_page_draws_reward_margin_and_accuracy(app):
    job_id = add_job(app, "alice", 5, dpo=True)
    page = logged_in(app).get(f"/ui/jobs/{job_id}").text
    margin = page[page.index('data-chart="margin"'):]
    assert len(re.findall(r'data-series="rewards/margins" data-step=', margin)) == 5
    accuracy = page[page.index('data-chart="accuracy"'):page.index('data-chart="margin"')]
    assert len(re.findall(r'data-series="rewards/accuracies" data-step=', accuracy)) == 5


def test_metrics_are_prometheus_text_and_count_jobs_and_uploads(app):
    add_job(app, "alice", 4)
    add_job(app, "bob", 2, status="running")
    client = TestClient(app)
    data = "\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                              {"role": "assistant", "content": "a"}]})
                     for i in range(3)).encode()
    uploaded = client.post("/v1/files", headers={"Authorization": "Bearer key-bob-0002"},
                           files={"file": ("t.jsonl", io.BytesIO(data))},
                           data={"purpose": "fine-tune"})
    assert uploaded.status_code == 200, uploaded.text
    assert client.get("/metrics").status_code == 401  # a key, like every route but the probes
    # Any tenant's key: no one's data is in it (alice reads bob's upload among the totals).
    metrics = client.get("/metrics", headers={"Authorization": "Bearer key-alice-0001"})
    assert metrics.status_code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.text)
               for s in family.samples}
    assert samples[("tuneserve_jobs", (("status", "succeeded"),))] == 1
    assert samples[("tuneserve_jobs", (("status", "running"),))] == 1
    assert samples[("tuneserve_training_steps_total", ())] == 6
    # Throughput of the running jobs only (bob's, at its latest step), not of finished ones.
    assert samples[("tuneserve_training_tokens_per_second", ())] == 200.0
    assert samples[("tuneserve_upload_bytes_total", (("outcome", "accepted"),))] >= len(data)
    route = (("method", "POST"), ("route", "/v1/files"), ("status", "200"))
    assert samples[("tuneserve_http_requests_total", route)] == 1  # the template, not the path
    assert not any("alice" in str(key) or "ftjob" in str(key) for key in samples)
