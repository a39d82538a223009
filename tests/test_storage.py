"""Storage on both backends (local directory and real S3): every operation the service relies on."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import threading
import time

import httpx
import psutil
import pytest

from service.core.errors import AlreadyExists, InvalidRequest, NotFound, PreconditionFailed, StorageError
from service.core.storage import Storage, join_key, open_storage
from service.core.storage.config import StorageConfig
from tests.s3server import free_ports

# -- reads and writes --------------------------------------------------------------------------


def test_put_then_get_head_exists(storage: Storage):
    etag = storage.put("files/file-1/content", b'{"a": 1}\n')
    assert storage.get("files/file-1/content") == b'{"a": 1}\n'
    info = storage.head("files/file-1/content")
    assert info is not None
    assert (info.key, info.size, info.etag) == ("files/file-1/content", 9, etag)
    assert info.last_modified.tzinfo is not None
    assert storage.exists("files/file-1/content")


def test_put_streams_from_a_file_object(storage: Storage):
    storage.put("a/b", io.BytesIO(b"x" * 3_000_000))
    with storage.open("a/b") as f:
        first = f.read(1000)
        rest = f.read()
    assert first + rest == b"x" * 3_000_000


def test_open_supports_line_iteration(storage: Storage):
    storage.put("data.jsonl", b"one\ntwo\nthree\n")
    with storage.open("data.jsonl") as f:
        assert list(f) == [b"one\n", b"two\n", b"three\n"]


def test_overwrite_changes_etag(storage: Storage):
    first = storage.put("k", b"same size")
    second = storage.put("k", b"same size")
    assert first != second or storage.kind == "s3"  # S3's etag is the content MD5
    third = storage.put("k", b"other!!!!")
    assert third != first
    assert storage.get("k") == b"other!!!!"


def test_missing_key(storage: Storage):
    with pytest.raises(NotFound, match="'nope/x'"):
        storage.get("nope/x")
    with pytest.raises(NotFound):
        storage.open("nope/x")
    assert storage.head("nope/x") is None
    assert not storage.exists("nope/x")
    storage.delete("nope/x")  # deleting an absent key is fine, as on S3


def test_a_directory_is_not_an_object(storage: Storage):
    storage.put("jobs/j1/job.json", b"{}")
    assert storage.head("jobs/j1") is None
    with pytest.raises(NotFound):
        storage.get("jobs")


# -- listing -----------------------------------------------------------------------------------


def test_list_is_sorted_paginated_and_a_string_prefix(storage: Storage):
    keys = ["jobs/a/events/3", "jobs/a/events/1", "jobs/a/job.json", "jobs/a/events/2",
            "jobs/ab/job.json", "files/x"]
    for key in keys:
        storage.put(key, key.encode())

    page, has_more = storage.list("jobs/a/", limit=2)
    assert [i.key for i in page] == ["jobs/a/events/1", "jobs/a/events/2"] and has_more
    page, has_more = storage.list("jobs/a/", after=page[-1].key, limit=2)
    assert [i.key for i in page] == ["jobs/a/events/3", "jobs/a/job.json"] and not has_more

    assert [i.key for i in storage.iter("jobs/a")] == sorted(k for k in keys if k.startswith("jobs/a"))
    assert [i.key for i in storage.iter("")] == sorted(keys)
    assert storage.list("nothing/", limit=10) == ([], False)
    sizes = {i.key: i.size for i in storage.iter("")}
    assert sizes["files/x"] == len(b"files/x")


def test_delete_and_delete_prefix(storage: Storage):
    for key in ["jobs/a/1", "jobs/a/sub/2", "jobs/ab/3", "k"]:
        storage.put(key, b"x")
    storage.delete("k")
    assert not storage.exists("k")
    assert storage.delete_prefix("jobs/a/") == 2
    assert [i.key for i in storage.iter("")] == ["jobs/ab/3"]
    storage.put("jobs/a/again", b"y")  # the emptied prefix takes writes again
    assert storage.get("jobs/a/again") == b"y"


# -- conditional writes ------------------------------------------------------------------------


def test_create_if_absent(storage: Storage):
    etag = storage.create("jobs/j/job.json", b"first")
    assert storage.head("jobs/j/job.json").etag == etag
    with pytest.raises(AlreadyExists, match="jobs/j/job.json"):
        storage.create("jobs/j/job.json", b"second")
    assert storage.get("jobs/j/job.json") == b"first"


def test_eight_threads_racing_create_exactly_one_wins(storage: Storage):
    key = "jobs/race/job.json"
    barrier = threading.Barrier(8)
    winners: list[int] = []
    losers: list[Exception] = []

    def contend(i: int) -> None:
        barrier.wait()
        try:
            storage.create(key, f"writer {i}".encode())
            winners.append(i)
        except AlreadyExists as e:
            losers.append(e)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(winners) == 1 and len(losers) == 7
    assert storage.get(key) == f"writer {winners[0]}".encode()


def test_compare_and_swap(storage: Storage):
    v1 = storage.create("jobs/j/job.json", b'{"status": "queued"}')
    v2 = storage.replace("jobs/j/job.json", b'{"status": "running"}', v1)
    assert v2 != v1 and storage.head("jobs/j/job.json").etag == v2

    with pytest.raises(PreconditionFailed, match="changed since etag"):
        storage.replace("jobs/j/job.json", b'{"status": "cancelled"}', v1)  # stale
    assert storage.get("jobs/j/job.json") == b'{"status": "running"}'
    assert storage.head("jobs/j/job.json").etag == v2

    with pytest.raises(PreconditionFailed):
        storage.replace("jobs/absent/job.json", b"{}", v2)
    assert not storage.exists("jobs/absent/job.json")


def test_eight_threads_racing_compare_and_swap_exactly_one_wins(storage: Storage):
    etag = storage.create("jobs/cas/job.json", b"v0")
    barrier = threading.Barrier(8)
    winners: list[int] = []

    def contend(i: int) -> None:
        barrier.wait()
        try:
            storage.replace("jobs/cas/job.json", f"v1 by {i}".encode(), etag)
            winners.append(i)
        except PreconditionFailed:
            pass

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(winners) == 1
    assert storage.get("jobs/cas/job.json") == f"v1 by {winners[0]}".encode()


def test_local_leaves_no_temporary_files(tmp_path):
    storage = open_storage(StorageConfig(uri=f"file://{tmp_path}"))
    storage.create("jobs/j/job.json", b"a")
    with pytest.raises(AlreadyExists):
        storage.create("jobs/j/job.json", b"b")
    with pytest.raises(PreconditionFailed):
        storage.replace("jobs/j/job.json", b"c", "stale")
    assert os.listdir(tmp_path / "jobs" / "j") == ["job.json"]


# -- keys --------------------------------------------------------------------------------------

BAD_KEYS = ["", "/etc/passwd", "a//b", "a/../b", "..", "../x", "a/", "./a", "a\\b", "a\x00b"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_refused_and_nothing_is_written(storage: Storage, key: str):
    for write in (lambda: storage.put(key, b"x"), lambda: storage.create(key, b"x")):
        with pytest.raises(InvalidRequest, match="invalid storage key"):
            write()
    with pytest.raises(InvalidRequest):
        storage.get(key)
    assert list(storage.iter("")) == []


@pytest.mark.parametrize("parts", [("jobs", ".."), ("jobs", ""), ("/abs",), ("a", "b\\c"), ()])
def test_join_key_refuses_unsafe_parts(parts):
    with pytest.raises(InvalidRequest, match="invalid storage key"):
        join_key(*parts)


def test_join_key_joins_valid_parts():
    assert join_key("adapters", "ftjob-1/final", "manifest.json") == "adapters/ftjob-1/final/manifest.json"


def test_bad_prefix_is_refused(storage: Storage):
    with pytest.raises(InvalidRequest, match="invalid storage prefix"):
        storage.list("../")


# -- files and folders -------------------------------------------------------------------------


def test_upload_dir_and_download_prefix(storage: Storage, tmp_path):
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_model.safetensors").write_bytes(b"\x00" * 1000)
    (src / "sub" / "manifest.json").write_text("{}")
    keys = storage.upload_dir(src, "adapters/ftjob-1/final")
    assert keys == ["adapters/ftjob-1/final/adapter_model.safetensors",
                    "adapters/ftjob-1/final/sub/manifest.json"]
    dst = tmp_path / "copy"
    storage.download_prefix("adapters/ftjob-1/final/", dst)
    assert (dst / "adapter_model.safetensors").read_bytes() == b"\x00" * 1000
    assert (dst / "sub" / "manifest.json").read_text() == "{}"

    storage.download_file("adapters/ftjob-1/final/sub/manifest.json", tmp_path / "one.json")
    assert (tmp_path / "one.json").read_text() == "{}"
    with pytest.raises(NotFound):
        storage.download_file("adapters/none", tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_storage_pickles_as_its_config(storage: Storage):
    storage.put("k", b"v")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.config == storage.config and clone.get("k") == b"v"


# -- a large object ----------------------------------------------------------------------------

MiB = 1024 * 1024


class _GeneratedStream(io.RawIOBase):
    """``size`` bytes made on the fly (never held whole), hashed as they are handed out."""

    def __init__(self, size: int):
        self.left = size
        self.block = os.urandom(MiB)
        self.n = 0
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.left == 0:
            return 0
        n = min(len(buffer), self.left, MiB)
        chunk = self.n.to_bytes(8, "little") + self.block[8:n] if n >= 8 else self.block[:n]
        buffer[:n] = chunk
        self.n += 1
        self.left -= n
        self.sha.update(chunk)
        return n


class _PeakRSS:
    """Samples this process's resident memory every 10 ms."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / MiB


