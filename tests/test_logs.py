"""Structured logs: JSON lines with request id, tenant and job id, and never a secret."""

from __future__ import annotations

import io
import json
import logging

import pytest
from fastapi.testclient import TestClient

from service import logs
from service.app import create_app
from service.settings import Settings

KEY = "sk-logtest-5b1e0c93"


@pytest.fixture
def captured():
    """The root logger writing JSON lines into a buffer, as ``tuneserve up`` sets it up."""
    stream = io.StringIO()
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    logs.setup_logging("DEBUG", stream=stream, secrets=[KEY])
    yield stream
    for handler in list(root.handlers):
        if getattr(handler, "_tuneserve", False):
            root.removeHandler(handler)
    root.handlers[:] = before[0]
    root.setLevel(before[1])


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_a_line_is_json_with_the_bound_context_and_extras(captured):
    token = logs.new_context(request_id="req-1")
    try:
        logs.bind(tenant="alice", job_id="ftjob-" + "a" * 24)
        logging.getLogger("service.test").info("step %d done", 3, extra={"step": 3})
    finally:
        logs.reset_context(token)
    line = lines(captured)[-1]
    assert line["message"] == "step 3 done" and line["level"] == "info"
    assert (line["request_id"], line["tenant"], line["job_id"]) == ("req-1", "alice",
                                                                   "ftjob-" + "a" * 24)
    assert line["step"] == 3 and line["logger"] == "service.test"


@pytest.mark.parametrize("message", [
    f"key is {KEY}",
    f"headers: {{'authorization': 'Bearer {KEY}'}}",
    "Authorization: Bearer some-other-token-123",
    "cookie tuneserve_key=another-secret-456; path=/",
])
def test_secrets_and_authorization_values_are_redacted(captured, message):
    logging.getLogger("service.test").warning(message)
    try:
        raise ValueError(f"bad key {KEY}")
    except ValueError:
        logging.getLogger("service.test").exception("failed")
    text = captured.getvalue()
    for secret in (KEY, "some-other-token-123", "another-secret-456"):
        assert secret not in text
    assert logs.REDACTED in text


def test_configured_keys_from_the_environment_are_secrets():
    env = {"TUNESERVE_API_KEYS": "k-one-1234:alice, k-two-5678:bob",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-abcd"}
    assert set(logs.secrets_from_env(env)) == {"k-one-1234", "k-two-5678", "aws-secret-abcd"}


def test_each_request_gets_an_id_and_an_access_line_with_the_tenant(captured, tmp_path):
    app = create_app(Settings(storage=str(tmp_path), api_keys={KEY: "alice"}))
    client = TestClient(app)
    response = client.get("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    access = [line for line in lines(captured) if line["logger"] == "tuneserve.access"]
    assert access[-1]["request_id"] == request_id and access[-1]["tenant"] == "alice"
    assert access[-1]["status"] == 200 and access[-1]["path"] == "/v1/fine_tuning/jobs"
    # A caller's own id is kept (and echoed), so it can be followed across services.
    given = client.get("/healthz", headers={"X-Request-ID": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42"
    assert KEY not in captured.getvalue()
