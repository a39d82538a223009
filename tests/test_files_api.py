"""The files API over a temporary local store: upload, list, retrieve, download, delete; broken
files rejected naming the line; the size limit enforced while streaming; tenants kept apart;
and the same through the ``openai`` SDK."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.files.store import create_result_file
from service.api.routes.files import FileTokenizer
from service.core.settings import Settings
from tests.broken_files import BROKEN, MAX_LINE_BYTES, Broken
from tests.helpers import free_port, wait_until

DATA = Path(__file__).parent / "data" / "formats"
KEYS = {"ka": "a", "kb": "b"}
FORMATS = {"openai_chat": "openai_chat", "alpaca": "alpaca", "self_instruct": "alpaca",
           "dolly": "dolly", "sharegpt": "sharegpt", "openorca": "openorca", "flan": "flan",
           "oig": "oig", "prompt_completion": "prompt_completion",
           "openai_preference": "openai_preference",
           "openai_preference_legacy": "openai_preference",
           "chosen_rejected": "chosen_rejected", "hh_rlhf": "hh_rlhf",
           "self_instruct_seed": "self_instruct", "sharegpt_preference": "sharegpt_preference",
           "text": "text"}


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    from training.model.registry import TINY_MODEL_ID, resolve_model

    return str(resolve_model(TINY_MODEL_ID))


def make_app(tmp_path: Path, tiny_dir: str | None = None, **settings):
    """The API with the tiny model's tokenizer (SmolLM2's tokenizer and template) describing
    files; without ``tiny_dir``, files are described without token counts."""
    settings.setdefault("storage", str(tmp_path / "store"))
    app = create_app(Settings(builtin_models=False, tiny_model=False,
                              models={"tiny": tiny_dir} if tiny_dir else {},
                              max_line_bytes=MAX_LINE_BYTES, **settings))
    if tiny_dir is None:
        app.state.file_tokenizer = FileTokenizer()
    return app


@pytest.fixture
def app(tmp_path, tiny_dir):
    return make_app(tmp_path, tiny_dir)


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def stored_keys(app) -> set[str]:
    return {info.key for info in app.state.storage.iter("")}


def upload(client: TestClient, content: bytes, name: str = "train.jsonl", **data):
    return client.post("/v1/files", files={"file": (name, content)},
                       data={"purpose": "fine-tune", **data})


def test_upload_list_retrieve_download_delete(client, app) -> None:
    content = (DATA / "alpaca.jsonl").read_bytes()
    r = upload(client, content, name="alpaca.jsonl")
    assert r.status_code == 200, r.text
    file = r.json()
    assert re.fullmatch(r"file-[0-9a-f]{24}", file["id"])
    assert {k: file[k] for k in ("object", "bytes", "filename", "purpose", "status")} == {
        "object": "file", "bytes": len(content), "filename": "alpaca.jsonl",
        "purpose": "fine-tune", "status": "processed"}
    assert isinstance(file["created_at"], int)
    description = file["description"]
    assert (description["format"], description["kind"], description["examples"]) == (
        "alpaca", "sft", 2)
    assert description["model"] == "tiny" and description["context_length"] == 2048
    assert 0 < description["supervised_tokens"]["min"] < description["tokens"]["min"]
    assert description["over_context"] == 0 and description["duplicates"] == 0

    assert client.get(f"/v1/files/{file['id']}").json() == file
    listed = client.get("/v1/files").json()
    assert listed["object"] == "list" and listed["data"] == [file] and listed["has_more"] is False
    r = client.get(f"/v1/files/{file['id']}/content")
    assert r.status_code == 200 and r.content == content
    assert stored_keys(app) >= {f"files/{file['id']}/content", f"files/{file['id']}/object.json"}

    assert client.delete(f"/v1/files/{file['id']}").json() == {
        "id": file["id"], "object": "file", "deleted": True}
    for method, path in [("GET", f"/v1/files/{file['id']}"),
                         ("GET", f"/v1/files/{file['id']}/content"),
                         ("DELETE", f"/v1/files/{file['id']}")]:
        r = client.request(method, path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found", path
    assert client.get("/v1/files").json()["data"] == []
    assert stored_keys(app) == set()


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_uploads(client, name: str) -> None:
    r = upload(client, (DATA / f"{name}.jsonl").read_bytes())
    assert r.status_code == 200, r.text
    assert r.json()["description"]["format"] == FORMATS[name]
    assert r.json()["description"]["tokens"]["min"] > 0


@pytest.fixture(scope="module")
def broken_client(tmp_path_factory) -> Iterator[tuple[TestClient, object]]:
    """One app for all broken uploads (without tokens: every problem here is found before)."""
    app = make_app(tmp_path_factory.mktemp("broken"))
    with TestClient(app) as c:
        assert upload(c, (DATA / "dolly.jsonl").read_bytes()).status_code == 200
        yield c, app


@pytest.mark.parametrize("broken", BROKEN, ids=lambda b: b.name)
def test_broken_file_is_400_naming_line_and_problem(broken_client, broken: Broken) -> None:
    client, app = broken_client
    before = stored_keys(app)
    r = upload(client, broken.content)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "file"
    assert error["code"] == "invalid_file"
    assert f"line {broken.line}: " in error["message"] and broken.phrase in error["message"]
    assert stored_keys(app) == before
    assert len(client.get("/v1/files").json()["data"]) == 1


def test_bad_forms_are_400_naming_the_param(broken_client) -> None:
    client, app = broken_client
    before = stored_keys(app)
    good = (DATA / "flan.jsonl").read_bytes()
    cases = [
        (client.post("/v1/files", files={"file": ("a.jsonl", good)}), "purpose"),
        (upload(client, good, purpose="assistants"), "purpose"),
        (client.post("/v1/files", data={"purpose": "fine-tune"},
                     files={"other": ("a.jsonl", good)}), "other"),
        (client.post("/v1/files", data={"purpose": "fine-tune"}), "file"),
        (client.post("/v1/files", json={"purpose": "fine-tune"}), "file"),
        (upload(client, good, format="yaml"), "format"),
        (upload(client, good, format="alpaca"), "file"),  # flan lines declared as alpaca
        (upload(client, b"\n\n"), "file"),
    ]
    for r, param in cases:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text
    assert "holds no examples" in cases[-1][0].json()["error"]["message"]
    assert stored_keys(app) == before


def test_file_part_before_purpose_is_fine(client) -> None:
    """curl -F sends parts in the order given; the purpose may come after the file."""
    content = (DATA / "flan.jsonl").read_bytes()
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"flan.jsonl\"\r\n\r\n").encode() + content + (
            f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
            f"fine-tune\r\n--{BOUNDARY}--\r\n").encode()
    r = client.post("/v1/files", content=body,
                    headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert r.status_code == 200, r.text
    assert r.json()["bytes"] == len(content) and r.json()["filename"] == "flan.jsonl"


def test_declared_format_is_used(client) -> None:
    r = upload(client, (DATA / "dolly.jsonl").read_bytes(), format="dolly")
    assert r.status_code == 200 and r.json()["description"]["format"] == "dolly"


def test_filename_is_display_only(client, app) -> None:
    r = upload(client, (DATA / "flan.jsonl").read_bytes(), name="C:\\data\\train.jsonl")
    assert r.status_code == 200
    assert r.json()["filename"] == "train.jsonl"
    assert all(key.startswith(("files/file-", "file-index/local/")) for key in stored_keys(app))
    before = stored_keys(app)
    r = upload(client, (DATA / "flan.jsonl").read_bytes(), name="../../etc/passwd")
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert "'..'" in r.json()["error"]["message"]
    assert stored_keys(app) == before


def test_list_pages_with_after_limit_order_and_purpose(client, app) -> None:
    ids = [upload(client, (DATA / "flan.jsonl").read_bytes()).json()["id"] for _ in range(3)]
    page = client.get("/v1/files", params={"limit": 2, "order": "asc"}).json()
    assert [f["id"] for f in page["data"]] == ids[:2] and page["has_more"] is True
    assert page["last_id"] == ids[1]
    page = client.get("/v1/files", params={"limit": 2, "order": "asc", "after": ids[1]}).json()
    assert [f["id"] for f in page["data"]] == ids[2:] and page["has_more"] is False
    assert [f["id"] for f in client.get("/v1/files").json()["data"]] == ids[::-1]

    result = create_result_file(app.state.storage, "local", "metrics.csv", b"step,loss\n1,2.0\n")
    only = client.get("/v1/files", params={"purpose": "fine-tune-results"}).json()["data"]
    assert [f["id"] for f in only] == [result] and only[0]["description"] is None
    assert len(client.get("/v1/files", params={"purpose": "fine-tune"}).json()["data"]) == 3
    assert client.get("/v1/files", params={"limit": 0}).status_code == 400
    assert client.get("/v1/files", params={"after": "file-" + "0" * 24}).status_code == 404


def test_large_uploads_and_rejections_on_each_backend(storage_config, tmp_path) -> None:
    """Over 8 MB the S3 backend writes in multipart parts: a rejected or over-size upload
    must leave neither an object nor a part behind, on either backend."""
    line = json.dumps({"instruction": "Repeat.", "output": "x" * 960}).encode() + b"\n"
    good = line * (10 * 1024 * 1024 // len(line))
    app = make_app(tmp_path, storage=storage_config.uri,
                   s3_endpoint_url=storage_config.endpoint_url, max_upload_bytes=12 * 1024 * 1024)
    with TestClient(app) as client:
        r = upload(client, good)
        assert r.status_code == 200, r.text
        file_id = r.json()["id"]
        assert r.json()["description"]["examples"] == good.count(b"\n")
        assert client.get(f"/v1/files/{file_id}/content").content == good
        before = stored_keys(app)

        lines = good.count(b"\n")
        r = upload(client, good + b'{"instruction": "x"}\n')
        assert r.status_code == 400
        assert f"line {lines + 1}: missing field 'output'" in r.json()["error"]["message"]
        assert upload(client, good * 2).status_code == 413
        assert stored_keys(app) == before
    if storage_config.uri.startswith("s3://"):
        import boto3

        bucket, prefix = storage_config.uri[5:].split("/", 1)
        s3 = boto3.client("s3", endpoint_url=storage_config.endpoint_url)
        assert s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []) == []


def test_tenants_see_only_their_own_files(tmp_path) -> None:
    app = make_app(tmp_path, api_keys=KEYS)
    as_a, as_b = {"Authorization": "Bearer ka"}, {"Authorization": "Bearer kb"}
    with TestClient(app) as client:
        r = client.post("/v1/files", files={"file": ("a.jsonl", (DATA / "oig.jsonl").read_bytes())},
                        data={"purpose": "fine-tune"}, headers=as_a)
        assert r.status_code == 200, r.text
        file_id = r.json()["id"]
        assert client.get("/v1/files", headers=as_b).json()["data"] == []
        for method, path in [("GET", f"/v1/files/{file_id}"),
                             ("GET", f"/v1/files/{file_id}/content"),
                             ("DELETE", f"/v1/files/{file_id}")]:
            r = client.request(method, path, headers=as_b)
            assert r.status_code == 404, path
            assert r.json()["error"]["message"] == f"No such File object: {file_id}"
        assert [f["id"] for f in client.get("/v1/files", headers=as_a).json()["data"]] == [file_id]
        assert client.get(f"/v1/files/{file_id}/content", headers=as_a).status_code == 200

        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "ka"}):
            for method, path in [("GET", "/v1/files"), ("POST", "/v1/files"),
                                 ("GET", f"/v1/files/{file_id}"),
                                 ("GET", f"/v1/files/{file_id}/content"),
                                 ("DELETE", f"/v1/files/{file_id}")]:
                r = client.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, headers)
                assert r.json()["error"]["type"] == "authentication_error"
        assert client.get("/healthz").status_code == 200
        assert client.delete(f"/v1/files/{file_id}", headers=as_a).status_code == 200


def test_openai_sdk_round_trip(tmp_path, tiny_dir) -> None:
    app = make_app(tmp_path, tiny_dir, api_keys=KEYS)
    with TestClient(app) as http:
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="ka", http_client=http,
                            max_retries=0)
        other = openai.OpenAI(base_url="http://testserver/v1", api_key="kb", http_client=http,
                              max_retries=0)
        content = (DATA / "sharegpt.jsonl").read_bytes()
        file = sdk.files.create(file=("chat.jsonl", content), purpose="fine-tune")
        assert file.id.startswith("file-") and file.bytes == len(content)
        assert file.status == "processed" and file.filename == "chat.jsonl"
        assert file.description["format"] == "sharegpt"  # our addition, kept by the SDK
        assert [f.id for f in sdk.files.list()] == [file.id]
        assert sdk.files.retrieve(file.id).id == file.id
        assert sdk.files.content(file.id).content == content

        with pytest.raises(openai.NotFoundError):
            other.files.retrieve(file.id)
        with pytest.raises(openai.NotFoundError):
            other.files.content(file.id)
        with pytest.raises(openai.NotFoundError):
            other.files.delete(file.id)
        assert list(other.files.list()) == []
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=http,
                          max_retries=0).files.list()
        with pytest.raises(openai.BadRequestError, match="line 2: .*roles out of order"):
            user_twice = next(b for b in BROKEN if b.name == "user_twice")
            sdk.files.create(file=("bad.jsonl", user_twice.content), purpose="fine-tune")

        deleted = sdk.files.delete(file.id)
        assert deleted.deleted and deleted.id == file.id
        with pytest.raises(openai.NotFoundError):
            sdk.files.retrieve(file.id)


# --- the size limit, on a real HTTP server ------------------------------------------------


@contextlib.contextmanager
def serve(app, port: int | None = None) -> Iterator[str]:
    """uvicorn in a thread on a free port: the body really streams over a socket."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 20, 0.05, what="uvicorn")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