def test_200_mb_object_round_trips_with_little_memory(storage: Storage):
    size = 200 * MiB
    stream = _GeneratedStream(size)
    started = time.monotonic()
    with _PeakRSS() as up:
        etag = storage.put("models/big/model.safetensors", stream)
    uploaded = time.monotonic()
    assert storage.head("models/big/model.safetensors").size == size
    if storage.kind == "s3":
        assert etag.endswith(f"-{size // (8 * MiB)}")  # multipart: "<md5 of md5s>-<parts>"

    sha = hashlib.sha256()
    with _PeakRSS() as down, storage.open("models/big/model.safetensors") as f:
        while chunk := f.read(MiB):
            sha.update(chunk)
    assert sha.hexdigest() == stream.sha.hexdigest()
    print(f"{storage.kind}: 200 MiB up {uploaded - started:.1f}s (+{up.growth_mib:.0f} MiB RSS), "
          f"down {time.monotonic() - uploaded:.1f}s (+{down.growth_mib:.0f} MiB RSS)")
    # Far below the 200 MiB: about PARTS_IN_MEMORY parts of 8 MiB in flight, plus boto3 itself.
    assert up.growth_mib < 100 and down.growth_mib < 40
    storage.delete("models/big/model.safetensors")


# -- S3 specifics ------------------------------------------------------------------------------


