"""Security: every route needs a key, tenants never see each other's data, embedded mode listens
on loopback only, and pickled adapter weights are refused.

The route list is taken from the app itself, so a route added later without the key
dependency fails here. Isolation is checked through the API as the other tenant sees it,
with the owner's own requests as the control that the objects exist.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.chat.backends import LocalChatBackend
from service.core.settings import Settings
from service.core.storage import join_key
from service.jobs.store import JobRecord, JobStore
from tests.helpers import wait_until
from tests.serving_adapters import new_job_id, write_adapter
from training.model import registry as models

TINY = models.TINY_MODEL_ID
KEYS = {"key-alice": "alice", "key-bob": "bob"}
PUBLIC = {"/healthz", "/readyz"}
"""The health probes (Kubernetes and KubeRay send no key): the only routes anyone may call."""
KEYED_OPERATOR_ROUTES = {"/metrics", "/openapi.json", "/docs", "/redoc"}
"""Prometheus metrics and the API's description: any tenant's key, and they name no tenant."""

GOOD = b"".join(
    b'{"messages": [{"role": "user", "content": "Say %d."}, '
    b'{"role": "assistant", "content": "%d"}]}\n' % (i, i) for i in range(4))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict]:
    """Alice owns a file, a succeeded job with its adapter and a checkpoint adapter, and a
    model whose adapter folder holds pickled weights. Bob owns nothing."""
    settings = Settings(storage=str(tmp_path_factory.mktemp("store")), api_keys=KEYS,
                        builtin_models=False, max_tokens_cap=8)
    backend = LocalChatBackend(settings, dtype="float32")
    app = create_app(settings, chat=backend)
    storage = app.state.storage
    tiny_dir = models.resolve_model(TINY)
    base = models.load_model(tiny_dir)
    with TestClient(app) as client:
        r = client.post("/v1/files", files={"file": ("t.jsonl", GOOD)},
                        data={"purpose": "fine-tune"}, headers=auth("key-alice"))
        assert r.status_code == 200, r.text
        file_id = r.json()["id"]
        jobs = {}
        for name in ("tuned", "pickled", "corrupt"):
            job_id = new_job_id()
            write_adapter(storage, tiny_dir, TINY, seed=1, job_id=job_id, tenant="alice",
                          model=base)
            jobs[name] = job_id
            JobStore(storage).create(JobRecord(
                id=job_id, created_at=int(time.time()), status="succeeded", model=TINY,
                training_file=file_id, seed=1, organization_id="alice", suffix="s",
                fine_tuned_model=f"ft:{TINY}:s:{job_id}", finished_at=int(time.time())))
        write_adapter(storage, tiny_dir, TINY, seed=2, job_id=jobs["tuned"], step=2,
                      tenant="alice", model=base)
        # A pickle next to the safetensors: loading it could run code, so nothing may load it.
        storage.put(join_key("adapters", jobs["pickled"], "final", "adapter_model.bin"),
                    b"\x80\x04cos\nsystem\n.")
        # A checkpoint export whose weights were cut short (a partial copy into storage).
        weights = join_key("adapters", jobs["corrupt"], "final", "adapter_model.safetensors")
        storage.put(weights, storage.get(weights)[:1000])
        yield {"corrupt": f"ft:{TINY}:s:{jobs['corrupt']}", "app": app, "client": client, "file": file_id, "job": jobs["tuned"],
               "model": f"ft:{TINY}:s:{jobs['tuned']}",
               "pickled": f"ft:{TINY}:s:{jobs['pickled']}", "backend": backend}
    backend.close()


def _example_path(path: str) -> str:
    """The route's path with a well-formed id in each path parameter."""
    values = {"job_id": "ftjob-" + "0" * 24, "file_id": "file-" + "0" * 24,
              "model_id": "ft:x:y:ftjob-" + "0" * 24}
    return re.sub(r"{(\w+)(:\w+)?}", lambda m: values.get(m.group(1), "x"), path)


