"""``/v1/files``: upload training data, list, retrieve, download and delete it (OpenAI's Files API).

An upload streams into storage (``service.files.uploads``), is validated line by line from there
(``training.data.validation``) and described — format, examples, tokens and supervised tokens under
the default base model's chat template — or rejected with 400 naming the broken lines, in which
case nothing of it stays in storage.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from service.files import store as file_store
from service.api.auth import get_tenant
from service.core.errors import InvalidRequest, PayloadTooLarge
from service.core import names
from service.core.names import base_model_ids
from service.core.storage import Storage
from service.files.uploads import receive_upload
from training.data.formats import FORMATS

if TYPE_CHECKING:
    from training.data.validation import TokenCounter

log = logging.getLogger(__name__)
router = APIRouter(tags=["files"])
Tenant = Annotated[str, Depends(get_tenant)]

TOKENIZED_EXAMPLES = 2000
"""Token statistics cover the first this many examples of an upload: the exact count under the
chat template costs a few milliseconds per example, too slow for every line of a 512 MB file
within one request. Every line is still validated."""

_IGNORED_FIELDS = ("expires_after[anchor]", "expires_after[seconds]")
"""Sent by the openai SDK when asked to; files here never expire, so the fields are ignored."""


class TokenStats(BaseModel):
    min: int | None
    mean: float | None
    max: int | None
    total: int


class FileDescription(BaseModel):
    """What an accepted training file holds (our addition to OpenAI's FileObject)."""

    format: str | None
    """The format every line is in (``training.data.formats.FORMATS``)."""
    kind: Literal["sft", "preference"] | None
    """Conversations to imitate (``sft``) or preference pairs for DPO (``preference``)."""
    examples: int
    tokens: TokenStats | None
    """Tokens per example under the chat template; null when no tokenizer was available."""
    supervised_tokens: TokenStats | None
    """Trained-on (response) tokens per example; null as ``tokens``."""
    model: str | None = None
    """The base model whose tokenizer and chat template counted the tokens."""
    context_length: int | None
    tokenized_examples: int | None = None
    """How many examples (the first ones) ``tokens`` and ``supervised_tokens`` cover."""
    over_context: int | None
    """Examples among the tokenized ones longer than ``context_length`` (truncated in
    training)."""
    duplicates: int
    warnings: list[str]
    """The first few warnings (duplicates, over-long examples) with their line numbers."""


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    """Unix seconds."""
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None
    """Always null: files are kept until deleted."""
    description: FileDescription | None = None
    """Null for files the service wrote itself (a job's metrics)."""


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


def _storage(request: Request) -> Storage:
    return request.app.state.storage


Store = Annotated[Storage, Depends(_storage)]


def get_file_record(file_id: str, tenant: Tenant, storage: Store) -> dict[str, Any]:
    """The one place a file id from a path is looked up (404 for another tenant's file)."""
    return file_store.get_file(storage, tenant, file_id)


FileRecord = Annotated[dict[str, Any], Depends(get_file_record)]

_UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "JSONL training data"},
        "purpose": {"type": "string", "enum": [file_store.FINE_TUNE]},
        "format": {"type": "string", "description": "declare the format instead of detecting it"},
    }}}}}}


@router.post("/files", response_model=FileObject, openapi_extra=_UPLOAD_FORM)
async def create_file(request: Request, tenant: Tenant, storage: Store) -> FileObject | Response:
    settings = request.app.state.settings
    file_id = names.new_file_id()
    key = names.file_content_key(file_id)
    try:
        upload = await receive_upload(request, storage, key,
                                      max_file_bytes=settings.max_upload_bytes)
        declared = _check_fields(upload.fields, upload.has_file)
        _check_filename(upload.filename)
        description = await run_in_threadpool(_describe, request.app, key, declared)
        record = await run_in_threadpool(
            file_store.save_record, storage, tenant, file_id,
            filename=_display_name(upload.filename), purpose=file_store.FINE_TUNE,
            size=upload.size, description=description)
    except PayloadTooLarge as exc:
        await _discard(storage, file_id)
        # Close the connection: otherwise the server keeps reading (and dropping) the rest of
        # the body to reuse the connection, and the client keeps sending it.
        return JSONResponse(exc.body(), status_code=exc.status, headers={"Connection": "close"})
    except BaseException:
        await _discard(storage, file_id)
        raise
    log.info("file %s: %d bytes, %s examples in format %s", file_id, upload.size,
             description["examples"], description["format"])
    return FileObject.model_validate(record)


@router.get("/files")
def list_files(tenant: Tenant, storage: Store,
               after: Annotated[str | None, Query(pattern=names.FILE_ID_PATTERN)] = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
               order: Literal["asc", "desc"] = "desc", purpose: str | None = None) -> FileList:
    page, has_more = file_store.list_files(storage, tenant, after=after, limit=limit, order=order,
                                           purpose=purpose)
    data = [FileObject.model_validate(r) for r in page]
    return FileList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


@router.get("/files/{file_id}")
def retrieve_file(record: FileRecord) -> FileObject:
    return FileObject.model_validate(record)


@router.get("/files/{file_id}/content")
def download_file(record: FileRecord, storage: Store) -> StreamingResponse:
    key = names.file_content_key(record["id"])

    def chunks() -> Iterator[bytes]:
        with storage.open(key) as stream:
            while chunk := stream.read(1 << 20):
                yield chunk

    return StreamingResponse(chunks(), media_type="application/octet-stream",
                             headers={"Content-Length": str(record["bytes"])})


