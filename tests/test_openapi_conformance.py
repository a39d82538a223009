"""Every operation tuneserve implements, driven with raw HTTP as OpenAI's published spec
describes the request, answers success and errors in the spec's shape
(``tests/openapi_contract.py``). The shared ``tuneserve up`` on SeaweedFS, the tiny model."""

from __future__ import annotations

import io
import json

import httpx
import pytest

from tests.helpers import wait_until
from tests.openapi_contract import assert_response, assert_schema

TINY = "tuneserve/tiny-llama"


def chat_file(n: int) -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."},
                          {"role": "assistant", "content": f"{i % 5}"}]} for i in range(n)]
    return "\n".join(json.dumps(r) for r in rows).encode()


@pytest.fixture
def http(shared_service):
    with httpx.Client(base_url=f"{shared_service.url}/v1", timeout=60,
                      headers={"Authorization": "Bearer local"}) as client:
        yield client


def upload(http: httpx.Client, n: int = 8, **form: str) -> httpx.Response:
    return http.post("/files", files={"file": ("train.jsonl", io.BytesIO(chat_file(n)))},
                     data={"purpose": "fine-tune", **form})


def test_files(http):
    file = assert_response("post", "/files", upload(http), status=200)
    assert "expires_at" not in file  # no expiry asked: absent, never null
    expiring = assert_response("post", "/files", upload(
        http, **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"}),
        status=200)
    assert expiring["expires_at"] == expiring["created_at"] + 3600
    listed = assert_response("get", "/files", http.get("/files", params={"limit": 2}), status=200)
    assert [f["id"] for f in listed["data"]] == [expiring["id"], file["id"]]
    assert_response("get", "/files/{file_id}", http.get(f"/files/{file['id']}"), status=200)
    content = http.get(f"/files/{file['id']}/content")
    assert content.status_code == 200 and content.content == chat_file(8)
    assert_response("delete", "/files/{file_id}", http.delete(f"/files/{file['id']}"),
                    status=200)

    missing = "file-" + "0" * 24
    assert_response("get", "/files/{file_id}", http.get(f"/files/{missing}"), status=404)
    assert_response("delete", "/files/{file_id}", http.delete(f"/files/{missing}"), status=404)
    assert_response("get", "/files/{file_id}/content", http.get(f"/files/{missing}/content"),
                    status=404)
    assert_response("get", "/files", http.get("/files", params={"limit": 0}), status=400)
    bad_purpose = assert_response("post", "/files", upload(http, purpose="batch"), status=400)
    assert bad_purpose["error"]["param"] == "purpose"
    for seconds in ("3599", "2592001", "soon"):
        short = assert_response("post", "/files", upload(
            http, **{"expires_after[anchor]": "created_at", "expires_after[seconds]": seconds}),
            status=400)
        assert short["error"]["param"] == "expires_after.seconds", short
    anchor = assert_response("post", "/files", upload(
        http, **{"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"}),
        status=400)
    assert anchor["error"]["param"] == "expires_after.anchor"


def test_fine_tuning_jobs_events_pause_resume_cancel(http):
    file_id = upload(http, 64).json()["id"]
    body = {"model": TINY, "training_file": file_id, "metadata": {"suite": "conformance"},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 20, "batch_size": 4}}}}
    created = [http.post("/fine_tuning/jobs", json=body), http.post(
        "/fine_tuning/jobs", json={"model": TINY, "training_file": file_id,
                                   "hyperparameters": {"n_epochs": 1}})]
    try:
        job, plain = (assert_response("post", "/fine_tuning/jobs", r, status=200)
                      for r in created)
        for page in (http.get("/fine_tuning/jobs", params={"limit": 100}),
                     http.get("/fine_tuning/jobs", params={"metadata[suite]": "conformance"}),
                     http.get("/fine_tuning/jobs", params={"metadata": "null", "limit": 100})):
            assert_response("get", "/fine_tuning/jobs", page, status=200)
        tagged = http.get("/fine_tuning/jobs", params={"metadata[suite]": "conformance"}).json()
        assert [j["id"] for j in tagged["data"]] == [job["id"]]
        untagged = http.get("/fine_tuning/jobs", params={"metadata": "null", "limit": 100}).json()
        ids = [j["id"] for j in untagged["data"]]
        assert plain["id"] in ids and job["id"] not in ids
        assert all(j["metadata"] is None for j in untagged["data"])
        bad_filter = http.get("/fine_tuning/jobs", params={"metadata": "yes"})
        assert assert_response("get", "/fine_tuning/jobs", bad_filter,
                               status=400)["error"]["param"] == "metadata"

        url = "/fine_tuning/jobs/{fine_tuning_job_id}"
        wait_until(lambda: http.get(f"/fine_tuning/jobs/{job['id']}").json()["status"]
                   in ("queued", "running"), 60, interval=0.5, what="the job to be queued")
        assert_response("get", url, http.get(f"/fine_tuning/jobs/{job['id']}"), status=200)
        events = assert_response("get", url + "/events",
                                 http.get(f"/fine_tuning/jobs/{job['id']}/events"), status=200)
        assert events["data"]
        paused = assert_response("post", url + "/pause",
                                 http.post(f"/fine_tuning/jobs/{job['id']}/pause"), status=200)
        assert paused["status"] == "paused" and paused["estimated_finish"] is None
        assert_response("post", url + "/resume",
                        http.post(f"/fine_tuning/jobs/{job['id']}/resume"), status=200)
        assert_response("post", url + "/cancel",
                        http.post(f"/fine_tuning/jobs/{job['id']}/cancel"), status=200)
        assert_response("post", url + "/cancel",
                        http.post(f"/fine_tuning/jobs/{job['id']}/cancel"), status=409)
        assert_response("post", url + "/resume",
                        http.post(f"/fine_tuning/jobs/{job['id']}/resume"), status=409)
    finally:
        for response in created:
            if response.status_code == 200:
                http.post(f"/fine_tuning/jobs/{response.json()['id']}/cancel")

    missing = "ftjob-" + "0" * 24
    url = "/fine_tuning/jobs/{fine_tuning_job_id}"
    assert_response("get", url, http.get(f"/fine_tuning/jobs/{missing}"), status=404)
    assert_response("get", url + "/events", http.get(f"/fine_tuning/jobs/{missing}/events"),
                    status=404)
    assert_response("get", url + "/checkpoints",
                    http.get(f"/fine_tuning/jobs/{missing}/checkpoints"), status=404)
    assert_response("post", url + "/pause", http.post(f"/fine_tuning/jobs/{missing}/pause"),
                    status=404)
    for wrong, param in (({"model": TINY}, "training_file"),
                         ({**body, "seed": -1}, "seed"),
                         ({**body, "webhook_url": "file:///etc/passwd"}, "webhook_url"),
                         ({**body, "nonsense": 1}, "nonsense")):
        refused = assert_response("post", "/fine_tuning/jobs",
                                  http.post("/fine_tuning/jobs", json=wrong), status=400)
        assert refused["error"]["param"] == param, refused


