"""Shared fixtures: a real S3 server (SeaweedFS), storage on both backends, a local Ray.

S3 credentials reach code the way they do in production, through the standard AWS variables:
``s3_storage_config`` sets them for the test (monkeypatch, undone afterwards) and ``ray_local``
hands them to every Ray worker through ``runtime_env``. ``s3_server`` itself changes nothing
global.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from service.core.storage import Storage, open_storage
from service.core.storage.config import StorageConfig
from tests.s3server import S3Server


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
