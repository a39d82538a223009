"""Uploaded files in storage: their records, their content, and who owns them.

Layout (docs/interfaces.md)::

    files/<file_id>/content       the uploaded bytes
    files/<file_id>/object.json   the record: FileObject fields + tenant + description
    file-index/<tenant>/<created_ns:020d>-<file_id>
                                  an empty marker, so one tenant's files list in upload order
                                  without reading anyone else's records
    file-expiry/<expires_at:012d>-<file_id>
                                  an empty marker per file uploaded with ``expires_after``, so
                                  the sweep lists only what is due (``sweep_expired``)

A file past its ``expires_at`` is gone for every reader at once (``get_file`` deletes it), and
the periodic sweep deletes the ones nobody asked for.

Every key is built from a generated id (``file-`` + 24 hex) and a tenant name that settings
validated; the uploaded filename is only ever a field of the record. A file of another tenant is
reported exactly like a missing one (404).
"""

from __future__ import annotations

import json
import time
from typing import IO, Any, Literal

from service.core.errors import NotFound
from service.core.names import (
    FILE_ID,
    file_content_key,
    file_expiry_key,
    file_expiry_prefix,
    file_id_from_index_key,
    file_index_key,
    file_index_prefix,
    file_prefix,
    file_record_key,
    new_file_id,
    parse_file_expiry_key,
)
from service.core.storage import Storage

FINE_TUNE = "fine-tune"
RESULTS = "fine-tune-results"
Order = Literal["asc", "desc"]


def _not_found(file_id: str, param: str | None) -> NotFound:
    return NotFound(f"No such File object: {file_id}", param=param, code="file_not_found")


def save_record(storage: Storage, tenant: str, file_id: str, *, filename: str, purpose: str,
                size: int, description: dict[str, Any] | None,
                expires_after: int | None = None) -> dict[str, Any]:
    """Write the record of a file whose content is already in storage, and index it;
    ``expires_after``: seconds from now after which the file is deleted (None: kept)."""
    created_ns = time.time_ns()
    created_at = created_ns // 10**9
    record = {
        "id": file_id, "object": "file", "bytes": size, "created_at": created_at,
        "filename": filename, "purpose": purpose, "status": "processed",
        "description": description, "tenant": tenant,
        "index_key": file_index_key(tenant, created_ns, file_id),
    }
    if expires_after is not None:
        record["expires_at"] = created_at + expires_after
        # The marker first: a crash before the record leaves a marker the sweep drops, never
        # an expiring file the sweep cannot find.
        storage.put(file_expiry_key(record["expires_at"], file_id), b"")
    storage.create(file_record_key(file_id), json.dumps(record).encode())
    storage.put(record["index_key"], b"")
    return record


def get_file(storage: Storage, tenant: str, file_id: str, *,
             param: str | None = None) -> dict[str, Any]:
    """The record of ``file_id`` if ``tenant`` owns it; NotFound (naming ``param``) otherwise,
    also once it has expired (then it is deleted here)."""
    if not isinstance(file_id, str) or not FILE_ID.match(file_id):
        raise _not_found(file_id, param)
    try:
        record = json.loads(storage.get(file_record_key(file_id)))
    except NotFound:
        raise _not_found(file_id, param) from None
    if record.get("tenant") != tenant:
        raise _not_found(file_id, param)
    if _expired(record, time.time()):
        _delete(storage, record)
        raise NotFound(f"File {file_id} expired at {record['expires_at']} (Unix time) and was "
                       "deleted.", param=param, code="file_expired")
    return record


def _expired(record: dict[str, Any], now: float) -> bool:
    return record.get("expires_at") is not None and record["expires_at"] <= now


def sweep_expired(storage: Storage, now: float | None = None) -> list[str]:
    """Delete every file whose ``expires_at`` has passed (bytes, record, index); returns their
    ids. Reads only the markers that are due: they sort by expiry time."""
    now = time.time() if now is None else now
    deleted = []
    for info in storage.iter(file_expiry_prefix()):
        expires_at, file_id = parse_file_expiry_key(info.key)
        if expires_at > now:
            break
        try:
            record = json.loads(storage.get(file_record_key(file_id)))
        except NotFound:  # deleted by hand, or by a reader, meanwhile
            storage.delete(info.key)
            continue
        if _expired(record, now):
            _delete(storage, record)
            deleted.append(file_id)
        else:
            storage.delete(info.key)
    return deleted


def open_content(storage: Storage, tenant: str, file_id: str) -> IO[bytes]:
    """A streaming reader of the file's bytes (a context manager)."""
    get_file(storage, tenant, file_id)
    return storage.open(file_content_key(file_id))


def delete_file(storage: Storage, tenant: str, file_id: str) -> None:
    _delete(storage, get_file(storage, tenant, file_id))


def _delete(storage: Storage, record: dict[str, Any]) -> None:
    file_id = record["id"]
    # Record and index first: once they are gone the file is gone for every reader, and a crash
    # before the content is removed leaves only unreachable bytes.
    storage.delete(record["index_key"])
    storage.delete(file_record_key(file_id))
    storage.delete_prefix(file_prefix(file_id))
    if record.get("expires_at") is not None:  # last: the sweep finds what a crash left
        storage.delete(file_expiry_key(record["expires_at"], file_id))


def list_files(storage: Storage, tenant: str, *, after: str | None = None, limit: int = 10000,
               order: Order = "desc", purpose: str | None = None) -> tuple[list[dict], bool]:
    """One page of the tenant's files in upload order, and whether more follow."""
    keys = [info.key for info in storage.iter(file_index_prefix(tenant))]
    ids = [file_id_from_index_key(key) for key in sorted(keys)]
    if order == "desc":
        ids.reverse()
    if after is not None:
        if after not in ids:  # another tenant's file, or a deleted one: "not found" alike
            raise NotFound(f"Invalid 'after': no file {after!r} in this list.", param="after",
                           code="invalid_cursor")
        ids = ids[ids.index(after) + 1:]
    page: list[dict] = []
    for file_id in ids:
        try:
            record = get_file(storage, tenant, file_id)
        except NotFound:  # deleted while we listed
            continue
        if purpose is not None and record["purpose"] != purpose:
            continue
        if len(page) == limit:
            return page, True
        page.append(record)
    return page, False


def file_kind(record: dict[str, Any]) -> Literal["sft", "preference", "prompts"] | None:
    """What a training file holds: conversations ("sft") or preference pairs ("preference")."""
    return (record.get("description") or {}).get("kind")


def create_result_file(storage: Storage, tenant: str, filename: str, data: bytes) -> str:
    """Store a file the service made (a job's metrics CSV), purpose ``fine-tune-results``."""
    file_id = new_file_id()
    storage.put(file_content_key(file_id), data)
    save_record(storage, tenant, file_id, filename=filename, purpose=RESULTS, size=len(data),
                description=None)
    return file_id


def describe_for_training(storage: Storage, tenant: str, file_id: str, *,
                          param: str) -> tuple[int, int]:
    """``(examples, tokens)`` of a training file, from the description made at upload;
    NotFound naming ``param`` when the tenant has no such file (any more)."""
    record = get_file(storage, tenant, file_id, param=param)
    description = record.get("description") or {}
    examples = int(description.get("examples") or 0)
    mean = (description.get("tokens") or {}).get("mean")
    if mean:  # the statistics may cover only the first examples of a large file
        return examples, max(round(mean * examples), 1)
    # Without a tokenizer at upload time, ~4 bytes per token is the usual estimate for English.
    return examples, max(record["bytes"] // 4, 1)
