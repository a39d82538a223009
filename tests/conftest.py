"""Shared fixtures: a real S3 server (SeaweedFS), storage on both backends, a local Ray, and one
``tuneserve up`` that the end-to-end tests share.

``shared_service``: a running, ready ``tests.helpers.Service`` (``.url``, ``.processes()``,
``.stop()``), one ``tuneserve up`` for the session on SeaweedFS S3 (a prefix of its own), without
API keys (any key works; the tenant is ``local``), one CPU per training worker, and only the tiny
model's chat deployment (``TUNESERVE_BUILTIN_MODELS=false``). ``shared_storage`` is its storage,
opened in the test (the AWS variables set for it). Use them instead of starting a service::

    def test_a_job(shared_service, shared_storage):
        client = openai.OpenAI(base_url=f"{shared_service.url}/v1", api_key="local")

It is shared, so a test uses its own files, jobs and models (listings hold other tests'), leaves
no job running (cancel in ``finally``), and kills only processes that Serve or the scheduler
brings back. A test may stop it (``shared_service.stop()``): the next test gets it started again
on the same storage. Start a service of your own only for settings this one lacks (API keys, a
private Ray temp dir) or to test starting and stopping, and say why in one line.

Tests that use ``shared_service`` or ``ray_local`` are marked ``slow`` here; the ones that use
``shared_service`` run one after another (collection moves them together) and it stops after the
last of them, so that it does not idle beside later tests.

S3 credentials reach code the way they do in production, through the standard AWS variables:
``s3_storage_config`` sets them for the test (monkeypatch, undone afterwards) and ``ray_local``
hands them to every Ray worker through ``runtime_env``. ``s3_server`` itself changes nothing
global.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator

import httpx
import pytest

from service.core.storage import Storage, open_storage
from service.core.storage.config import StorageConfig
from tests.helpers import Service, wait_until
from tests.s3server import S3Server

SHARED = "shared_service"
SLOW_FIXTURES = {"ray_local", SHARED}
"""A test that uses one of these starts Ray (or a whole service): it is ``slow``."""


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by mark
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    shared = [item for item in items if SHARED in item.fixturenames]
    if shared:  # together, at the place of the first (the order among them is kept)
        first = items.index(shared[0])
        others = [item for item in items if SHARED not in item.fixturenames]
        items[:] = others[:first] + shared + others[first:]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS for the session: ``endpoint_url``, ``access_key``, ``secret_key``,
    ``bucket`` and ``env`` (the AWS variables). ``stop()``/``start()`` keep its data."""
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_storage_config(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> StorageConfig:
    """A fresh ``s3://bucket/<random prefix>`` per test, with the AWS variables set."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    return StorageConfig(uri=f"s3://{s3_server.bucket}/{prefix}",
                         endpoint_url=s3_server.endpoint_url)


@pytest.fixture(params=["local", "s3"])
def storage_config(request: pytest.FixtureRequest, tmp_path) -> StorageConfig:
    """A fresh, empty storage root on each backend in turn (S3 starts only when needed)."""
    if request.param == "local":
        return StorageConfig(uri=str(tmp_path / "storage"))
    return request.getfixturevalue("s3_storage_config")


@pytest.fixture
def storage(storage_config: StorageConfig) -> Storage:
    return open_storage(storage_config)


@pytest.fixture(scope="session")
def ray_local(s3_server: S3Server) -> Iterator[None]:
    """A local Ray with 2 CPUs for the session; workers get the S3 variables of ``s3_server``."""
    import ray

    # A short temp dir: Ray's unix socket paths must stay under 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir,
             object_store_memory=512 * 1024 * 1024,
             runtime_env={"env_vars": s3_server.env})
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def _shared_process(s3_server: S3Server) -> Iterator[Service]:
    storage = f"s3://{s3_server.bucket}/shared-{uuid.uuid4().hex[:12]}"
    env = {**s3_server.env, "TUNESERVE_S3_ENDPOINT_URL": s3_server.endpoint_url,
           "TUNESERVE_CPUS_PER_WORKER": "1", "TUNESERVE_BUILTIN_MODELS": "false",
           # Webhooks to a receiver on loopback, retried after 1 s, 2 s, … (tests/test_webhooks.py)
           "TUNESERVE_WEBHOOK_SECRETS": "local:whsec_dHVuZXNlcnZlLXNoYXJlZC13ZWJob29rLWtleQ==",
           "TUNESERVE_WEBHOOK_ALLOW_PRIVATE": "true", "TUNESERVE_WEBHOOK_RETRY_S": "1"}
    service = Service(storage, env=env)  # started by the first test that uses it
    yield service
    service.stop()


@pytest.fixture
def shared_service(_shared_process: Service, request: pytest.FixtureRequest) -> Iterator[Service]:
    """The session's ``tuneserve up`` (see the module docstring), running and ready."""
    service = _shared_process
    if not service.running:
        if service.proc is not None and service.proc.returncode != 0:  # not stopped by a test
            warnings.warn(f"the shared service exited with {service.proc.returncode}; starting "
                          f"it again (its log: {service.log_path})", stacklevel=1)
        service.start()

    def ready() -> bool:
        try:
            return httpx.get(f"{service.url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False
    # A test before may have killed a replica that Serve is still bringing back.
    wait_until(ready, 120, what=f"the shared service to be ready (its log: {service.log_path})")
    yield service
    later = request.session.items[request.session.items.index(request.node) + 1:]
    if not any(SHARED in item.fixturenames for item in later):
        service.stop()  # the tests after the last user get its CPU and memory back


@pytest.fixture
def shared_storage(shared_service: Service, s3_server: S3Server,
                   monkeypatch: pytest.MonkeyPatch) -> Storage:
    """The shared service's storage, with the AWS variables set for this test."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return open_storage(shared_service.storage_config())