def all_routes(app) -> list:
    """Every route as served, with the prefixes of included routers applied (FastAPI ≥ 0.16x
    keeps included routers as nodes in ``app.routes``)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def _is_api_route(route) -> bool:
    return isinstance(getattr(route, "original_route", route), APIRoute)


BAD_CREDENTIALS = ({}, {"Authorization": "Bearer wrong-key"},
                   {"Authorization": "Basic a2V5LWFsaWNlOg=="}, {"Authorization": "key-alice"},
                   {"Cookie": "tuneserve_key=wrong-key"})


def test_every_route_but_the_probes_needs_a_key(world):
    """The API, ``/metrics`` and the API description answer 401 to every missing or wrong
    credential; the dashboard's pages send a stranger to its login form; only the health
    probes answer anyone."""
    app, client = world["app"], world["client"]
    secrets_of_alice = ("alice", world["job"], world["file"])
    routes = all_routes(app)
    api_routes = [r for r in routes if _is_api_route(r)]
    other = {r.path for r in routes if not _is_api_route(r)}
    assert not other, f"routes outside FastAPI's API routing (no key dependency): {other}"
    paths = {r.path for r in api_routes}
    assert paths >= PUBLIC | KEYED_OPERATOR_ROUTES | {
        "/v1/chat/completions", "/v1/files", "/v1/fine_tuning/jobs"}
    checked = 0
    for route in api_routes:
        for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
            path = _example_path(route.path)
            for headers in BAD_CREDENTIALS:
                r = client.request(method, path, headers=headers, follow_redirects=False)
                assert not any(s in r.text for s in secrets_of_alice), (method, path)
                if route.path in PUBLIC:
                    assert r.status_code == 200, (method, path)
                elif route.path.startswith("/ui"):
                    # Pages redirect to the login form; the form itself is public.
                    assert r.status_code in (200, 303, 307, 401, 404) and (
                        r.status_code != 200 or route.path == "/ui/login"), (method, path)
                else:
                    assert r.status_code == 401, (method, path, headers, r.status_code)
                    assert r.json()["error"]["type"] == "authentication_error"
            checked += route.path.startswith("/v1") or route.path in KEYED_OPERATOR_ROUTES
    assert checked >= 21  # files ×5, jobs ×8, models ×3, chat, metrics, the description ×3


def test_metrics_and_docs_take_any_tenants_key_and_name_no_tenant(world):
    client = world["client"]
    as_alice = auth("key-alice")
    client.get(f"/v1/fine_tuning/jobs/{world['job']}", headers=as_alice)
    client.get(f"/v1/files/{world['file']}", headers=as_alice)
    for path in sorted(KEYED_OPERATOR_ROUTES):
        r = client.get(path, headers=auth("key-bob"))  # bob owns nothing: not his data
        assert r.status_code == 200, path
        for secret in ("alice", world["job"], world["file"], "key-alice"):
            assert secret not in r.text, (path, secret)
    # A browser logged in at /ui fetches /docs and the document it shows with the cookie.
    cookie = {"Cookie": "tuneserve_key=key-bob"}
    assert client.get("/docs", headers=cookie).status_code == 200
    assert client.get("/openapi.json", headers=cookie).json()["paths"]


def test_without_keys_everything_answers_the_local_tenant(tmp_path):
    """Embedded mode with no keys (one local tenant, loopback only): no route asks for one."""
    app = create_app(Settings(storage=str(tmp_path / "store"), builtin_models=False))
    with TestClient(app) as client:
        for path in sorted(PUBLIC | KEYED_OPERATOR_ROUTES | {"/v1/models", "/v1/files"}):
            assert client.get(path).status_code == 200, path


def test_openapi_document_declares_the_key_on_every_operation(world):
    spec = world["client"].get("/openapi.json", headers=auth("key-alice")).json()
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            secured = bool(operation.get("security"))
            assert secured == path.startswith("/v1/"), (method, path)


def test_tenants_never_see_each_others_files_jobs_events_checkpoints_models_or_chat(world):
    client, file_id, job_id, model = (world["client"], world["file"], world["job"],
                                      world["model"])
    checkpoint = model + ":ckpt-step-2"
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    requests = [
        ("GET", f"/v1/files/{file_id}", None),
        ("GET", f"/v1/files/{file_id}/content", None),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}", None),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/events", None),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints", None),
        ("GET", f"/v1/models/{model}", None),
        ("GET", f"/v1/models/{checkpoint}", None),
        ("POST", "/v1/chat/completions", {"model": model, **chat}),
        ("POST", "/v1/chat/completions", {"model": checkpoint, **chat}),
        ("POST", "/v1/chat/completions", {"model": model, "stream": True, **chat}),
    ]
    for method, path, body in requests:
        mine = client.request(method, path, json=body, headers=auth("key-alice"))
        assert mine.status_code == 200, (path, mine.text[:300])
        theirs = client.request(method, path, json=body, headers=auth("key-bob"))
        assert theirs.status_code == 404, (path, theirs.status_code)
        # "Not found", never "forbidden": the answer does not confirm the object exists.
        assert theirs.json()["error"]["type"] == "not_found_error"

    as_bob = auth("key-bob")
    for listing in ("/v1/files", "/v1/fine_tuning/jobs"):
        assert client.get(listing, headers=as_bob).json()["data"] == []
    assert not [m for m in client.get("/v1/models", headers=as_bob).json()["data"]
                if m["id"].startswith("ft:")]
    writes = [
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel", None),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/pause", None),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/resume", None),
        ("POST", "/v1/fine_tuning/jobs", {"model": TINY, "training_file": file_id}),
        ("POST", "/v1/fine_tuning/jobs", {"model": model, "training_file": file_id}),
        ("DELETE", f"/v1/models/{checkpoint}", None),
        ("DELETE", f"/v1/models/{model}", None),
        ("DELETE", f"/v1/files/{file_id}", None),
    ]
    storage = world["app"].state.storage
    before = {info.key: info.etag for info in storage.iter("")}
    for method, path, body in writes:
        r = client.request(method, path, json=body, headers=as_bob)
        assert r.status_code == 404, (method, path, r.status_code, r.text[:300])
    assert {info.key: info.etag for info in storage.iter("")} == before
    assert client.get(f"/v1/models/{model}", headers=auth("key-alice")).status_code == 200


def test_adapter_with_pickled_weights_is_refused(world):
    client = world["client"]
    r = client.post("/v1/chat/completions", headers=auth("key-alice"), json={
        "model": world["pickled"], "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "model" and error["code"] == "adapter_incompatible"
    assert "adapter_model.bin" in error["message"] and "pickle" in error["message"]
    engine = world["backend"]._servers[TINY].engine
    assert not [a for a in engine.adapters if a.startswith(world["pickled"].rsplit(":", 1)[1])]


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 from a dual-stack socket
    return (mapped or ip).is_loopback


def _listening(pid: int) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``pid`` and its children."""
    found = []
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    name = " ".join(proc.cmdline()[:3]) or proc.name()
                    found.append((name, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            pass
    return found


def _serves_ray_jobs_api(port: int) -> bool:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/api/jobs/", timeout=5)
        return r.status_code == 200 and isinstance(r.json(), list)
    except (httpx.HTTPError, ValueError):
        return False


@pytest.mark.slow
def test_embedded_mode_listens_on_loopback_only(shared_service):
    """Every listening socket of ``tuneserve up`` and its Ray is on loopback: GCS, raylet, object
    manager, agents, workers, HAProxy (the ingress, its stats page and Prometheus
    exporter: Ray 2.60 binds the last two to every interface), Serve's fallback proxy, and each
    Serve replica's inter-deployment gRPC server (Ray binds that one to ``[::]:0``;
    ``service.ray.embedded`` rebinds these). A chat through the API checks that
    the API still reaches the chat deployment through its Serve handle."""
    service = shared_service
    # Serve's proxy and Ray's agents come up after the first answer; give them a moment.
    wait_until(lambda: any(port == service.port for _, _, port in _listening(service.proc.pid)),
               60, what="the ingress's socket")
    r = httpx.post(f"{service.url}/v1/chat/completions", timeout=300, json={
        "model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    time.sleep(5)
    sockets = _listening(service.proc.pid)
    jobs_api = [s for s in sockets if "dashboard" in s[0] and _serves_ray_jobs_api(s[2])]
    assert len(sockets) >= 4, sockets  # the ingress, GCS, raylet, object manager at least
    # The service's port is HAProxy's (the embedded default ingress), beside its stats and metrics.
    haproxy = [s for s in sockets if "haproxy" in s[0]]
    assert service.port in [port for _, _, port in haproxy] and len(haproxy) >= 3, sockets
    # No dashboard (service.ray.embedded): the head that Ray still runs serves only its own metrics, and
    # nothing serves Ray's Jobs API, which runs any code it is sent.
    assert not jobs_api, jobs_api
    assert any(name.startswith("ray::ServeReplica:") for name, _, _ in sockets), sockets
    exposed = [s for s in sockets if not _is_loopback(s[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_adapter_with_corrupt_weights_is_refused_and_others_still_answer(world):
    client = world["client"]
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = client.post("/v1/chat/completions", headers=auth("key-alice"),
                    json={"model": world["corrupt"], **body})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["param"] == "model" and "adapter" in error["message"].lower(), error
    for model in (world["model"], TINY):
        ok = client.post("/v1/chat/completions", headers=auth("key-alice"),
                         json={"model": model, **body})
        assert ok.status_code == 200, ok.text
