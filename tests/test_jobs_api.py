"""The jobs API without a cluster: validation at create, idempotency, tenancy, listing.

FastAPI's TestClient over a temporary local store and no job runner, so every job stays in
``validating_files``; the end-to-end tests (test_jobs_e2e.py) run real jobs on Ray.
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.core.settings import Settings

TINY = "tuneserve/tiny-llama"
KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}


def _chat_lines(n: int = 8) -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."},
                          {"role": "assistant", "content": f"{i}"}]} for i in range(n)]
    return "\n".join(json.dumps(r) for r in rows).encode() + b"\n"


def _pref_lines(n: int = 8) -> bytes:
    rows = [{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": f"Well, I think it is {i}."}
            for i in range(n)]
    return "\n".join(json.dumps(r) for r in rows).encode() + b"\n"


@pytest.fixture
def app(tmp_path):
    # The tiny model only: its tokenizer (SmolLM2's) describes uploads, and the built-in model is
    # never converted or loaded here.
    return create_app(Settings(storage=str(tmp_path / "store"), api_keys=KEYS,
                               builtin_models=False))


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        c.headers["Authorization"] = "Bearer key-a"
        yield c


def upload(client, content: bytes, key: str = "key-a", name: str = "train.jsonl") -> str:
    r = client.post("/v1/files", files={"file": (name, content)}, data={"purpose": "fine-tune"},
                    headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def create(client, **body):
    return client.post("/v1/fine_tuning/jobs", json={"model": TINY, **body})


def test_create_returns_openai_job_shape(client):
    file_id = upload(client, _chat_lines())
    r = create(client, training_file=file_id, suffix="demo", seed=7, metadata={"team": "x"},
               method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["id"].startswith("ftjob-") and job["object"] == "fine_tuning.job"
    assert job["status"] == "validating_files"
    assert job["organization_id"] == "tenant-a"
    assert job["model"] == TINY and job["training_file"] == file_id and job["seed"] == 7
    assert job["method"]["type"] == "supervised"
    assert job["method"]["supervised"]["hyperparameters"]["n_epochs"] == 2
    assert job["fine_tuned_model"] is None and job["metadata"] == {"team": "x"}
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert any("Created fine-tuning job" in e["message"] for e in events)


BAD_SPECS = [
    ({"model": "no/such-model"}, "model"),
    ({"training_file": "file-000000000000000000000000"}, "training_file"),
    ({"validation_file": "file-000000000000000000000000"}, "validation_file"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 51}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 257}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 3}}}}, "method.dpo.hyperparameters.beta"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"rpo_alpha": -1}}}},
     "method.dpo.hyperparameters.rpo_alpha"),
    ({"method": {"type": "rl"}}, "method.type"),
    ({"suffix": "x" * 65}, "suffix"),
    ({"suffix": "../etc"}, "suffix"),
    ({"seed": -1}, "seed"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"status": "succeeded"}, "status"),
    ({"organization_id": "tenant-b"}, "organization_id"),
    ({"fine_tuned_model": "ft:x"}, "fine_tuned_model"),
    ({"lora": {"r": 0}}, "lora.r"),
    ({"num_workers": 0}, "num_workers"),
]


@pytest.mark.parametrize("override,param", BAD_SPECS, ids=[p for _, p in BAD_SPECS])
def test_bad_spec_is_4xx_naming_the_param(client, override, param):
    file_id = upload(client, _chat_lines())
    before = client.get("/v1/fine_tuning/jobs").json()["data"]
    r = create(client, **{"training_file": file_id, **override})
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["message"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == before


def test_file_format_must_fit_the_method(client):
    chat, prefs = upload(client, _chat_lines()), upload(client, _pref_lines())
    r = create(client, training_file=prefs)
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_file"
    r = create(client, training_file=chat, method={"type": "dpo"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_file"
    assert create(client, training_file=prefs, method={"type": "dpo"}).status_code == 200


def test_other_tenants_file_and_job_are_not_found(client):
    theirs = upload(client, _chat_lines(), key="key-b")
    r = create(client, training_file=theirs)
    assert r.status_code == 404 and r.json()["error"]["param"] == "training_file"

    mine = create(client, training_file=upload(client, _chat_lines())).json()["id"]
    as_b = {"Authorization": "Bearer key-b"}
    for method, path in [("GET", f"/v1/fine_tuning/jobs/{mine}"),
                         ("GET", f"/v1/fine_tuning/jobs/{mine}/events"),
                         ("GET", f"/v1/fine_tuning/jobs/{mine}/checkpoints"),
                         ("POST", f"/v1/fine_tuning/jobs/{mine}/cancel"),
                         ("POST", f"/v1/fine_tuning/jobs/{mine}/pause")]:
        assert client.request(method, path, headers=as_b).status_code == 404, path
    assert client.get("/v1/fine_tuning/jobs", headers=as_b).json()["data"] == []
    assert client.get("/v1/fine_tuning/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/fine_tuning/jobs", headers={"Authorization": ""}).status_code == 401


def test_list_paginates_and_filters_by_metadata(client):
    file_id = upload(client, _chat_lines())
    ids = [create(client, training_file=file_id, metadata={"n": str(i % 2)}).json()["id"]
           for i in range(5)]
    page1 = client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert len(page1["data"]) == 2 and page1["has_more"]
    page2 = client.get("/v1/fine_tuning/jobs", params={"limit": 10,
                                                       "after": page1["data"][-1]["id"]}).json()
    assert not page2["has_more"]
    listed = [j["id"] for j in page1["data"] + page2["data"]]
    assert sorted(listed) == sorted(ids) and len(set(listed)) == 5
    odd = client.get("/v1/fine_tuning/jobs", params={"metadata[n]": "1"}).json()["data"]
    assert {j["id"] for j in odd} == {ids[1], ids[3]}


def test_idempotency_key_same_body_same_job_other_body_422(client):
    file_id = upload(client, _chat_lines())
    headers = {"Idempotency-Key": "abc-123"}
    body = {"model": TINY, "training_file": file_id, "suffix": "one"}
    first = client.post("/v1/fine_tuning/jobs", json=body, headers=headers)
    again = client.post("/v1/fine_tuning/jobs", json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = client.post("/v1/fine_tuning/jobs", json={**body, "suffix": "two"}, headers=headers)
    assert other.status_code == 422 and other.json()["error"]["param"] == "Idempotency-Key"
    # Without a key, two identical POSTs make two jobs.
    a = client.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    b = client.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    assert a != b


def test_idempotency_key_in_flight_is_409(app, client, monkeypatch):
    from service.api.routes import fine_tuning as jobs

    file_id = upload(client, _chat_lines())
    entered, release = threading.Event(), threading.Event()
    real = jobs._create_record

    def slow_create(*args, **kwargs):
        entered.set()
        assert release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "_create_record", slow_create)
    body = {"model": TINY, "training_file": file_id}
    results = {}
    t = threading.Thread(target=lambda: results.setdefault(
        "first", client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "k"})))
    t.start()
    assert entered.wait(10)
    second = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "k"})
    release.set()
    t.join(10)
    assert second.status_code == 409
    assert results["first"].status_code == 200


def test_sdk_retry_after_injected_503_makes_one_job(app):
    """The openai SDK retries a POST that got a 503, with the same headers: a caller's
    Idempotency-Key (the SDK sends none of its own for OpenAI) turns the retry into a replay."""
    calls = {"n": 0}

    class LoseFirstResponse:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http" and scope["method"] == "POST" \
                    and scope["path"] == "/v1/fine_tuning/jobs" and calls["n"] == 0:
                calls["n"] += 1
                # Run the request for real, then lose its response behind a 503.
                async def swallow(message):
                    pass
                await self.inner(scope, receive, swallow)
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": b'{"error": {"message": "x"}}'})
                return
            await self.inner(scope, receive, send)

    with TestClient(app) as c:
        c.headers["Authorization"] = "Bearer key-a"
        file_id = upload(c, _chat_lines())
    transport = httpx.ASGITransport(app=LoseFirstResponse(app))
    import asyncio

    async def run():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            sdk = openai.AsyncOpenAI(base_url="http://test/v1", api_key="key-a", http_client=http,
                                     max_retries=2)
            job = await sdk.fine_tuning.jobs.create(
                model=TINY, training_file=file_id, extra_headers={"Idempotency-Key": "retry-me"})
            listed = await sdk.fine_tuning.jobs.list()
            return job, [j.id for j in listed.data]
    job, listed = asyncio.run(run())
    assert calls["n"] == 1
    assert listed == [job.id]


def test_cancel_without_runner_and_finished_job_conflict(client, app):
    from service.jobs.store import JobStore

    job_id = create(client, training_file=upload(client, _chat_lines())).json()["id"]
    JobStore(app.state.storage).transition(job_id, "failed")
    r = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert r.status_code == 409 and "failed" in r.json()["error"]["message"]


def test_extensions_reach_the_training_spec(client, app):
    """Our extensions (LoRA shape, activation checkpointing, DPO's rpo_alpha) end up in the spec
    the training run gets: the one the job record holds."""
    from service.jobs.store import JobStore

    file_id = upload(client, _pref_lines())
    r = create(client, training_file=file_id, lora={"r": 8, "layers": 2},
               activation_checkpointing=True,
               method={"type": "dpo", "dpo": {"hyperparameters": {"rpo_alpha": 0.5}}})
    assert r.status_code == 200, r.text
    assert r.json()["method"]["dpo"]["hyperparameters"]["rpo_alpha"] == 0.5
    record = JobStore(app.state.storage).get(r.json()["id"])
    spec = record.spec
    assert spec.activation_checkpointing and spec.rpo_alpha == 0.5
    assert spec.lora_r == 8 and spec.lora_layers == 2
    assert spec.method == "dpo" and spec.beta == 0.1


def test_event_stream_cursor_returns_late_events_once_and_skips_old_ones(storage, monkeypatch):
    """The stream's cursor on both storages: an event that lands after a later-stamped one is
    still sent (once); events older than its window are not listed again on each poll."""
    from service.api.routes.fine_tuning import EventCursor
    from service.core.events import event_key

    job_id = "ftjob-" + "a" * 24
    second = 10**9

    def write(ns: int, seq: int) -> None:
        key = event_key(job_id, ns, seq)
        storage.put(key, json.dumps({"id": key.rsplit("/", 1)[-1], "seq": seq}).encode())

    start = 1_800_000_000 * second
    write(start, 0)
    write(start + 100 * second, 1)
    cursor = EventCursor(storage, job_id)
    assert [e["seq"] for e in cursor.poll()] == [0, 1]
    assert cursor.poll() == []
    write(start + 90 * second, 2)  # stamped before event 1, written after it was sent
    write(start + 101 * second, 3)
    assert [e["seq"] for e in cursor.poll()] == [2, 3]
    assert cursor.poll() == []
    # Event 0 is outside the window (60 s before the newest): a poll no longer lists it.
    listed = []
    iterate = storage.iter

    def spy(prefix, *, after=None):
        for info in iterate(prefix, after=after):
            listed.append(info.key)
            yield info

    monkeypatch.setattr(storage, "iter", spy)
    assert cursor.poll() == []
    assert event_key(job_id, start, 0) not in listed and event_key(job_id, start + 101 * second, 3) in listed
