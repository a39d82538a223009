"""``tuneserve up`` as a user runs it: answers the probes and the model list, stops on Ctrl-C."""

from __future__ import annotations

import httpx
import psutil
import pytest

from service.cli.main import EMBEDDED_TIMER_SLACK_NS
from tests.helpers import Service

pytestmark = pytest.mark.slow


def test_up_answers_probes_and_models_then_stops_clean(tmp_path):
    service = Service(str(tmp_path / "storage")).start()
    try:
        assert httpx.get(f"{service.url}/healthz").json() == {"status": "ok"}
        ready = httpx.get(f"{service.url}/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["storage"] == "ok"
        models = httpx.get(f"{service.url}/v1/models").json()
        ids = [m["id"] for m in models["data"]]
        assert "HuggingFaceTB/SmolLM2-135M-Instruct" in ids
        assert all(m["object"] == "model" for m in models["data"])
        # Its own local Ray runs as its children (GCS, raylet, workers).
        ray_children = [p for p in psutil.Process(service.proc.pid).children(recursive=True)
                        if "raylet" in p.name() or "gcs_server" in p.name()]
        assert len(ray_children) >= 2
        family = psutil.Process(service.proc.pid).children(recursive=True)
        # Every process of its local Ray lets the kernel batch its timer wakeups
        # (service.cli.main.coalesce_timers): the Serve replicas as well as the GCS and raylet.
        replicas = [p for p in family if "ServeReplica" in " ".join(p.cmdline())]
        assert replicas
        for p in ray_children + replicas:
            with open(f"/proc/{p.pid}/timerslack_ns") as f:
                assert int(f.read()) == EMBEDDED_TIMER_SLACK_NS, p.cmdline()[:1]
    finally:
        code = service.stop()
    assert code == 0
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

    from service.cli.main import free_loopback_port

    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    ports = [free_loopback_port() for _ in range(50)]
    assert all(20000 <= p < ephemeral_low for p in ports), ports
    assert len(set(ports)) > 40  # drawn at random, so two services do not pick the same ones
    for port in ports[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