BOUNDARY = "tuneserve-test-boundary"
FORM_HEAD = (f"--{BOUNDARY}\r\n"
             'Content-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
             f"--{BOUNDARY}\r\n"
             'Content-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
             "Content-Type: application/jsonl\r\n\r\n").encode()
FORM_TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


class Body:
    """A multipart body of ``size`` bytes of JSONL made on the fly; counts what was pulled."""

    def __init__(self, size: int, line_bytes: int = 2000):
        self.size, self.pulled = size, 0
        example = {"instruction": "Repeat.", "output": "x" * (line_bytes - 40)}
        self.line = json.dumps(example).encode() + b"\n"

    def __iter__(self) -> Iterator[bytes]:
        yield FORM_HEAD
        block = self.line * (65536 // len(self.line))
        sent = 0
        while sent < self.size:
            self.pulled += len(block)
            sent += len(block)
            yield block
        yield FORM_TAIL


def post_streaming(url: str, body: Body) -> httpx.Response:
    return httpx.post(f"{url}/v1/files", content=iter(body), timeout=60,
                      headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


def test_oversize_declared_length_is_413_before_the_body(tmp_path) -> None:
    app = make_app(tmp_path, max_upload_bytes=1024 * 1024)
    port = free_port()
    head = (f"POST /v1/files HTTP/1.1\r\nHost: test\r\nContent-Length: {10 * 1024**3}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode()
    with serve(app, port) as _, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head + FORM_HEAD)
        s.settimeout(20)
        response = s.recv(65536)  # answered with only the first bytes of a 10 GB body sent
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"file_too_large" in response
    assert stored_keys(app) == set()


def test_oversize_stream_is_413_without_reading_it_all(tmp_path) -> None:
    limit, size = 1024 * 1024, 256 * 1024 * 1024
    app = make_app(tmp_path, max_upload_bytes=limit)
    body = Body(size)
    with serve(app) as url:
        tracemalloc.start()
        try:
            r = post_streaming(url, body)  # chunked: no Content-Length to refuse up front
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "file_too_large"
    assert body.pulled < 32 * 1024 * 1024, body.pulled  # the rest of the 256 MB was never sent
    assert peak < 8 * 1024 * 1024, peak
    assert stored_keys(app) == set()


def test_a_large_upload_streams_through_bounded_memory(tmp_path) -> None:
    size = 24 * 1024 * 1024
    app = make_app(tmp_path)
    body = Body(size)
    with serve(app) as url:
        tracemalloc.start()
        try:
            r = post_streaming(url, body)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert r.status_code == 200, r.text
    file = r.json()
    assert file["bytes"] >= size
    assert file["description"]["examples"] == file["bytes"] // len(body.line)
    # Neither the upload nor the validation held the file (measured: ~4-6 MB for 8 to 64 MB).
    assert peak < 8 * 1024 * 1024, peak