@router.delete("/files/{file_id}")
def delete_file(record: FileRecord, tenant: Tenant, storage: Store) -> FileDeleted:
    file_store.delete_file(storage, tenant, record["id"])
    return FileDeleted(id=record["id"])


# --- helpers -------------------------------------------------------------------------------


async def _discard(storage: Storage, file_id: str) -> None:
    """Nothing of a rejected upload stays: the content, and a record if one got written."""
    with contextlib.suppress(Exception):
        await run_in_threadpool(storage.delete_prefix, names.file_prefix(file_id))


def _check_fields(fields: dict[str, str], has_file: bool) -> str | None:
    """Check the form; returns the declared format (None to detect it)."""
    for name in fields:
        if name not in ("purpose", "format", *_IGNORED_FIELDS):
            raise InvalidRequest(f"Unknown parameter {name!r}: send 'file', 'purpose' and "
                                 "optionally 'format'.", param=name, code="unknown_parameter")
    if not has_file:
        raise InvalidRequest("Missing required parameter: 'file'.", param="file",
                             code="missing_required_parameter")
    purpose = fields.get("purpose")
    if purpose is None:
        raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose",
                             code="missing_required_parameter")
    if purpose != file_store.FINE_TUNE:
        raise InvalidRequest(f"Invalid purpose {purpose!r}: this service accepts files for "
                             f"'{file_store.FINE_TUNE}' only.", param="purpose",
                             code="invalid_purpose")
    declared = fields.get("format") or None
    if declared is not None and declared not in FORMATS:
        raise InvalidRequest(f"Invalid format {declared!r}: expected one of {', '.join(FORMATS)}, "
                             "or leave it out to detect the format.", param="format",
                             code="invalid_format")
    return declared


def _check_filename(filename: str | None) -> None:
    """A name that climbs out of its folder is a hostile or broken client: refuse it. (The name
    is display-only, keys never use it; a plain path such as ``C:\\data\\train.jsonl`` is
    fine and shown as its last part.)"""
    if filename and ".." in filename.replace("\\", "/").split("/"):
        raise InvalidRequest(f"Invalid file name {filename[:100]!r}: it must not contain a '..' "
                             "path part.", param="file", code="invalid_file_name")


def _display_name(filename: str | None) -> str:
    """The uploaded name, for display only: last path part, no control characters."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:255]
    return name or "upload.jsonl"


def _describe(app: FastAPI, key: str, declared: str | None) -> dict[str, Any]:
    """Validate the stored upload; raises InvalidRequest naming the first broken lines."""
    from training.data.validation import validate_jsonl

    settings = app.state.settings
    tokens = file_tokenizer(app)
    with app.state.storage.open(key) as stream:
        report = validate_jsonl(stream, max_line_bytes=settings.max_line_bytes,
                                max_length=tokens.context_length, declared_format=declared,
                                count_tokens=tokens.counter, max_tokenized=TOKENIZED_EXAMPLES)
    if not report.ok:
        raise InvalidRequest(f"Invalid training file: {report.summary()}", param="file",
                             code="invalid_file")
    return {**report.description(), "model": tokens.model}


class FileTokenizer:
    """The default base model's tokenizer, counting tokens as training does; loaded once per app."""

    def __init__(self, model: str | None = None, model_dir: str | None = None,
                 context_length: int | None = None):
        self.model, self.context_length = model, context_length
        self.counter = _shared_counter(model_dir) if model_dir else None


@functools.lru_cache(maxsize=4)
def _shared_counter(model_dir: str) -> TokenCounter:
    """One tokenizer per model directory in this process (apps in tests, replicas' reloads)."""
    from training.model.registry import load_tokenizer
    from training.data.validation import chat_token_counter

    count = chat_token_counter(load_tokenizer(model_dir))
    lock = threading.Lock()  # a fast tokenizer raises "Already borrowed" when used concurrently

    def locked(example: dict) -> tuple[int, int]:
        with lock:
            return count(example)

    return locked


_load_lock = threading.Lock()


def file_tokenizer(app: FastAPI) -> FileTokenizer:
    """``app.state.file_tokenizer``, loading the first base model's tokenizer on first use.

    Without a loadable model the service still validates files, only without token counts.
    """
    with _load_lock:
        if getattr(app.state, "file_tokenizer", None) is None:
            app.state.file_tokenizer = _load_file_tokenizer(app)
    return app.state.file_tokenizer


def _load_file_tokenizer(app: FastAPI) -> FileTokenizer:
    settings = app.state.settings
    models = base_model_ids(settings)
    if not models:
        return FileTokenizer()
    try:
        from training.model.registry import resolve_model

        # Local cache only (storage=None): sharing the converted weights through storage is the
        # trainers' job; the API needs just the tokenizer and the config.
        model_dir = resolve_model(models[0], None, settings.models)
        config = json.loads((model_dir / "config.json").read_text())
        return FileTokenizer(models[0], str(model_dir), config.get("max_position_embeddings"))
    except Exception:  # noqa: BLE001 - token counts are a description, not a requirement
        log.warning("no tokenizer for %s: files are described without token counts",
                    models[0], exc_info=True)
        return FileTokenizer()
