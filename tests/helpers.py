"""Small helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Self

import httpx

if TYPE_CHECKING:
    from service.core.storage.config import StorageConfig

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def in_process_app(storage_dir: Path):
    """An API app in this process (uvicorn on loopback) with the tiny model answering through
    ``LocalChatBackend``: keys ``key-alice`` and ``key-bob``, and one tuned adapter of alice's.
    Yields ``(url, tuned model name, storage)``. Work the app starts (eval runs, data generation)
    runs beside it, the path a deployment without Serve takes."""
    from service.api.app import create_app
    from service.chat.backends import LocalChatBackend
    from service.core.settings import Settings
    from tests.test_serving_api import add_tuned_model, serve

    settings = Settings(storage=str(storage_dir),
                        api_keys={"key-alice": "alice", "key-bob": "bob"}, max_tokens_cap=64,
                        builtin_models=False)
    backend = LocalChatBackend(settings, dtype="float32")
    app = create_app(settings, chat=backend)
    tuned = add_tuned_model(app.state.storage, "alice", seed=3)
    try:
        with serve(app) as url:
            yield url, tuned, app.state.storage
    finally:
        backend.close()


def api(url: str, key: str = "key-alice") -> httpx.Client:
    """An HTTP client on ``url``'s ``/v1`` with ``key`` as its bearer token."""
    return httpx.Client(base_url=f"{url}/v1", headers={"Authorization": f"Bearer {key}"},
                        timeout=120)


def free_port() -> int:
    """A free loopback port that the processes a test starts will not take first."""
    from service.ray.embedded import free_loopback_port

    return free_loopback_port()


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def start_until_ready(args: list[str], env: dict[str, str], log_path: Path, url: str,
                      timeout: float, what: str, interval: float = 0.5):
    """Start a server process (its own session, output to ``log_path``) and wait until its
    ``/readyz`` answers 200; fail at once, with its log, if it exits first.
    Returns the process and the open log file (the caller closes it when stopping)."""
    log = open(log_path, "ab")  # noqa: SIM115 - closed by the caller's stop
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early:\n{log_path.read_text()[-4000:]}")
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    try:
        wait_until(up, timeout, interval=interval, what=f"{what} to be ready")
    except BaseException:
        log.close()
        with contextlib.suppress(ProcessLookupError):  # and what it started (its session)
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc, log


class Service:
    """``tuneserve up`` in a subprocess, as a user starts it."""

    def __init__(self, storage: str, env: dict[str, str] | None = None, port: int | None = None):
        self.storage = storage
        self.chosen_port = port is not None
        self.env = {**os.environ, **(env or {})}
        self.use_port(port or free_port())
        self.proc: subprocess.Popen | None = None

    def use_port(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        folder = (Path(self.storage).parent if "://" not in self.storage
                  else Path(os.environ.get("TMPDIR", "/tmp")))
        self.log_path = folder / f"tuneserve-{port}.log"
        self.args = [sys.executable, "-m", "service.cli.main", "up", "--port", str(port),
                     "--storage", self.storage]

    def start(self, timeout: float = 240) -> Service:
        try:
            self.proc, self.log = start_until_ready(self.args, self.env, self.log_path, self.url,
                                                    timeout, what="tuneserve up")
        except RuntimeError as error:
            # A free port picked here can still be bound by another process before HAProxy
            # binds it (seen once in CI): start once more on another port, unless the test
            # chose the port.
            if self.chosen_port or "Address already in use" not in str(error):
                raise
            self.use_port(free_port())
            self.proc, self.log = start_until_ready(self.args, self.env, self.log_path, self.url,
                                                    timeout, what="tuneserve up")
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def storage_config(self) -> StorageConfig:
        """Its storage, opened by a test; S3 needs the AWS variables set in the test's process."""
        from service.core.storage.config import StorageConfig

        return StorageConfig(uri=self.storage,
                             endpoint_url=self.env.get("TUNESERVE_S3_ENDPOINT_URL"))

    def processes(self, *markers: str) -> list:
        """The service's own processes (its Ray is a child of it) whose command line holds
        one of ``markers`` (Ray titles its workers after their actor, e.g. ``RayTrainWorker``)."""
        import psutil

        found = []
        for proc in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                command = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if any(marker in command for marker in markers):
                found.append(proc)
        return found

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        finally:
            self.log.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def scrape_metrics(url: str, key: str | None = None) -> dict[str, float]:
    """``{'name{label="v",…}': value}`` from ``<url>/metrics``, parsed as Prometheus text;
    ``key`` is any tenant's API key (None where the service has no keys)."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    response.raise_for_status()
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def sorting_lines(n: int, seed: int) -> bytes:
    """``n`` seeded chat examples that sort a few digits: a task the tiny model can learn."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        xs = [rng.randint(0, 9) for _ in range(rng.randint(2, 6))]
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"Sort: {' '.join(map(str, xs))}"},
            {"role": "assistant", "content": " ".join(map(str, sorted(xs)))}]}))
    return ("\n".join(lines) + "\n").encode()


def own_train_workers() -> list:
    """This test process's Ray Train workers (descendants of it: our local Ray), so training
    workers of anyone else on the machine are never touched."""
    import psutil

    found = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def exported_full_model(storage, job_id: str, base_model: str, folder: Path) -> Path:
    """A full fine-tune's exported model (``adapters/<job>/final``) in ``folder``, with the base
    model's tokenizer files beside it, so it loads as a model of its own."""
    import shutil

    from training.model import registry

    storage.download_prefix(f"adapters/{job_id}/final", folder)
    assert (folder / "model.safetensors").exists() and not (folder / "adapter_config.json").exists()
    for path in registry.resolve_model(base_model).iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(path, folder / path.name)
    return folder