def test_a_finished_job_its_checkpoints_and_model(http):
    file_id = upload(http, 24).json()["id"]
    job = http.post("/fine_tuning/jobs", json={
        "model": TINY, "training_file": file_id, "suffix": "spec",
        "hyperparameters": {"n_epochs": 1, "batch_size": 2}}).json()
    url = "/fine_tuning/jobs/{fine_tuning_job_id}"
    seen: list[dict] = []

    def ended() -> bool:
        seen.append(assert_response("get", url, http.get(f"/fine_tuning/jobs/{job['id']}"),
                                    status=200))
        return seen[-1]["status"] in ("succeeded", "failed", "cancelled")
    try:
        wait_until(ended, 300, interval=0.25, what="the job to end")
    finally:
        http.post(f"/fine_tuning/jobs/{job['id']}/cancel")
    done = seen[-1]
    assert done["status"] == "succeeded", done
    # While it ran it said when it would end (null before and after): from the job's estimate
    # until steps are measured (for the tiny model that is within the second it started).
    estimates = [j["estimated_finish"] for j in seen if j["status"] == "running"
                 and j["estimated_finish"] is not None]
    assert estimates and all(done["created_at"] <= e < done["finished_at"] + 60
                             for e in estimates), [(j["status"], j["estimated_finish"]) for j in seen]
    assert all(j["estimated_finish"] is None for j in seen if j["status"] != "running")
    checkpoints = assert_response("get", url + "/checkpoints", http.get(
        f"/fine_tuning/jobs/{job['id']}/checkpoints"), status=200)
    assert checkpoints["data"]
    # Not measured (no validation file): the metric is absent, not null.
    assert "full_valid_loss" not in checkpoints["data"][0]["metrics"]
    assert_response("get", url + "/events",
                    http.get(f"/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}),
                    status=200)

    models = assert_response("get", "/models", http.get("/models"), status=200)
    assert done["fine_tuned_model"] in [m["id"] for m in models["data"]]
    assert_response("get", "/models/{model}", http.get(f"/models/{done['fine_tuned_model']}"),
                    status=200)
    assert_response("get", "/models/{model}", http.get(f"/models/{TINY}"), status=200)
    assert_response("get", "/models/{model}", http.get("/models/no-such-model"), status=404)
    assert_response("delete", "/models/{model}",
                    http.delete(f"/models/{done['fine_tuned_model']}"), status=200)
    assert_response("delete", "/models/{model}",
                    http.delete(f"/models/{done['fine_tuned_model']}"), status=404)


CHAT = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
        "seed": 1}


def test_chat_completion(http):
    assert_response("post", "/chat/completions", http.post("/chat/completions", json=CHAT),
                    status=200)


def _chunks(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    lines = [line for line in response.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_chat_completion_stream_chunks(http):
    chunks = _chunks(http.post("/chat/completions", json={**CHAT, "stream": True}))
    for chunk in chunks:
        assert_schema(chunk, "CreateChatCompletionStreamResponse")


def test_chat_completion_stream_chunks_with_usage(http):
    chunks = _chunks(http.post("/chat/completions", json={
        **CHAT, "stream": True, "stream_options": {"include_usage": True}}))
    for chunk in chunks:
        assert_schema(chunk, "CreateChatCompletionStreamResponse")
    # Every chunk but the last says "usage": null; the last holds it (the spec's description).
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["usage"]["total_tokens"] > 0 and chunks[-1]["choices"] == []


def test_chat_completion_errors(http):
    for wrong, status, param in (({**CHAT, "model": "no-such-model"}, 404, "model"),
                                 ({**CHAT, "messages": []}, 400, "messages"),
                                 ({**CHAT, "not_in_the_spec": 1}, 400, "not_in_the_spec")):
        refused = assert_response("post", "/chat/completions",
                                  http.post("/chat/completions", json=wrong), status=status)
        assert refused["error"]["param"] == param, refused
