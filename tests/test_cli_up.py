"""``tuneserve up`` as a user runs it: answers the probes and the model list, tunes its own
processes for one machine (and only them), stops on Ctrl-C."""

from __future__ import annotations

import contextlib
import io
import json

import httpx
import openai
import psutil
import pytest

from service.ray.embedded import CHAT_REPLICA_ENV, CPU_TRAINING_ENV, TIMER_SLACK_NS
from tests.helpers import Service, wait_until

TINY = "tuneserve/tiny-llama"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    # Its own, not the shared one: this module starts and stops it, with the default settings.
    svc = Service(str(tmp_path_factory.mktemp("up") / "storage")).start()
    yield svc
    svc.stop()  # a no-op once test_stops_clean_on_ctrl_c has stopped it


@pytest.mark.slow
def test_up_answers_probes_and_models(service):
    assert httpx.get(f"{service.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{service.url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"storage": "ok", "Chat-smollm2-135m-instruct": "ok",
                                      "Chat-tiny-llama": "ok"}
    models = httpx.get(f"{service.url}/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in ids
    assert all(m["object"] == "model" for m in models["data"])


@pytest.mark.slow
def test_its_processes_are_tuned_for_one_machine(service):
    """What ``service.ray.embedded`` sets reaches the processes it is for, and no others: timer
    slack everywhere in its Ray, OpenMP's passive waits in the chat replicas only, glibc's
    allocator settings in CPU training workers only."""
    family = psutil.Process(service.proc.pid).children(recursive=True)
    # Its own local Ray runs as its children (GCS, raylet, workers).
    ray_children = [p for p in family if "raylet" in p.name() or "gcs_server" in p.name()]
    assert len(ray_children) >= 2
    chats = service.processes("ServeReplica:tuneserve:Chat-")
    [api] = service.processes("ServeReplica:tuneserve:Api")
    assert len(chats) == 2
    for p in ray_children + chats + [api]:
        with open(f"/proc/{p.pid}/timerslack_ns") as f:
            assert int(f.read()) == TIMER_SLACK_NS, p.cmdline()[:1]
    for p in chats:
        assert CHAT_REPLICA_ENV.items() <= p.environ().items(), p.cmdline()[:1]
    for p in [api, *ray_children]:
        assert not CHAT_REPLICA_ENV.keys() & p.environ().keys(), p.cmdline()[:1]
        assert not CPU_TRAINING_ENV.keys() & p.environ().keys(), p.cmdline()[:1]

    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="local", max_retries=2)
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."},
                          {"role": "assistant", "content": f"{i}"}]} for i in range(64)]
    file = client.files.create(file=("train.jsonl", io.BytesIO(
        "\n".join(map(json.dumps, rows)).encode())), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=TINY, training_file=file.id,
                                         hyperparameters={"n_epochs": 20})
    try:
        [worker] = wait_until(lambda: service.processes("RayTrainWorker"), 180,
                              what="the job's training worker")
        environ = worker.environ()
        assert CPU_TRAINING_ENV.items() <= environ.items()
        assert not CHAT_REPLICA_ENV.keys() & environ.keys()
    finally:
        with contextlib.suppress(openai.ConflictError):  # finished already
            client.fine_tuning.jobs.cancel(job.id)


@pytest.mark.slow
def test_stops_clean_on_ctrl_c(service):
    family = psutil.Process(service.proc.pid).children(recursive=True)
    assert service.stop() == 0
    _, alive = psutil.wait_procs(family, timeout=20)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left behind after SIGINT: {[p.cmdline()[:2] for p in alive]}"


def test_invalid_setting_fails_at_start_naming_the_variable(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "service.cli.main", "up"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "TUNESERVE_PORT": "not-a-port",
                              "HOME": str(tmp_path)}, timeout=60)
    assert out.returncode != 0
    assert "TUNESERVE_PORT" in out.stderr


def test_public_bind_without_api_keys_is_refused(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "service.cli.main", "up", "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode != 0
    assert "TUNESERVE_API_KEYS" in out.stderr


def test_ports_it_picks_are_free_and_outside_the_range_the_kernel_hands_out():
    """``up`` picks HAProxy's stats and metrics ports (and Serve's fallback proxy's) before its
    Ray starts; Ray's own port-0 servers and connections draw from the ephemeral range, so a
    port picked there could be taken before HAProxy binds it."""
    import socket

    from service.ray.embedded import free_loopback_port

    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    ports = [free_loopback_port() for _ in range(50)]
    assert all(20000 <= p < ephemeral_low for p in ports), ports
    assert len(set(ports)) > 40  # drawn at random, so two services do not pick the same ones
    for port in ports[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_only_cpu_training_workers_get_the_allocator_settings(monkeypatch):
    """``tuneserve up`` and ``tuneserve train`` name glibc's settings for the CPU training
    workers; a GPU worker, or any worker where no launcher named them (a cluster), gets none."""
    from service.ray import embedded
    from training.run import CPU_WORKER_ENV, worker_env

    monkeypatch.delenv(CPU_WORKER_ENV, raising=False)  # restored after the test
    for name in embedded.CPU_TRAINING_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not embedded.CPU_TRAINING_ENV.keys() & worker_env(use_gpu=False).keys()
    embedded.set_training_env()
    assert embedded.CPU_TRAINING_ENV.items() <= worker_env(use_gpu=False).items()
    assert not embedded.CPU_TRAINING_ENV.keys() & worker_env(use_gpu=True).keys()
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")  # the environment wins
    embedded.set_training_env()
    assert worker_env(use_gpu=False)["MALLOC_TOP_PAD_"] == "0"
