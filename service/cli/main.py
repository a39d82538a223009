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
from service.cli.client import DEFAULT_BASE_URL, CliError, client_options
from service.cli.client import add_commands as add_client_commands
from service.core import logs
from service.ray import embedded

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


def cmd_up(args: argparse.Namespace) -> int:
    settings = _settings(args)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    logs.add_secrets(settings.api_keys)

    if settings.ray_address:
        import ray

        # Every Ray worker of the service (Serve replicas, job drivers, training workers) logs
        # JSON lines through the same redacting formatter.
        ray.init(address=settings.ray_address,
                 runtime_env={"worker_process_setup_hook": "service.core.logs.setup_logging"})
    else:
        embedded.start_ray()  # a local Ray, tuned for this one machine (before Ray is imported)
    import ray
    from ray import serve

    from service.ray.app import SECRET_SETTINGS, build_app

    settings_args = settings.model_dump(mode="json", exclude=SECRET_SETTINGS)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        build = build_app if settings.ray_address else embedded.build_app
        app = build(settings_args)
        serve.run(app, name="tuneserve", route_prefix="/", blocking=False)
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

    embedded.set_training_env()  # its CPU workers are tuned as the embedded service's are

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
