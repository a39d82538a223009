"""Chat completions and models through the API with the in-process engine (LocalChatBackend).

A real uvicorn on a socket and the official ``openai`` client; the tiny model and adapters
written in the training engine's layout.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn

from service.api.app import create_app
from service.chat.backends import LocalChatBackend
from service.jobs.store import JobRecord, JobStore
from service.core.settings import Settings
from tests.helpers import free_port, scrape_metrics, wait_until
from tests.serving_adapters import new_job_id, write_adapter
from training.model import registry as models

TINY = models.TINY_MODEL_ID
CAP = 512
HI = [{"role": "user", "content": "Hi"}]


def add_tuned_model(storage, tenant: str, *, seed: int, suffix: str = "demo",
                    checkpoint_step: int | None = None) -> str:
    """A succeeded job with its final adapter (and a checkpoint); returns the model name."""
    job_id = new_job_id()
    tiny_dir = models.resolve_model(TINY)
    if checkpoint_step is not None:
        write_adapter(storage, tiny_dir, TINY, seed=seed + 100, job_id=job_id,
                      step=checkpoint_step, tenant=tenant)
    write_adapter(storage, tiny_dir, TINY, seed=seed, job_id=job_id, tenant=tenant)
    name = f"ft:{TINY}:{suffix}:{job_id}"
    JobStore(storage).create(JobRecord(
        id=job_id, created_at=int(time.time()), status="succeeded", model=TINY,
        training_file="file-" + "0" * 24, seed=seed, organization_id=tenant, suffix=suffix,
        fine_tuned_model=name, finished_at=int(time.time())))
    return name


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 20, 0.05, what="uvicorn")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    settings = Settings(storage=str(tmp_path_factory.mktemp("storage")),
                        api_keys={"key-alice": "alice", "key-bob": "bob"},
                        max_tokens_cap=CAP, chat_max_concurrency=3, max_adapters_per_replica=2)
    backend = LocalChatBackend(settings, dtype="float32")
    app = create_app(settings, chat=backend)
    storage = app.state.storage
    tuned = add_tuned_model(storage, "alice", seed=1, checkpoint_step=2)
    with serve(app) as url:
        yield {"url": url, "storage": storage, "backend": backend, "tuned": tuned}
    backend.close()


def client(service, key: str = "key-alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=service["url"] + "/v1", api_key=key, max_retries=0)


def engine(service):
    return service["backend"]._servers[TINY].engine


def ask(service, model: str, *, stream: bool = False, key: str = "key-alice", **kw) -> str:
    kw = {"max_tokens": 16, "temperature": 0} | kw
    openai_client = client(service, key)
    if not stream:
        reply = openai_client.chat.completions.create(model=model, messages=HI, **kw)
        return reply.choices[0].message.content
    chunks = openai_client.chat.completions.create(model=model, messages=HI, stream=True, **kw)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_chat_with_base_and_tuned_model_plain_and_streaming(service):
    openai_client = client(service)
    reply = openai_client.chat.completions.create(model=TINY, messages=HI, max_tokens=16,
                                                  temperature=0)
    assert reply.object == "chat.completion" and reply.model == TINY
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 16

    chunks = list(openai_client.chat.completions.create(
        model=TINY, messages=HI, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
        == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16

    tuned = service["tuned"]
    tuned_plain = ask(service, tuned)
    assert tuned_plain == ask(service, tuned, stream=True)
    assert tuned_plain != choice.message.content  # the adapter changes the answer


def test_checkpoint_answers_with_its_own_adapter(service):
    tuned = service["tuned"]
    checkpoint = ask(service, tuned + ":ckpt-step-2")
    assert checkpoint not in (ask(service, tuned), ask(service, TINY))


def test_job_that_just_succeeded_answers_its_first_request(service):
    name = add_tuned_model(service["storage"], "alice", seed=7, suffix="fresh")
    reply = client(service).chat.completions.create(model=name, messages=HI, max_tokens=8,
                                                    temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.choices[0].message.content != ask(service, TINY, max_tokens=8)


def test_metrics_report_adapter_hot_loads_and_adapters_loaded(service):
    loads = "tuneserve_adapter_load_seconds_count{}"
    before = scrape_metrics(service["url"], "key-alice")
    name = add_tuned_model(service["storage"], "alice", seed=8, suffix="metered")
    ask(service, name, max_tokens=4)  # the first request hot-loads the adapter
    after = scrape_metrics(service["url"], "key-alice")
    assert after[loads] == before.get(loads, 0) + 1
    assert after["tuneserve_adapter_load_seconds_sum{}"] > before.get(
        "tuneserve_adapter_load_seconds_sum{}", 0)
    assert after['tuneserve_adapters_loaded{replica="local"}'] >= 1

    ask(service, name, max_tokens=4, stream=True)  # loaded already: no second hot-load
    assert scrape_metrics(service["url"], "key-alice")[loads] == after[loads]


def test_models_list_and_retrieve_per_tenant(service):
    tuned = service["tuned"]
    alice = [m.id for m in client(service).models.list()]
    assert TINY in alice and tuned in alice and tuned + ":ckpt-step-2" in alice
    bob = [m.id for m in client(service, "key-bob").models.list()]
    assert TINY in bob and not [m for m in bob if m.startswith("ft:")]
    assert client(service).models.retrieve(tuned).owned_by == "alice"
    assert client(service).models.retrieve(TINY).id == TINY
    with pytest.raises(openai.NotFoundError):
        client(service, "key-bob").models.retrieve(tuned)


def test_other_tenants_and_wrong_names_get_404(service):
    tuned = service["tuned"]
    job_id = tuned.rsplit(":", 1)[1]
    for key, model in [("key-bob", tuned), ("key-bob", tuned + ":ckpt-step-2"),
                       ("key-alice", f"ft:{TINY}:other-suffix:{job_id}"),
                       ("key-alice", tuned + ":ckpt-step-3"), ("key-alice", "no-such-model")]:
        with pytest.raises(openai.NotFoundError) as info:
            ask(service, model, key=key)
        assert info.value.body["code"] == "model_not_found", model


def test_limits_are_400_naming_the_field(service):
    with pytest.raises(openai.BadRequestError) as info:
        ask(service, TINY, max_tokens=CAP + 1)
    assert info.value.body["param"] == "max_tokens" and str(CAP) in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        ask(service, TINY, max_tokens=None, max_completion_tokens=CAP + 1)
    assert info.value.body["param"] == "max_completion_tokens"
    long = [{"role": "user", "content": "hello " * 2100}]
    with pytest.raises(openai.BadRequestError) as info:
        client(service).chat.completions.create(model=TINY, messages=long, max_tokens=4)
    assert info.value.body["param"] == "messages" and "2048" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        ask(service, TINY, extra_body={"logit_bias_typo": 1})
    assert info.value.body["param"] == "logit_bias_typo"
    with pytest.raises(openai.BadRequestError) as info:
        ask(service, TINY, temperature=3)
    assert info.value.body["param"] == "temperature"


def test_stop_strings(service):
    full = ask(service, service["tuned"])
    stop = full[5:8]
    assert ask(service, service["tuned"], stop=[stop]) == full[:full.index(stop)]


def _open_stream(http: httpx.Client, url: str, body: dict) -> httpx.Response:
    response = http.send(http.build_request("POST", url + "/v1/chat/completions", json=body,
                                            headers={"Authorization": "Bearer key-alice"}),
                         stream=True)
    assert response.status_code == 200, response.read()
    return response


def test_saturation_is_429_with_retry_after_and_disconnects_free_slots(service):
    url, eng = service["url"], engine(service)
    body = {"model": TINY, "messages": HI, "max_tokens": CAP, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        streams = [_open_stream(http, url, body) for _ in range(3)]
        # Keep the line iterators: dropping one makes httpx close its response.
        lines = [response.iter_lines() for response in streams]
        for line in lines:
            assert next(line).startswith("data: ")
        assert eng.load[0] + eng.load[1] == 3
        refused = http.post(url + "/v1/chat/completions", json={**body, "stream": False},
                            headers={"Authorization": "Bearer key-alice"})
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        for response in streams:  # the clients hang up mid-stream
            response.close()
    wait_until(lambda: eng.load == (0, 0), 15, 0.05, what="slots freed after disconnect")
    assert ask(service, TINY, max_tokens=4)


def test_deleted_model_no_longer_answers(service):
    storage = service["storage"]
    name = add_tuned_model(storage, "alice", seed=3, suffix="doomed", checkpoint_step=1)
    ask(service, name)
    ask(service, name + ":ckpt-step-1")
    job_id = name.rsplit(":", 1)[1]
    assert f"{job_id}/final" in engine(service).adapters

    with pytest.raises(openai.NotFoundError):
        client(service, "key-bob").models.delete(name)
    deleted = client(service).models.delete(name)
    assert deleted.deleted and deleted.id == name

    for model in (name, name + ":ckpt-step-1"):
        with pytest.raises(openai.NotFoundError):
            ask(service, model)
    assert not [a for a in engine(service).adapters if a.startswith(job_id)]
    assert name not in [m.id for m in client(service).models.list()]
    assert not list(storage.iter(f"adapters/{job_id}/"))
    with pytest.raises(openai.BadRequestError):
        client(service).models.delete(TINY)
