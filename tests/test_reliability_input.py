"""Hostile and malformed input across uploads, job specs and chat requests.

Every case must be answered 4xx with OpenAI's error body whose ``param`` (or message) names
the field or line at fault; none may reach a 5xx; and storage must hold exactly the keys (and
versions) it held before. One app for the module: FastAPI's TestClient over a local store, the
tiny model's in-process chat engine, two tenants. The files API's ordinary broken files live in
tests/test_files_api.py and the ordinary job-spec mistakes in tests/test_jobs_api.py; these are
the cases an attacker or a buggy client sends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.chat.backends import LocalChatBackend
from service.core.settings import Settings
from service.jobs.store import JobRecord, JobStore
from tests.serving_adapters import new_job_id

TINY = "tuneserve/tiny-llama"
KEYS = {"key-alice": "alice", "key-bob": "bob"}
MAX_LINE = 64 * 1024
MAX_REQUEST = 256 * 1024
MAX_UPLOAD = 512 * 1024
CAP = 16
DEEP = 100_000
"""Nesting depth of the deep-JSON cases: far past Python's recursion limit."""


def chat_line(i: int = 0) -> dict:
    return {"messages": [{"role": "user", "content": f"Say {i}."},
                         {"role": "assistant", "content": str(i)}]}


def jsonl(*rows: Any) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


GOOD = jsonl(*(chat_line(i) for i in range(4)))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict]:
    settings = Settings(storage=str(tmp_path_factory.mktemp("store")), api_keys=KEYS,
                        builtin_models=False, max_line_bytes=MAX_LINE,
                        max_request_bytes=MAX_REQUEST, max_upload_bytes=MAX_UPLOAD,
                        max_tokens_cap=CAP)
    backend = LocalChatBackend(settings, dtype="float32")
    app = create_app(settings, chat=backend)
    with TestClient(app) as client:
        ids = {}
        for key in KEYS:
            r = client.post("/v1/files", files={"file": ("t.jsonl", GOOD)},
                            data={"purpose": "fine-tune"}, headers=auth(key))
            assert r.status_code == 200, r.text
            ids[f"file-{key}"] = r.json()["id"]
        bob_job = new_job_id()
        JobStore(app.state.storage).create(JobRecord(
            id=bob_job, created_at=int(time.time()), status="succeeded", model=TINY,
            training_file=ids["file-key-bob"], seed=1, organization_id="bob",
            fine_tuned_model=f"ft:{TINY}::{bob_job}"))
        ids["job-bob"] = bob_job
        alice_job = client.post(JOBS, json=job(training_file=ids["file-key-alice"]),
                                headers=auth())
        assert alice_job.status_code == 200, alice_job.text
        ids["job-alice"] = alice_job.json()["id"]
        # Build the chat engine now: its first use publishes the base model to storage, which
        # the cases' before/after snapshots must not see.
        r = client.post("/v1/chat/completions", json=chat(), headers=auth())
        assert r.status_code == 200, r.text
        yield {"app": app, "client": client, "ids": ids}
    backend.close()


