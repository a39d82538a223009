"""``Idempotency-Key`` on POSTs: the same key and body give the same result, once.

The ``openai`` SDK retries POSTs by itself, so without this a retried create makes two jobs.
A key's slot is claimed with create-if-absent before the job is made, so concurrent retries
see the claim (409) instead of racing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

from service.core.errors import AlreadyExists, Conflict, NotFound, Unprocessable
from service.core.storage import Storage, join_key

CLAIM_TIMEOUT_S = 60
"""A claim older than this whose creator never finished is taken over (the creator died)."""


def _key(tenant: str, idempotency_key: str) -> str:
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
    return join_key("idempotency", tenant, f"{digest}.json")


def body_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def run_once(storage: Storage, tenant: str, idempotency_key: str, body: dict,
             create: Callable[[], str]) -> tuple[str, bool]:
    """Run ``create`` (which returns the new object's id) at most once per key.

    Returns the id and whether it was created now. Raises 422 when the key was used with
    another body, 409 while the first request with this key is still being served.
    """
    key, digest = _key(tenant, idempotency_key), body_hash(body)
    claim = {"state": "creating", "body_hash": digest, "at": time.time()}
    try:
        storage.create(key, json.dumps(claim).encode())
    except AlreadyExists:
        return _replay(storage, key, digest, create)
    return _finish(storage, key, digest, create), True


def _replay(storage: Storage, key: str, digest: str, create: Callable[[], str]) -> tuple[str, bool]:
    info = storage.head(key)
    try:
        record = json.loads(storage.get(key))
    except NotFound:
        record = None
    if record is None or info is None:
        raise Conflict("A request with this Idempotency-Key is in progress; retry shortly.",
                       code="idempotency_in_progress")
    if record["body_hash"] != digest:
        raise Unprocessable("This Idempotency-Key was already used with a different request body.",
                            param="Idempotency-Key", code="idempotency_key_reused")
    if record["state"] == "done":
        return record["id"], False
    if time.time() - record["at"] < CLAIM_TIMEOUT_S:
        raise Conflict("A request with this Idempotency-Key is in progress; retry shortly.",
                       code="idempotency_in_progress")
    # The first creator died mid-way: take the claim over (compare-and-swap, so only one does).
    storage.replace(key, json.dumps({**record, "at": time.time()}).encode(), info.etag)
    return _finish(storage, key, digest, create), True


def _finish(storage: Storage, key: str, digest: str, create: Callable[[], str]) -> str:
    try:
        object_id = create()
    except Exception:
        storage.delete(key)  # a failed create must not pin the key
        raise
    storage.put(key, json.dumps({"state": "done", "body_hash": digest, "id": object_id,
                                 "at": time.time()}).encode())
    return object_id
