"""Signed webhooks for finished jobs, as OpenAI sends them: a receiver on loopback (allowed by
the test's setting) gets exactly one delivery per event that the unchanged ``openai`` SDK
verifies, also when it answered 500 before, when the replica that recorded or claimed the
delivery died before it was sent, and when the API replica was killed after the job ended.
URLs into private ranges are refused naming ``webhook_url``.

The first tests run the dispatcher of ``service.jobs.webhooks`` on a local store with a real
HTTP receiver; the last drives the shared ``tuneserve up`` through real jobs on the tiny model.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.routes.files import FileTokenizer
from service.core import names
from service.core.errors import InvalidRequest
from service.core.settings import Settings
from service.core.storage import open_storage
from service.jobs import webhooks
from service.jobs.store import JobRecord, JobStore
from tests.helpers import free_port, wait_until
from tests.openapi_contract import assert_schema

SECRET = "whsec_" + base64.b64encode(b"tuneserve-test-webhook-key-32-by").decode()
TINY = "tuneserve/tiny-llama"
SCHEMAS = {"fine_tuning.job.succeeded": "WebhookFineTuningJobSucceeded",
           "fine_tuning.job.failed": "WebhookFineTuningJobFailed",
           "fine_tuning.job.cancelled": "WebhookFineTuningJobCancelled"}


@dataclass
class Receiver:
    """A webhook endpoint on loopback: records every request; ``answer(request_number for
    this event id)`` picks the status (or sleeps, for a slow receiver)."""

    answer: Callable[[int], int] = lambda n: 200
    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver.lock:
                    seen = [r for r in receiver.requests
                            if r["headers"].get("webhook-id") == self.headers.get("webhook-id")]
                    request = {"headers": dict(self.headers.items()), "body": body}
                    receiver.requests.append(request)
                status = receiver.answer(len(seen) + 1)
                request["status"] = status
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accepted(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r.get("status") == 200]

    def close(self):
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def verified(request: dict, secret: str = SECRET):
    """The event as the openai SDK unwraps it (raises if the signature does not verify)."""
    lowered = {k.lower(): v for k, v in request["headers"].items()}
    event = openai.OpenAI(api_key="unused").webhooks.unwrap(request["body"], lowered,
                                                           secret=secret)
    assert_schema(json.loads(request["body"]), SCHEMAS[event.type])
    return event


# --- the dispatcher on a local store -------------------------------------------------------


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(storage=str(tmp_path / "store"), webhook_secrets={"local": SECRET},
                    webhook_allow_private=True, webhook_retry_s=0.05, webhook_timeout_s=1)


def finished_job(settings: Settings, url: str, status: str = "succeeded") -> JobRecord:
    storage = open_storage(settings.storage_config())
    job = JobRecord(id=names.new_job_id(), created_at=int(time.time()), status=status,
                    model=TINY, training_file="file-" + "0" * 24, seed=1,
                    organization_id="local", webhook_url=url, finished_at=int(time.time()))
    JobStore(storage).create(job)
    return job


def run(dispatcher: webhooks.Dispatcher, until: Callable[[], bool], timeout: float = 10):
    """Dispatcher passes (as its loop does) until ``until()``."""
    def step():
        dispatcher.find_finished_jobs()
        dispatcher.send_due()
        return until()
    wait_until(step, timeout, interval=0.05, what="the deliveries")


def test_one_verified_delivery_after_three_500s(settings, receiver):
    receiver.answer = lambda n: 500 if n <= 3 else 200
    job = finished_job(settings, receiver.url)
    dispatcher = webhooks.Dispatcher(settings)
    run(dispatcher, lambda: receiver.accepted())
    time.sleep(0.5)
    dispatcher.find_finished_jobs()
    dispatcher.send_due()  # delivered: nothing more is sent
    time.sleep(0.3)
    assert [r["status"] for r in receiver.requests] == [500, 500, 500, 200]
    events = [verified(r) for r in receiver.requests]
    assert {e.id for e in events} == {webhooks.event_id(job.id, "succeeded")}
    assert events[-1].type == "fine_tuning.job.succeeded" and events[-1].data.id == job.id
    # A replica started later (nothing in memory) does not send it again.
    later = webhooks.Dispatcher(settings)
    later.find_finished_jobs()
    later.send_due()
    time.sleep(0.3)
    assert len(receiver.requests) == 4


def test_a_delivery_recorded_by_a_replica_that_died_is_sent_once_by_another(settings, receiver):
    job = finished_job(settings, receiver.url, "failed")
    webhooks.Dispatcher(settings).find_finished_jobs()  # recorded, then the replica is gone
    assert receiver.requests == []
    survivor, twin = webhooks.Dispatcher(settings), webhooks.Dispatcher(settings)
    run(survivor, lambda: receiver.accepted())
    twin.find_finished_jobs()
    twin.send_due()
    time.sleep(0.3)
    assert [verified(r).type for r in receiver.requests] == ["fine_tuning.job.failed"]
    assert verified(receiver.requests[0]).data.id == job.id


def test_a_claimed_delivery_whose_replica_died_is_sent_after_its_lease(settings, receiver):
    job = finished_job(settings, receiver.url, "cancelled")
    dead = webhooks.Dispatcher(settings)
    dead.find_finished_jobs()
    dead._pool.shutdown()  # it claims the delivery, then dies before sending
    with pytest.raises(RuntimeError):
        dead.send_due()
    survivor = webhooks.Dispatcher(settings)
    survivor.send_due()
    time.sleep(0.3)
    assert receiver.requests == []  # the lease holds it
    lease = settings.webhook_timeout_s * 3 + 5
    delivery_key = names.webhook_delivery_key(webhooks.event_id(job.id, "cancelled"),
                                              webhooks._digest(receiver.url))
    storage = open_storage(settings.storage_config())
    record = json.loads(storage.get(delivery_key))
    assert record["lease_until"] <= time.time() + lease
    record["lease_until"] = time.time() - 1  # as if the lease ran out
    storage.put(delivery_key, json.dumps(record).encode())
    run(survivor, lambda: receiver.accepted())
    assert [verified(r).type for r in receiver.requests] == ["fine_tuning.job.cancelled"]


def test_a_slow_receiver_holds_up_nothing(settings, receiver):
    receiver.answer = lambda n: (time.sleep(3), 504)[1] if n == 1 else 200
    finished_job(settings, receiver.url)
    dispatcher = webhooks.Dispatcher(settings)
    dispatcher.find_finished_jobs()
    started = time.monotonic()
    dispatcher.send_due()  # hands the attempt to its pool
    assert time.monotonic() - started < 0.5
    run(dispatcher, lambda: receiver.accepted(), timeout=15)  # timed out once, then retried
    assert len(receiver.accepted()) == 1


@pytest.mark.parametrize("url", ["http://127.0.0.1/hook", "http://10.1.2.3/hook",
                                 "http://169.254.169.254/latest", "http://[::1]:8080/",
                                 "http://localhost/hook", "http://192.168.0.10/",
                                 "http://[::ffff:10.0.0.1]/", "ftp://example.com/"])
def test_urls_into_private_ranges_are_refused(url):
    with pytest.raises(InvalidRequest) as refused:
        webhooks.check_url(url, allow_private=False)
    assert refused.value.param == "webhook_url"
    if url.startswith("http"):
        webhooks.check_url(url, allow_private=True)  # the setting allows them


def test_the_api_refuses_a_private_webhook_url_naming_it(tmp_path):
    app = create_app(Settings(storage=str(tmp_path / "store"), builtin_models=False,
                              webhook_secrets={"local": SECRET}))
    app.state.file_tokenizer = FileTokenizer()
    with TestClient(app) as client:
        file_id = client.post("/v1/files", files={"file": ("t.jsonl", io.BytesIO(
            b'{"messages": [{"role": "user", "content": "a"}, '
            b'{"role": "assistant", "content": "b"}]}\n'))}, data={"purpose": "fine-tune"}
        ).json()["id"]
        for url in ("http://10.0.0.1/hook", "http://127.0.0.1:9/hook", "file:///etc/passwd"):
            r = client.post("/v1/fine_tuning/jobs", json={
                "model": TINY, "training_file": file_id, "webhook_url": url})
            assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url", r.text
    unsigned = create_app(Settings(storage=str(tmp_path / "store"), builtin_models=False))
    with TestClient(unsigned) as client:
        r = client.post("/v1/fine_tuning/jobs", json={
            "model": TINY, "training_file": file_id, "webhook_url": "http://93.184.215.14/"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url", r.text


# --- end to end, on the shared service -------------------------------------------------------


def test_each_finished_job_is_announced_once_across_500s_and_an_api_replica_kill(
        shared_service, receiver):
    secret = shared_service.env["TUNESERVE_WEBHOOK_SECRETS"].split(":", 1)[1]
    http = httpx.Client(base_url=f"{shared_service.url}/v1", timeout=60)
    rows = b"\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"Say {i}."},
        {"role": "assistant", "content": str(i)}]}).encode() for i in range(8))

    def upload() -> str:
        return http.post("/files", files={"file": ("t.jsonl", io.BytesIO(rows))},
                         data={"purpose": "fine-tune"}).json()["id"]

    def create(file_id: str, **extra) -> str:
        r = http.post("/fine_tuning/jobs", json={
            "model": TINY, "training_file": file_id, "webhook_url": receiver.url,
            "hyperparameters": {"n_epochs": 1, "batch_size": 4}, **extra})
        assert r.status_code == 200, r.text
        return r.json()["id"]

    succeeding = create(upload())
    succeeded_event = webhooks.event_id(succeeding, "succeeded")
    receiver.answer = lambda n: 500 if n <= 3 else 200  # per event id
    doomed_file = upload()
    failing = create(doomed_file)  # queued behind the first; its file is gone before it starts
    assert http.delete(f"/files/{doomed_file}").status_code == 200
    cancelled = create(upload())
    assert http.post(f"/fine_tuning/jobs/{cancelled}/cancel").status_code == 200

    # The job ends, the first attempt gets a 500; then the API replica is killed.
    wait_until(lambda: any(r["headers"].get("webhook-id") == succeeded_event
                           for r in receiver.requests), 300, interval=0.5,
               what="the first delivery attempt of the succeeded job")
    time.sleep(0.5)  # the attempt is settled (the next one scheduled) in storage
    replicas = shared_service.processes("ServeReplica:tuneserve:Api")
    assert replicas
    for process in replicas:
        process.send_signal(signal.SIGKILL)
    expected = {succeeding: "fine_tuning.job.succeeded", failing: "fine_tuning.job.failed",
                cancelled: "fine_tuning.job.cancelled"}

    def all_accepted() -> bool:
        return {verified(r, secret).data.id for r in receiver.accepted()} >= set(expected)
    wait_until(all_accepted, 180, interval=1, what="every job's delivery to be accepted")
    time.sleep(3)  # nothing more comes
    accepted = [verified(r, secret) for r in receiver.accepted()]
    assert sorted((e.data.id, e.type) for e in accepted) == sorted(expected.items())
    ours = [r for r in receiver.requests if r["headers"].get("webhook-id") == succeeded_event]
    assert [r["status"] for r in ours] == [500, 500, 500, 200]
    failed = http.get(f"/fine_tuning/jobs/{failing}").json()
    assert failed["status"] == "failed" and doomed_file in failed["error"]["message"]