def auth(key: str = "key-alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def snapshot(app) -> dict[str, str]:
    return {info.key: info.etag for info in app.state.storage.iter("")}


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    param: str | None = None
    """The ``param`` the error must name (None: ``words`` must be in the message)."""
    words: tuple[str, ...] = ()
    """Words the message must contain (case-insensitive)."""
    json: Any = None
    content: bytes | None = None
    files: dict | None = None
    data: dict | None = None
    headers: dict = field(default_factory=dict)
    status: int | None = None
    """The exact status, when it matters (413, 404); otherwise any 4xx."""


def job(**fields) -> dict:
    return {"model": TINY, "training_file": "{file-key-alice}", **fields}


def chat(**fields) -> dict:
    return {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            **fields}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def upload(name: str, content: bytes, param: str = "file", *, words: tuple[str, ...] = (),
           filename: str = "t.jsonl", status: int | None = None, **data) -> Case:
    return Case(name, "POST", "/v1/files", param, words, files={"file": (filename, content)},
                data={"purpose": "fine-tune", **data}, status=status)


def raw_json(name: str, path: str, content: bytes, param: str | None, *,
             words: tuple[str, ...] = (), status: int | None = None) -> Case:
    return Case(name, "POST", path, param, words, content=content,
                headers={"Content-Type": "application/json"}, status=status)


JOBS = "/v1/fine_tuning/jobs"
CHAT = "/v1/chat/completions"
BOUNDARY = "x-boundary-x"

UPLOADS = [
    upload("huge-line", jsonl(chat_line(), {"messages": [{"role": "user", "content": "x" * (2 * MAX_LINE)}]}),
           words=("line 2", "longer than")),
    upload("huge-file-no-newline", b"{" + b"a" * (MAX_UPLOAD + 10), status=413),
    upload("invalid-utf8", jsonl(chat_line(), b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
           words=("line 2", "utf-8")),
    upload("utf16-file", GOOD.decode().encode("utf-16"), words=("line 1",)),
    upload("deep-nesting", jsonl(chat_line(), nested(DEEP // 4).encode()), words=("line 2",)),
    upload("deep-object", jsonl(('{"a":' * 20_000 + "1" + "}" * 20_000).encode()),
           words=("line 1",)),
    upload("nul-bytes", jsonl(b'{"messages": \x00[]}'), words=("line 1",)),
    upload("nan-weight", jsonl(b'{"messages": [{"role": "user", "content": "a"}, '
                               b'{"role": "assistant", "content": "b", "weight": NaN}]}'),
           words=("line 1",)),
    upload("line-is-string", jsonl("just a string"), words=("line 1",)),
    upload("line-is-number", jsonl(12345), words=("line 1",)),
    upload("line-is-null", jsonl(chat_line(), None), words=("line 2",)),
    # On line 2: a file that opens with "[" is one JSON array of examples, a format we accept.
    upload("line-is-array", jsonl(chat_line(), [chat_line()]), words=("line 2",)),
    upload("messages-is-string", jsonl({"messages": "hello"}), words=("line 1", "messages")),
    upload("role-is-number", jsonl({"messages": [{"role": 1, "content": "a"},
                                                 {"role": "assistant", "content": "b"}]}),
           words=("line 1", "role")),
    upload("content-is-object", jsonl({"messages": [{"role": "user", "content": {"x": 1}},
                                                    {"role": "assistant", "content": "b"}]}),
           words=("line 1",)),
    upload("weight-is-string", jsonl({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": "1"}]}),
        words=("line 1", "weight")),
    upload("lone-surrogate", jsonl(b'{"messages": [{"role": "user", "content": "\\ud800"}, '
                                   b'{"role": "assistant", "content": "b"}]}'),
           words=("line 1",)),
    upload("filename-traversal", GOOD, "file", filename="../../etc/passwd", words=("..",)),
    upload("filename-traversal-backslash", GOOD, "file", filename="..\\..\\x.jsonl",
           words=("..",)),
    upload("format-traversal", GOOD, "format", format="../../alpaca"),
    upload("format-field-too-long", GOOD, "format", format="a" * 5000),
    upload("purpose-traversal", GOOD, "purpose", purpose="../fine-tune"),
    upload("unknown-form-field", GOOD, "tenant", tenant="bob"),
    upload("server-owned-id-field", GOOD, "id", id="file-" + "0" * 24),
    upload("server-owned-organization-id", GOOD, "organization_id", organization_id="bob"),
    Case("two-file-parts", "POST", "/v1/files", "file", content=(
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
        + "".join(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
                  f"filename=\"{i}.jsonl\"\r\n\r\n{GOOD.decode()}\r\n" for i in range(2))
        + f"--{BOUNDARY}--\r\n").encode(),
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}),
    Case("unclosed-multipart", "POST", "/v1/files", "file", content=(
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n"
        ).encode() + GOOD, headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}),
    Case("plain-text-body", "POST", "/v1/files", "file", content=GOOD,
         headers={"Content-Type": "text/plain"}),
    Case("declared-length-over-limit", "POST", "/v1/files", "file", content=b"x",
         headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                  "Content-Length": str(10 * MAX_UPLOAD)}, status=413),
]

JOB_SPECS = [
    raw_json("job-not-json", JOBS, b"{model: tiny", "body", words=("json",)),
    raw_json("job-invalid-utf8", JOBS, b'{"model": "\xff\xfe"}', "body"),
    raw_json("job-deep-nesting", JOBS, nested(DEEP).encode(), "body", words=("body",)),
    raw_json("job-deep-nesting-in-field", JOBS,
             b'{"model": "x", "training_file": "f", "metadata": ' + nested(DEEP).encode() + b"}",
             "body", words=("body",)),
    raw_json("job-body-is-array", JOBS, b"[]", None, words=("object",)),
    raw_json("job-body-is-null", JOBS, b"null", None, words=("body",)),
    raw_json("job-oversize-body", JOBS, json.dumps(job(suffix="x", metadata={
        "k": "v" * (2 * MAX_REQUEST)})).encode(), "body", status=413),
    Case("job-oversize-declared", "POST", JOBS, "body", content=b"{}",
         headers={"Content-Type": "application/json", "Content-Length": str(10 * MAX_REQUEST)},
         status=413),
    Case("job-model-wrong-type", "POST", JOBS, "model", json=job(model=123)),
    Case("job-file-wrong-type", "POST", JOBS, "training_file", json=job(training_file=["x"])),
    Case("job-hyperparameters-wrong-type", "POST", JOBS, "hyperparameters",
         json=job(hyperparameters="fast")),
    Case("job-epochs-fraction", "POST", JOBS, "hyperparameters.n_epochs",
         json=job(hyperparameters={"n_epochs": 1.5})),
    Case("job-epochs-huge", "POST", JOBS, "hyperparameters.n_epochs",
         json=job(hyperparameters={"n_epochs": 10**30})),
    Case("job-batch-negative", "POST", JOBS, "hyperparameters.batch_size",
         json=job(hyperparameters={"batch_size": -1})),
    raw_json("job-lr-infinite", JOBS, json.dumps(job(training_file="file-x")).replace(
        '"file-x"', '"file-x", "hyperparameters": {"learning_rate_multiplier": 1e999}').encode(),
        "hyperparameters.learning_rate_multiplier"),
    raw_json("job-lr-nan", JOBS, b'{"model": "%s", "training_file": "f", "hyperparameters": '
             b'{"learning_rate_multiplier": NaN}}' % TINY.encode(),
             "hyperparameters.learning_rate_multiplier"),
    Case("job-seed-too-big", "POST", JOBS, "seed", json=job(seed=2**31)),
    Case("job-lora-rank-huge", "POST", JOBS, "lora.r", json=job(lora={"r": 100_000})),
    Case("job-lora-dropout-one", "POST", JOBS, "lora.dropout", json=job(lora={"dropout": 1.0})),
    Case("job-lora-target-traversal", "POST", JOBS, "lora.target_modules",
         json=job(lora={"target_modules": ["../../etc"]})),
    Case("job-lora-no-layers", "POST", JOBS, "lora.layers", json=job(lora={"layers": 0})),
    Case("job-workers-too-many", "POST", JOBS, "num_workers", json=job(num_workers=10_000)),
    Case("job-too-many-files", "POST", JOBS, "training_files",
         json=job(training_files=[{"file": "file-x"}] * 17)),
    Case("job-file-weight-zero", "POST", JOBS, "training_files.0.weight",
         json=job(training_files=[{"file": "{file-key-alice}", "weight": 0}])),
    Case("job-metadata-not-strings", "POST", JOBS, "metadata.a", json=job(metadata={"a": 1})),
    Case("job-metadata-huge-value", "POST", JOBS, "metadata",
         json=job(metadata={"a": "v" * 513})),
    Case("job-suffix-slash", "POST", JOBS, "suffix", json=job(suffix="a/b")),
    Case("job-suffix-dotdot-backslash", "POST", JOBS, "suffix", json=job(suffix="..\\..")),
    Case("job-suffix-nul", "POST", JOBS, "suffix", json=job(suffix="a\x00b")),
    Case("job-suffix-colon", "POST", JOBS, "suffix", json=job(suffix="a:b")),
    Case("job-webhook-file-url", "POST", JOBS, "webhook_url",
         json=job(webhook_url="file:///etc/passwd")),
    Case("job-integrations", "POST", JOBS, "integrations",
         json=job(integrations=[{"type": "wandb", "wandb": {"project": "x"}}])),
    Case("job-sets-status", "POST", JOBS, "status", json=job(status="running")),
    Case("job-sets-id", "POST", JOBS, "id", json=job(id="ftjob-" + "0" * 24)),
    Case("job-sets-created-at", "POST", JOBS, "created_at", json=job(created_at=0)),
    Case("job-sets-result-files", "POST", JOBS, "result_files",
         json=job(result_files=["file-x"])),
    Case("job-sets-trained-tokens", "POST", JOBS, "trained_tokens", json=job(trained_tokens=1)),
    Case("job-sets-error", "POST", JOBS, "error", json=job(error=None)),
    Case("job-sets-extensions", "POST", JOBS, "extensions",
         json=job(extensions={"max_failures": -1})),
    Case("job-sets-attempts", "POST", JOBS, "attempts", json=job(attempts=-5)),
    Case("job-sets-storage-path", "POST", JOBS, "storage_path", json=job(storage_path="/tmp")),
    Case("job-sets-output-dir", "POST", JOBS, "output_dir", json=job(output_dir="s3://other/x")),
    Case("job-sets-tenant", "POST", JOBS, "tenant", json=job(tenant="bob")),
    Case("job-sets-organization-id", "POST", JOBS, "organization_id",
         json=job(organization_id="bob")),
    Case("job-sets-learning-rate", "POST", JOBS, "hyperparameters.learning_rate",
         json=job(hyperparameters={"learning_rate": 1.0})),
    Case("job-sets-max-failures", "POST", JOBS, "method.supervised.hyperparameters.max_failures",
         json=job(method={"type": "supervised",
                          "supervised": {"hyperparameters": {"max_failures": -1}}})),
    Case("job-other-tenants-training-file", "POST", JOBS, "training_file",
         json=job(training_file="{file-key-bob}"), status=404),
    Case("job-other-tenants-validation-file", "POST", JOBS, "validation_file",
         json=job(validation_file="{file-key-bob}"), status=404),
    Case("job-other-tenants-extra-file", "POST", JOBS, "training_files[0].file",
         json=job(training_files=[{"file": "{file-key-bob}"}]), status=404),
    Case("job-other-tenants-model", "POST", JOBS, "fine_tuning_job_id",
         json=job(model=f"ft:{TINY}::{{job-bob}}"), status=404),
    Case("job-model-traversal", "POST", JOBS, "model", json=job(model="../../etc/passwd")),
    Case("job-file-id-traversal", "POST", JOBS, "training_file",
         json=job(training_file="../jobs/x/job.json"), status=404),
    Case("job-idempotency-key-too-long", "POST", JOBS, "Idempotency-Key", json=job(),
         headers={"Idempotency-Key": "k" * 300}),
    Case("job-list-limit-zero", "GET", JOBS + "?limit=0", "limit"),
    Case("job-list-limit-huge", "GET", JOBS + "?limit=100000000000000000000", "limit"),
    Case("job-list-unknown-cursor", "GET", JOBS + "?after=ftjob-nope", "after"),
    Case("job-id-traversal", "GET", JOBS + "/..%2F..%2Ffiles", None, words=("not found",),
         status=404),
    Case("job-id-dotdot", "GET", JOBS + "/..", None, words=("not found",), status=404),
    Case("job-other-tenants-events", "GET", JOBS + "/{job-bob}/events", "fine_tuning_job_id",
         status=404),
    Case("job-other-tenants-checkpoints", "GET", JOBS + "/{job-bob}/checkpoints",
         "fine_tuning_job_id", status=404),
    Case("job-events-limit-negative", "GET", JOBS + "/{job-alice}/events?limit=-1", "limit"),
    Case("job-checkpoints-limit-huge", "GET", JOBS + "/{job-alice}/checkpoints?limit=1000",
         "limit"),
    Case("file-id-traversal", "GET", "/v1/files/..%2F..%2Fjobs", None, words=("not found",),
         status=404),
    Case("file-id-dotdot", "GET", "/v1/files/..", None, words=("not found",), status=404),
    Case("file-other-tenants-content", "GET", "/v1/files/{file-key-bob}/content", None,
         words=("file",), status=404),
    Case("file-other-tenants-delete", "DELETE", "/v1/files/{file-key-bob}", None,
         words=("file",), status=404),
]

CHATS = [
    raw_json("chat-not-json", CHAT, b'{"model": ', "body"),
    raw_json("chat-deep-nesting", CHAT, nested(DEEP).encode(), "body", words=("body",)),
    raw_json("chat-invalid-utf8", CHAT, b'{"model": "\xc3\x28"}', "body"),
    raw_json("chat-lone-surrogate", CHAT, b'{"model": "%s", "max_tokens": 2, "messages": '
             b'[{"role": "user", "content": "a\\ud800b"}]}' % TINY.encode(), "messages.0.content"),
    raw_json("job-metadata-lone-surrogate", JOBS, b'{"model": "%s", "training_file": "{file-key-alice}", '
             b'"metadata": {"k": "\\udfff"}}' % TINY.encode(), "metadata"),
    raw_json("chat-oversize-body", CHAT, json.dumps(chat(messages=[
        {"role": "user", "content": "x" * (2 * MAX_REQUEST)}])).encode(), "body", status=413),
    Case("chat-no-messages", "POST", CHAT, "messages", json=chat(messages=[])),
    Case("chat-messages-wrong-type", "POST", CHAT, "messages", json=chat(messages="Hi")),
    Case("chat-role-unknown", "POST", CHAT, "messages.0.role",
         json=chat(messages=[{"role": "root", "content": "x"}])),
    Case("chat-content-number", "POST", CHAT, "messages.0.content",
         json=chat(messages=[{"role": "user", "content": 5}])),
    Case("chat-content-image", "POST", CHAT, "messages.0.content",
         json=chat(messages=[{"role": "user", "content": [
             {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}])),
    Case("chat-message-extra-field", "POST", CHAT, "messages.0.tenant",
         json=chat(messages=[{"role": "user", "content": "x", "tenant": "bob"}])),
    Case("chat-max-tokens-zero", "POST", CHAT, "max_tokens", json=chat(max_tokens=0)),
    Case("chat-max-tokens-over-cap", "POST", CHAT, "max_tokens", json=chat(max_tokens=10**9)),
    Case("chat-temperature-negative", "POST", CHAT, "temperature", json=chat(temperature=-1)),
    Case("chat-temperature-string", "POST", CHAT, "temperature", json=chat(temperature="hot")),
    Case("chat-top-p-zero", "POST", CHAT, "top_p", json=chat(top_p=0)),
    Case("chat-n-zero", "POST", CHAT, "n", json=chat(n=0)),
    Case("chat-top-logprobs-over-20", "POST", CHAT, "top_logprobs",
         json=chat(logprobs=True, top_logprobs=21)),
    Case("chat-too-many-stops", "POST", CHAT, "stop", json=chat(stop=list("abcde"))),
    Case("chat-empty-stop", "POST", CHAT, "stop", json=chat(stop=[""])),
    Case("chat-seed-string", "POST", CHAT, "seed", json=chat(seed="abc")),
    Case("chat-seed-beyond-64-bits", "POST", CHAT, "seed", json=chat(seed=2**64)),
    Case("chat-seed-below-64-bits", "POST", CHAT, "seed", json=chat(seed=-2**63 - 1)),
    Case("chat-unknown-field", "POST", CHAT, "logit_bias_typo",
         json=chat(logit_bias_typo={"1": 100})),
    Case("chat-logit-bias-not-a-token", "POST", CHAT, "logit_bias",
         json=chat(logit_bias={"hello": 100})),
    Case("chat-sets-organization-id", "POST", CHAT, "organization_id",
         json=chat(organization_id="bob")),
    Case("chat-stream-options-extra", "POST", CHAT, "stream_options.tenant",
         json=chat(stream=True, stream_options={"tenant": "bob"})),
    Case("chat-other-tenants-model", "POST", CHAT, "model",
         json=chat(model=f"ft:{TINY}::{{job-bob}}"), status=404),
    Case("chat-model-traversal", "POST", CHAT, "model", json=chat(model="../../etc/passwd"),
         status=404),
    Case("chat-model-malformed-ft", "POST", CHAT, "model",
         json=chat(model=f"ft:{TINY}::ftjob-../../x"), status=404),
    Case("chat-prompt-beyond-context", "POST", CHAT, "messages",
         json=chat(messages=[{"role": "user", "content": "hello " * 3000}]),
         words=("2048",)),
    Case("chat-prompt-beyond-context-streaming", "POST", CHAT, "messages",
         json=chat(stream=True, messages=[{"role": "user", "content": "hello " * 3000}])),
    Case("model-other-tenants", "GET", f"/v1/models/ft:{TINY}::{{job-bob}}", "model",
         status=404),
    Case("model-delete-other-tenants", "DELETE", f"/v1/models/ft:{TINY}::{{job-bob}}", "model",
         status=404),
]

CASES = UPLOADS + JOB_SPECS + CHATS


def test_there_are_at_least_60_hostile_cases():
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)


def _fill(value: Any, ids: dict[str, str]) -> Any:
    """Put the fixture's ids into ``{file-key-alice}``-style placeholders."""
    if isinstance(value, str | bytes):
        for name, real in ids.items():
            placeholder = "{" + name + "}"
            if isinstance(value, bytes):
                placeholder, real = placeholder.encode(), real.encode()
            value = value.replace(placeholder, real)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, ids) for v in value]
    return value


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_input_is_4xx_naming_the_field_and_changes_nothing(world, case: Case):
    client, app, ids = world["client"], world["app"], world["ids"]
    before = snapshot(app)
    kwargs: dict[str, Any] = {"headers": {**auth(), **case.headers}}
    if case.json is not None:
        kwargs["json"] = _fill(case.json, ids)
    if case.content is not None:
        kwargs["content"] = _fill(case.content, ids)
    if case.files is not None:
        kwargs["files"], kwargs["data"] = case.files, case.data
    r = client.request(case.method, _fill(case.path, ids), **kwargs)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if case.status is not None:
        assert r.status_code == case.status, r.text[:500]
    error = r.json()["error"]
    assert error["message"] and error["type"], error
    if case.param is not None:  # header names are case-insensitive
        assert (error["param"] or "").lower() == case.param.lower(), error
    message = error["message"].lower()
    for word in case.words:
        assert word.lower() in message, error
    assert snapshot(app) == before


@pytest.mark.parametrize("settings", [
    {"temperature": 1e-300}, {"temperature": 1e-300, "top_p": 1e-300}, {"top_p": 1e-300},
    {"seed": 2**63 - 1, "temperature": 1.5}, {"seed": -2**63, "top_p": 0.01}],
    ids=["tiny-temperature", "tiny-temperature-and-top-p", "tiny-top-p", "largest-seed",
         "smallest-seed"])
def test_extreme_valid_sampling_settings_answer(world, settings):
    """Values the schema allows at its edges are answered, not a 500 (schemathesis found a
    temperature of 1e-300 overflowing the logits to NaN, a top_p of 1e-300 rounding to 0 and
    keeping no token, and a seed beyond 64 bits)."""
    r = world["client"].post(CHAT, json=chat(**settings), headers=auth())
    assert r.status_code == 200, r.text[:500]
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_refused_uploads_leave_no_storage_write_waiting(world):
    """Every refused upload's storage write was finished or abandoned. (A 413 raised in the
    chunk that opened the file part once left its write waiting for data forever, holding a
    worker thread per request, and hung the app's shutdown.)"""
    import gc

    from service.files.uploads import Pipe

    client = world["client"]
    r = client.post("/v1/files", files={"file": ("t.jsonl", b"x" * (MAX_UPLOAD + 1))},
                    data={"purpose": "fine-tune"}, headers=auth())
    assert r.status_code == 413
    gc.collect()
    waiting = [p for p in gc.get_objects() if isinstance(p, Pipe)
               and not (p._eof or p._aborted or p._reader_gone)]
    assert not waiting
