"""``/readyz`` tells the truth about the chat deployments: 503 naming the one that cannot answer,
200 again once it can.

Through Serve: the shared ``tuneserve up`` (tiny model only) while its chat replica's process
is killed, until Serve has started a new one. In process: the local engine whose generation
thread stopped.
"""

from __future__ import annotations

import os
import signal

import httpx
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.chat.backends import LocalChatBackend
from service.core.settings import Settings
from tests.helpers import wait_until

TINY = "tuneserve/tiny-llama"
DEPLOYMENT = "Chat-tiny-llama"
HI = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def readyz(url: str) -> httpx.Response:
    return httpx.get(f"{url}/readyz", timeout=15)


def test_503_names_the_chat_deployment_while_its_replica_is_down(shared_service):
    service = shared_service
    ready = readyz(service.url)
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready", "checks": {"storage": "ok", DEPLOYMENT: "ok"}}
    [replica] = wait_until(lambda: service.processes(f"ServeReplica:tuneserve:{DEPLOYMENT}"), 30,
                           what="the chat replica's process")

    os.kill(replica.pid, signal.SIGKILL)
    down = wait_until(lambda: (r := readyz(service.url)).status_code == 503 and r, 30,
                      interval=0.2, what="/readyz to answer 503").json()
    assert down["status"] == "not ready"
    assert down["checks"]["storage"] == "ok"
    assert "replica" in down["checks"][DEPLOYMENT], down  # says why, naming the deployment

    wait_until(lambda: readyz(service.url).status_code == 200, 180, interval=0.5,
               what="/readyz to answer 200 again")
    [new] = service.processes(f"ServeReplica:tuneserve:{DEPLOYMENT}")
    assert new.pid != replica.pid  # Serve started a new replica: that is what answers
    chat = httpx.post(f"{service.url}/v1/chat/completions", json=HI, timeout=60)
    assert chat.status_code == 200, chat.text


def test_local_engine_whose_generation_thread_stopped_is_not_ready(tmp_path):
    settings = Settings(storage=str(tmp_path / "storage"), builtin_models=False)
    backend = LocalChatBackend(settings, dtype="float32")
    with TestClient(create_app(settings, chat=backend)) as client:
        # Engines start on first use: none expected to answer before.
        assert client.get("/readyz").json() == {"status": "ready", "checks": {"storage": "ok"}}
        assert client.post("/v1/chat/completions", json=HI).status_code == 200
        assert client.get("/readyz").json()["checks"] == {"storage": "ok", DEPLOYMENT: "ok"}

        backend.close()  # ends the engine's generation thread
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"] == {"storage": "ok",
                                          DEPLOYMENT: "its generation loop stopped"}
