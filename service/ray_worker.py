"""What every Ray worker of the service runs first: Ray's ``worker_process_setup_hook``.

``tuneserve up`` names ``setup`` in its runtime_env, so Serve replicas, job drivers and training
workers all log as the API does; in embedded mode (``EMBEDDED_ENV``) they also keep Ray Serve's
inter-deployment gRPC server on loopback.
"""

from __future__ import annotations

import logging
import os
import sys

from service import logs

log = logging.getLogger(__name__)

EMBEDDED_ENV = "TUNESERVE_EMBEDDED"
"""Set to 1 by ``tuneserve up`` before it starts its own local Ray (no ``TUNESERVE_RAY_ADDRESS``);
Ray's processes and so every worker inherit it."""

ANY_ADDRESS = "[::]:0"
LOOPBACK_ADDRESS = "127.0.0.1:0"


def setup() -> None:
    logs.setup_logging()
    if os.environ.get(EMBEDDED_ENV) == "1":
        bind_serve_grpc_to_loopback()


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