def test_presigned_url_serves_the_object(s3_storage_config: StorageConfig):
    storage = open_storage(s3_storage_config)
    storage.put("files/f/content", b"hello")
    url = storage.presigned_url("files/f/content", expires=60)
    assert httpx.get(url).content == b"hello"
    tampered = url.replace("Signature=", "Signature=0")
    assert httpx.get(tampered).status_code == 403


def test_local_storage_has_no_presigned_urls(tmp_path):
    with pytest.raises(StorageError, match="presigned URLs need S3"):
        open_storage(StorageConfig(uri=str(tmp_path))).presigned_url("k")


def test_wrong_s3_credentials_give_a_clear_error(s3_storage_config, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage = open_storage(s3_storage_config)
    for operation in (lambda: storage.put("k", b"x"), lambda: storage.get("k"),
                      lambda: storage.head("k"), lambda: storage.list(""),
                      lambda: storage.create("k", b"x"), lambda: storage.check(),
                      lambda: storage.put("big", io.BytesIO(b"x" * 9 * MiB))):
        with pytest.raises(StorageError, match="refused the credentials") as caught:
            operation()
        assert "AWS_SECRET_ACCESS_KEY" in caught.value.message
        assert "not-the-secret" not in caught.value.message
        assert caught.value.code == "storage_credentials"


def test_missing_s3_credentials_give_a_clear_error(s3_storage_config, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="no S3 credentials .* AWS_ACCESS_KEY_ID"):
        open_storage(s3_storage_config).get("k")


def test_missing_bucket_and_unreachable_endpoint(s3_storage_config: StorageConfig):
    no_bucket = StorageConfig(uri="s3://no-such-bucket-here/p",
                              endpoint_url=s3_storage_config.endpoint_url)
    with pytest.raises(StorageError, match="'no-such-bucket-here' does not exist"):
        open_storage(no_bucket).check()

    (port,) = free_ports(1)
    down = StorageConfig(uri="s3://b/p", endpoint_url=f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach S3") as caught:
        open_storage(down).get("k")
    assert caught.value.code == "storage_unreachable"
    assert time.monotonic() - started < 30
