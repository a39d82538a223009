"""The ``tuneserve`` command: ``up`` runs the service; ``train`` runs one training run without the API."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from pydantic import ValidationError

log = logging.getLogger("tuneserve")


def _settings(args: argparse.Namespace):
    from service.settings import Settings

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
    import ray
    from ray import serve

    from service.serve_app import build_app

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    if settings.ray_address:
        ray.init(address=settings.ray_address)
    else:
        # Embedded mode: a local Ray on loopback only, no dashboard (it would listen on a port).
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                 _node_ip_address="127.0.0.1", namespace="tuneserve")
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings.model_dump(mode="json")), name="tuneserve",
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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
