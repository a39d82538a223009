"""``expires_after`` on upload, as OpenAI documents it: ``expires_at`` set, the file gone for
every reader once it passes and its bytes deleted, by a read or by the periodic sweep; values
outside the spec's range refused naming the field. The API over a temporary local store."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.routes.files import FileTokenizer
from service.core.names import file_expiry_key, file_record_key
from service.core.settings import Settings
from service.files.store import sweep_expired
from tests.helpers import wait_until
from tests.openapi_contract import assert_body

ROWS = b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n'
EXPIRES = {"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"}


@pytest.fixture
def app(tmp_path):
    app = create_app(Settings(storage=str(tmp_path / "store"), builtin_models=False))
    app.state.file_tokenizer = FileTokenizer()  # no token counts: not what this tests
    return app


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def upload(client: TestClient, **form: str):
    return client.post("/v1/files", files={"file": ("train.jsonl", ROWS)},
                       data={"purpose": "fine-tune", **form})


def keys(app) -> set[str]:
    return {info.key for info in app.state.storage.iter("")}


def backdate(app, file_id: str, seconds: int) -> None:
    """Make the file's expiry ``seconds`` ago (record and marker), as if time had passed."""
    storage = app.state.storage
    record = json.loads(storage.get(file_record_key(file_id)))
    storage.delete(file_expiry_key(record["expires_at"], file_id))
    record["expires_at"] = int(time.time()) - seconds
    storage.put(file_expiry_key(record["expires_at"], file_id), b"")
    storage.put(file_record_key(file_id), json.dumps(record).encode())


def test_expires_at_is_set_and_the_file_kept_until_then(client, app):
    kept = upload(client).json()
    expiring = upload(client, **EXPIRES).json()
    assert "expires_at" not in kept and "status_details" not in kept
    assert expiring["expires_at"] == expiring["created_at"] + 3600
    for body in (kept, expiring, client.get(f"/v1/files/{expiring['id']}").json()):
        assert_body("get", "/files/{file_id}", 200, body)
    assert sweep_expired(app.state.storage, now=expiring["created_at"] + 3599) == []
    assert client.get(f"/v1/files/{expiring['id']}/content").content == ROWS
    # An hour later the sweep deletes it: record, index and bytes; the other file stays.
    assert sweep_expired(app.state.storage, now=expiring["created_at"] + 3600) == [expiring["id"]]
    assert not [k for k in keys(app) if expiring["id"] in k]
    assert client.get(f"/v1/files/{expiring['id']}").status_code == 404
    assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [kept["id"]]


def test_an_expired_file_is_gone_for_readers_before_the_sweep(client, app):
    file = upload(client, **EXPIRES).json()
    backdate(app, file["id"], 1)
    assert [f["id"] for f in client.get("/v1/files").json()["data"]] == []
    gone = client.get(f"/v1/files/{file['id']}/content")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "file_not_found"
    assert not [k for k in keys(app) if file["id"] in k]  # reading it deleted it


def test_a_job_on_an_expired_file_is_refused_naming_the_file(client, app):
    file = upload(client, **EXPIRES).json()
    backdate(app, file["id"], 1)
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tuneserve/tiny-llama",
                                                  "training_file": file["id"]})
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert error["param"] == "training_file" and file["id"] in error["message"]


@pytest.mark.parametrize(("form", "param"), [
    ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "3599"},
     "expires_after.seconds"),
    ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "2592001"},
     "expires_after.seconds"),
    ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "1.5"},
     "expires_after.seconds"),
    ({"expires_after[anchor]": "created_at"}, "expires_after.seconds"),
    ({"expires_after[seconds]": "3600"}, "expires_after.anchor"),
    ({"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"},
     "expires_after.anchor"),
])
def test_expires_after_outside_the_spec_is_refused_naming_it(client, app, form, param):
    r = upload(client, **form)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert_body("post", "/files", 400, r.json())
    assert keys(app) == set()  # nothing of the refused upload stays


def test_the_periodic_sweep_deletes_what_nobody_reads(client, app):
    from service.files.expiry import ExpirySweeper

    file = upload(client, **EXPIRES).json()
    backdate(app, file["id"], 1)
    sweeper = ExpirySweeper(app.state.storage, interval_s=0.1).start()
    try:
        wait_until(lambda: not [k for k in keys(app) if file["id"] in k], 10,
                   what="the sweep to delete the expired file")
    finally:
        sweeper.close()
