"""The chat deployment on a real Ray Serve: multiplexed adapters (LRU), streaming, eviction.

One Serve application like ``service.ray.app`` builds (an ``Api`` ingress over the FastAPI
app with ``ServeChatBackend``, and ``ChatModel`` for the tiny model), adapters in real S3,
driven with the ``openai`` client over Serve's HTTP proxy.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from service.core.names import deployment_name
from service.core.settings import Settings
from service.core.storage import open_storage
from tests.helpers import free_port, scrape_metrics, wait_until
from tests.test_serving_api import HI, TINY, add_tuned_model

pytestmark = pytest.mark.slow

APP = "chat-test"


@pytest.fixture(scope="module")
def served(ray_local, s3_server, tmp_path_factory):
    # Not the shared service: a Serve app in the test's own Ray, for a handle on the chat
    # deployment and settings ``tuneserve up`` does not take (2 adapters, 3 concurrent chats).
    import os

    from ray import serve

    from serving.deployment import ChatModel

    os.environ.update(s3_server.env)  # the driver writes adapters to the same S3
    settings = Settings(storage=f"s3://{s3_server.bucket}/serve-test",
                        s3_endpoint_url=s3_server.endpoint_url,
                        api_keys={"key-alice": "alice", "key-bob": "bob"},
                        max_tokens_cap=512, chat_max_concurrency=3)
    settings_args = settings.model_dump(mode="json")
    storage = open_storage(settings.storage_config())

    def build_api():
        from service.api.app import create_app
        from service.chat.backends import ServeChatBackend

        replica_settings = Settings(**settings_args)
        return create_app(replica_settings, chat=ServeChatBackend(replica_settings))

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(build_api)
    class Api:
        def __init__(self, chat):
            pass

    chat = ChatModel.options(name=deployment_name(TINY)).bind(
        base_model=TINY, settings_args=settings_args, max_adapters=2, dtype="float32")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Api.bind(chat), name=APP, route_prefix="/")
    handle = serve.get_deployment_handle(deployment_name(TINY), app_name=APP)
    yield {"url": f"http://127.0.0.1:{port}", "storage": storage, "handle": handle}
    serve.delete(APP)
    serve.shutdown()


def ask(served, model: str, *, stream: bool = False, key: str = "key-alice") -> str:
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key=key, max_retries=0)
    kw = {"model": model, "messages": HI, "max_tokens": 12, "temperature": 0}
    if not stream:
        return client.chat.completions.create(**kw).choices[0].message.content
    chunks = client.chat.completions.create(stream=True, **kw)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def loaded(served) -> list[str]:
    return served["handle"].loaded_adapters.remote().result(timeout_s=30)


def test_chat_through_serve_with_multiplexed_adapters(served):
    storage = served["storage"]
    base = ask(served, TINY)
    assert ask(served, TINY, stream=True) == base

    # Three jobs that succeed while the deployment runs; room for two adapters per replica.
    a, b, c = (add_tuned_model(storage, "alice", seed=s, suffix=f"s{s}") for s in (11, 12, 13))
    metrics_before = scrape_metrics(served["url"], "key-bob")
    first = {name: ask(served, name) for name in (a, b)}
    # The replica reports its hot-loads and adapters to the API's /metrics with its answers
    # (read with bob's key: any tenant's key reads /metrics).
    metrics = scrape_metrics(served["url"], "key-bob")
    loads = "tuneserve_adapter_load_seconds_count{}"
    assert metrics[loads] - metrics_before.get(loads, 0) == 2
    held = {k: v for k, v in metrics.items() if k.startswith("tuneserve_adapters_loaded{")}
    assert list(held.values()) == [2] and f'replica="{deployment_name(TINY)}#' in next(iter(held))
    assert first[a] != base and first[b] != base and first[a] != first[b]
    assert sorted(loaded(served)) == sorted(n.rsplit(":", 1)[1] + "/final" for n in (a, b))

    assert ask(served, c, stream=True) == ask(served, c)  # loads c, evicts a (LRU)
    assert len(loaded(served)) == 2 and a.rsplit(":", 1)[1] + "/final" not in loaded(served)
    assert ask(served, a) == first[a]  # reloaded after eviction: same answer

    with pytest.raises(openai.NotFoundError):
        ask(served, a, key="key-bob")

    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="key-alice", max_retries=0)
    assert client.models.delete(a).deleted
    assert a.rsplit(":", 1)[1] + "/final" not in loaded(served)
    with pytest.raises(openai.NotFoundError):
        ask(served, a)


def test_saturation_and_disconnect_through_serve(served):
    body = {"model": TINY, "messages": HI, "max_tokens": 512, "temperature": 0, "stream": True}
    headers = {"Authorization": "Bearer key-alice"}
    url = served["url"] + "/v1/chat/completions"
    with httpx.Client(timeout=60) as http:
        streams = [http.send(http.build_request("POST", url, json=body, headers=headers),
                             stream=True) for _ in range(3)]
        lines = [s.iter_lines() for s in streams]
        for line in lines:
            assert next(line).startswith("data: ")
        refused = http.post(url, json={**body, "stream": False}, headers=headers)
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        for response in streams:
            response.close()
    wait_until(lambda: served["handle"].load.remote().result(timeout_s=30) == (0, 0), 30, 0.2,
               what="the replica to free the rows of disconnected clients")
