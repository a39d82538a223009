"""schemathesis over the service's OpenAPI document, in process (ASGI), with every check.

Two tenants' keys are given as Web Fuzzing Commons identities and named as peers, so
``object_level_authorization`` replays each tenant's reads of its own objects as the other, and
``ignored_auth`` strips or spoils the key of every successful call. The seed and the example
count are fixed, so a failure replays; the run is bounded in time. Jobs run no training here
(``runner=None``); chat runs the tiny model in process with a small token cap.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from service.api.app import create_app
from service.chat.backends import LocalChatBackend
from service.core.settings import Settings

schemathesis = pytest.importorskip("schemathesis")

KEYS = {"key-alice": "alice", "key-bob": "bob"}
SEED = 20251125
MAX_EXAMPLES = 10
MAX_SECONDS = 150


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator:
    settings = Settings(storage=str(tmp_path_factory.mktemp("store")), api_keys=KEYS,
                        builtin_models=False, max_tokens_cap=4, max_request_bytes=256 * 1024,
                        max_upload_bytes=1024 * 1024, max_line_bytes=64 * 1024)
    backend = LocalChatBackend(settings, dtype="float32", max_batch=4)
    app = create_app(settings, chat=backend)
    seed_objects(app)
    yield app
    backend.close()


def seed_objects(app) -> None:
    """A file and a job for each tenant, so that listings hand schemathesis real ids to read
    (its generated uploads are never valid JSONL, so it cannot create them itself); without
    an object to read, ``object_level_authorization`` has nothing to replay as the other
    tenant."""
    from fastapi.testclient import TestClient

    line = json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello"}]})
    with TestClient(app) as client:
        for key in KEYS:
            headers = {"Authorization": f"Bearer {key}"}
            r = client.post("/v1/files", headers=headers, data={"purpose": "fine-tune"},
                            files={"file": ("train.jsonl", f"{line}\n{line}\n".encode())})
            assert r.status_code == 200, r.text
            r = client.post("/v1/fine_tuning/jobs", headers=headers,
                            json={"model": "tuneserve/tiny-llama", "training_file": r.json()["id"]})
            assert r.status_code == 200, r.text


def schemathesis_config(tmp_path):
    from schemathesis.config import SchemathesisConfig

    identities = tmp_path / "identities.json"
    identities.write_text(json.dumps({"auth": [
        {"name": tenant, "fixedHeaders": [{"name": "Authorization", "value": f"Bearer {key}"}]}
        for key, tenant in KEYS.items()]}))
    return SchemathesisConfig.from_dict({
        "seed": SEED,
        "max-time": MAX_SECONDS,
        "request-timeout": 60,  # in process, but the machine is shared
        "cache": {"enabled": False},  # no state carried between runs: a run replays by seed
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "no-shrink": True},
        "checks": {"enabled": True},
        "phases": {"stateful": {"max-steps": 6}},
        "auth": {"wfc": {"path": str(identities), "peers": list(KEYS.values())}},
        "operations": [{
            # The document can say "a file", not "JSONL whose every line is a conversation";
            # that is what the endpoint checks, and rejects naming the line (400). Generated
            # bytes are never such a file, so acceptance of "schema-valid" uploads is not a
            # property of this operation. Every other check runs on it.
            "include-path": "/v1/files", "include-method": "POST",
            "checks": {"positive_data_acceptance": {"enabled": False}},
        }],
    })


def _failures(events) -> tuple[list[str], list[str], set[str]]:
    """(failures, errors, operations tested) from the engine's event stream."""
    from schemathesis.engine import events as ev

    failures, errors, tested = [], [], set()
    for event in events:
        if isinstance(event, ev.ScenarioFinished):
            tested.add(event.recorder.label)
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        failures.append(f"{event.recorder.label}: {check.name}: "
                                        f"{failure.title} — {failure.message[:400]}\n"
                                        f"{check.failure_info.code_sample[:600]}")
        elif isinstance(event, ev.NonFatalError):
            errors.append(f"{event.label}: {event.info.message[:400]}")
        elif isinstance(event, ev.EngineFinished):
            failures += [f"{f.operation}: {f.title} — {f.message[:400]}" for f in event.failures]
        elif isinstance(event, ev.FatalError):
            errors.append(f"fatal: {event.exception!r}")
    return failures, errors, tested


def count_probes(monkeypatch) -> dict[str, int]:
    """How many requests each auth check sent beyond the generated ones: zero failures mean
    something only if the checks did probe (``ignored_auth`` without or with a spoiled key,
    ``object_level_authorization`` as the other tenant)."""
    from schemathesis.specs.openapi import checks, object_authorization

    sent = {"ignored_auth": 0, "object_level_authorization": 0}
    for module, name in ((checks, "ignored_auth"),
                         (object_authorization, "object_level_authorization")):
        def counted(*args, _send=module.send_probe, _name=name, **kwargs):
            sent[_name] += 1
            return _send(*args, **kwargs)
        monkeypatch.setattr(module, "send_probe", counted)
    return sent


@pytest.mark.slow  # no Ray, but it fuzzes for up to MAX_SECONDS: out of the inner loop
def test_schemathesis_finds_nothing(app, tmp_path, monkeypatch):
    probes = count_probes(monkeypatch)
    started = time.monotonic()
    # The document is behind the keys like the API (any tenant's key reads it).
    schema = schemathesis.openapi.from_asgi("/openapi.json", app,
                                            config=schemathesis_config(tmp_path),
                                            headers={"Authorization": "Bearer key-alice"})
    failures, errors, tested = _failures(schemathesis.engine.from_schema(schema).execute())
    seconds = time.monotonic() - started
    assert not errors, "\n".join(errors)
    assert not failures, "\n".join(sorted(set(failures)))
    # Every operation of the document was exercised (files, jobs, models, chat).
    operations = {f"{m.upper()} {p}" for p, ops in app.openapi()["paths"].items() for m in ops}
    assert tested >= operations - {"GET /healthz", "GET /readyz"}, operations - tested
    assert seconds < MAX_SECONDS + 60
    assert probes["ignored_auth"] > 0 and probes["object_level_authorization"] > 0, probes
