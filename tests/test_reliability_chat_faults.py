"""A chat replica SIGKILLed under load: callers barely notice.

The shared ``tuneserve up`` (tiny model only), 8 clients chatting without pause — plain and
streaming, the base model and a tuned one (whose adapter the new replica must hot-load again) —
for about half a minute; a few seconds in, the ``Chat-tiny-llama`` replica's process is killed.
Serve starts a new one. What a user relies on: at most 1% of the requests fail, and once the new
replica answers, none does. A greedy stream cut by the kill is resumed on the new replica without
repeating or losing text (``Replay``, tested on its own below).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from service.chat.backends import (
    ChatCall,
    ChatOutput,
    ChatUnavailable,
    Replay,
    ReplicaStats,
    reproducible,
)
from tests.helpers import Service, wait_until
from tests.test_serving_api import add_tuned_model

TINY = "tuneserve/tiny-llama"
CLIENTS = 8
KILL_AFTER_S = 6.0
MIN_LOAD_S = 30.0
AFTER_RECOVERY_S = 8.0
"""The load runs at least this long once the new replica has answered."""
MAX_LOAD_S = 90.0


@dataclass
class Outcome:
    started: float
    ended: float
    ok: bool
    what: str
    model: str = ""
    text: str = ""


def chat_replicas(service: Service) -> list:
    """The service's tiny-model chat replica processes (Ray titles them after the actor)."""
    return service.processes("ServeReplica:tuneserve:Chat-tiny-llama")


def one_request(http: httpx.Client, model: str, stream: bool) -> tuple[bool, str, str]:
    """(answered, what went wrong, the answer's text)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8, "temperature": 0, "stream": stream}
    if not stream:
        response = http.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            return False, f"{response.status_code} {response.text[:200]}", ""
        choice = response.json()["choices"][0]
        return choice["finish_reason"] is not None, "no finish reason", choice["message"]["content"]
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return False, f"{response.status_code} {response.read()[:200]!r}", ""
        finish, text = None, ""
        for line in response.iter_lines():
            if line == "data: [DONE]":
                return finish is not None, "stream ended without a finish reason", text
            if line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return False, f"error event {chunk['error']}", text
                if chunk.get("choices"):
                    text += chunk["choices"][0].get("delta", {}).get("content") or ""
                    finish = chunk["choices"][0].get("finish_reason") or finish
        return False, "stream cut before [DONE]", text


def client_loop(url: str, model: str, stream: bool, stop: threading.Event,
                outcomes: list[Outcome]) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            started = time.monotonic()
            try:
                ok, what, text = one_request(http, model, stream)
            except httpx.HTTPError as exc:
                ok, what, text = False, f"{type(exc).__name__}: {exc}", ""
            outcomes.append(Outcome(started, time.monotonic(), ok, what, model, text))


@pytest.mark.slow
def test_killed_chat_replica_under_load_recovers(shared_service, shared_storage):
    service = shared_service
    tuned = add_tuned_model(shared_storage, "local", seed=5, suffix="faulty")
    [replica] = wait_until(lambda: chat_replicas(service), 30, what="the chat replica process")
    outcomes: list[Outcome] = []
    stop = threading.Event()
    clients = [threading.Thread(target=client_loop, daemon=True, args=(
        service.url, tuned if i % 4 >= 2 else TINY, i % 2 == 1, stop, outcomes))
        for i in range(CLIENTS)]
    began = time.monotonic()
    for thread in clients:
        thread.start()
    try:
        time.sleep(KILL_AFTER_S)
        killed_at = time.monotonic()
        os.kill(replica.pid, signal.SIGKILL)
        wait_until(lambda: [p for p in chat_replicas(service) if p.pid != replica.pid], 60,
                   what="Serve to start a new chat replica")

        def recovered_at() -> float | None:
            # The new replica answers: the first success of a request sent after the kill.
            done = [o.ended for o in list(outcomes) if o.ok and o.started > killed_at]
            return min(done) if done else None
        back = wait_until(recovered_at, 60, what="a request answered after the kill")
        end = max(began + MIN_LOAD_S, back + AFTER_RECOVERY_S)
        time.sleep(max(0.0, min(end, began + MAX_LOAD_S) - time.monotonic()))
    finally:
        stop.set()
        for thread in clients:
            thread.join(70)

    failed = [o for o in outcomes if not o.ok]
    after = [o for o in outcomes if o.started >= back]
    summary = (f"{len(outcomes)} requests, {len(failed)} failed, recovered "
               f"{back - killed_at:.1f} s after the kill; failures: "
               f"{[(round(o.started - killed_at, 1), o.what) for o in failed][:10]}")
    print(summary)  # the figures for the report (pytest -s)
    assert len(outcomes) >= 100, summary  # the load was real
    assert len(after) >= CLIENTS, summary
    assert len(failed) <= 0.01 * len(outcomes), summary
    assert not [o for o in after if not o.ok], summary
    # Greedy answers to one prompt: every request of a model, plain or streamed, cut by the
    # kill and resumed or not, has the same text (a resumed stream neither repeats nor drops).
    for model in (TINY, tuned):
        texts = {o.text for o in outcomes if o.ok and o.model == model}
        assert len(texts) == 1, (model, texts)


def test_a_resumed_stream_skips_what_the_caller_already_has():
    stats = ReplicaStats("Chat-tiny-llama#new", adapters_loaded=1, adapter_load_seconds=0.01)
    replay = Replay("Hello wor")  # sent before the replica died
    parts = [ChatOutput("Hel", replica=stats), ChatOutput("lo "), ChatOutput("world"),
             ChatOutput("!", finish_reason="stop", completion_tokens=4)]
    out = [replay.new_part(p) for p in parts]
    assert out[:2] == [None, None]
    assert out[2].text == "ld" and out[2].replica == stats  # the new replica is still reported
    assert out[3] == parts[3]
    assert Replay("").new_part(parts[0]) == parts[0]  # nothing sent yet: everything passes


def test_a_resumed_stream_that_says_something_else_fails():
    with pytest.raises(ChatUnavailable):
        Replay("Hello").new_part(ChatOutput("Help"))
    with pytest.raises(ChatUnavailable):  # ends before repeating what was sent
        Replay("Hello").new_part(ChatOutput("Hel", finish_reason="stop"))


def test_only_reproducible_answers_are_resumed():
    def call(**sampling) -> ChatCall:
        return ChatCall(base_model=TINY, adapter_id=None, messages=[], max_tokens=8, **sampling)
    assert reproducible(call(temperature=0))
    assert reproducible(call(temperature=0.8, seed=3))
    assert not reproducible(call(temperature=0.8))
