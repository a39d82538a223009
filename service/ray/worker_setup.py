"""What every Ray worker of the service runs first: Ray's ``worker_process_setup_hook``.

``tuneserve up`` names ``setup`` in its runtime_env, so Serve replicas, job drivers and training
workers all log as the API does; in embedded mode (``EMBEDDED_ENV``) they also keep Ray Serve's
inter-deployment gRPC server and HAProxy's stats and metrics ports on loopback, and Ray Train's
placement-group cleaner asks the GCS, not the dashboard, whether a run's controller lives.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
from collections.abc import Callable
from types import ModuleType

from service.core import logs

log = logging.getLogger(__name__)

EMBEDDED_ENV = "TUNESERVE_EMBEDDED"
"""Set to 1 by ``tuneserve up`` before it starts its own local Ray (no ``TUNESERVE_RAY_ADDRESS``);
Ray's processes and so every worker inherit it."""

HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
"""Ray's switch for HAProxy mode; on by default in embedded mode (why: ``service.cli.main``)."""

ANY_ADDRESS = "[::]:0"
LOOPBACK_ADDRESS = "127.0.0.1:0"


def setup() -> None:
    logs.setup_logging()
    if os.environ.get(EMBEDDED_ENV) == "1":
        bind_serve_grpc_to_loopback()
        if os.environ.get(HAPROXY_ENV) == "1":
            bind_haproxy_to_loopback()
        ask_the_gcs_whether_train_controllers_live()


def bind_serve_grpc_to_loopback() -> None:
    """Make each Serve replica's inter-deployment gRPC server listen on loopback, not ``[::]``.

    Ray 2.60 hard-codes ``add_port_to_grpc_server(self._server, "[::]:0")`` in
    ``ray/serve/_private/replica.py`` (``_on_initialized``) and has no setting for the address.
    In a cluster that is needed (replicas on other nodes call it), so this runs in embedded mode
    only, where the node address is 127.0.0.1 and every caller is on this machine.

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

    In HAProxy mode (``RAY_SERVE_ENABLE_HA_PROXY=1``, the embedded default: ``service.cli.main``)
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
    dashboard, which the embedded Ray runs without (its processes slow training:
    ``service.cli.main``). There each question fails: the cleaner logs a warning every second of
    every run and never cleans up. This asks the GCS, which the State API asks too, with the
    same answer (an actor the GCS does not know of counts as dead).
    Patched where the module is imported (in the cleaner's and the controller's workers):
    importing Ray Train here would cost every worker seconds of CPU.
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
