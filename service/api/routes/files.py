"""``/v1/files``: upload training data, list, retrieve, download and delete it (OpenAI's Files API).

An upload streams into storage (``service.files.uploads``), is validated record by record from
there (``service.files.validation``, the same check as ``tuneserve files validate``) and
described — container, layout, examples, tokens and supervised tokens under the default base
model's chat template — or refused with 400 naming the broken records (413 for a compressed file
over its decompressed limit), in which case nothing of it stays in storage.

OpenAI's ``expires_after[anchor]=created_at`` and ``expires_after[seconds]`` (3600 to 2592000,
as the spec says) set ``expires_at``; the file is deleted once it passes
(``service.files.store``). Our extensions to OpenAI's upload form: ``format`` (declare the
layout instead of detecting it)
and ``invalid_records`` (``refuse``, the default, or ``skip``: keep the file, train on its valid
records, and count the skipped ones with their reasons in the description).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from service.api.auth import get_tenant
from service.core import names
from service.core.errors import InvalidRequest, PayloadTooLarge
from service.core.storage import Storage
from service.files import store as file_store
from service.files.uploads import receive_upload
from service.files.validation import (
    FileChecks,
    FileTokenizer,
    check_file,
    description,
    load_file_tokenizer,
    refusal,
)
from training.data.formats import FORMATS
from training.data.validation import InvalidRecords

log = logging.getLogger(__name__)
router = APIRouter(tags=["files"])
Tenant = Annotated[str, Depends(get_tenant)]

EXPIRES_ANCHOR, EXPIRES_SECONDS = "expires_after[anchor]", "expires_after[seconds]"
MIN_EXPIRES_AFTER_S, MAX_EXPIRES_AFTER_S = 3600, 2592000
"""``FileExpirationAfter.seconds`` in OpenAI's spec: one hour to thirty days."""


class TokenStats(BaseModel):
    min: int | None
    mean: float | None
    max: int | None
    total: int


class SkippedRecords(BaseModel):
    records: int
    """Invalid records left out of training."""
    reasons: dict[str, int]
    """Skipped records per problem code."""
    first: list[str]
    """The first problems, each with its line or record number."""


class FileDescription(BaseModel):
    """What an accepted training file holds (our addition to OpenAI's FileObject)."""

    format: str | None
    """The layout every record is in (``training.data.formats.FORMATS``)."""
    kind: Literal["sft", "preference", "prompts"] | None
    """Conversations to imitate (``sft``), preference pairs for DPO (``preference``) or prompts
    for reinforcement fine-tuning (``prompts``)."""
    trains_on: Literal["responses", "all_tokens", "rewards"] | None = None
    """``responses``: the assistant turns (the chosen and rejected ones for pairs);
    ``all_tokens``: plain text, every token (continued pretraining); ``rewards``: sampled
    answers, scored by a grader."""
    container: Literal["jsonl", "json_array"] = "jsonl"
    compression: Literal["gzip", "zstd"] | None = None
    examples: int
    """Training examples (a Self-Instruct task gives one per instance; skipped records none)."""
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
    """The first few warnings (duplicates, over-long examples, keys the layout ignores) with
    their line or record numbers."""
    notes: list[str] = []
    """What reading changed or decided (end markers removed, every token trained on)."""
    ignored_keys: dict[str, int] = {}
    """Keys of the records that their layout does not read (so not trained on), with how many
    records had them: a warning that a field may be misnamed."""
    invalid_records: Literal["refuse", "skip"] = "refuse"
    skipped: SkippedRecords | None = None
    """Null unless the upload asked to skip invalid records."""
    item_fields: list[str] | None = None
    """Reinforcement prompts only: the fields every line has, which a reinforcement job's
    grader may read as ``{{item.…}}``."""
    generation: dict[str, Any] | None = Field(default=None, exclude_if=lambda v: v is None)
    """A file a data-generation job wrote (``/v1/data_generation/jobs``): the generator, the
    seed file's sha256, the settings and the candidates each filter removed; absent otherwise."""


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    """Unix seconds."""
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = Field(default=None, exclude_if=lambda v: v is None)
    """Never set (deprecated by OpenAI); absent rather than null, which the spec does not allow."""
    expires_at: int | None = Field(default=None, exclude_if=lambda v: v is None)
    """Unix seconds, for a file uploaded with ``expires_after``; absent for one kept until
    deleted."""
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
    "type": "object", "required": ["file", "purpose"],
    "dependentRequired": {EXPIRES_ANCHOR: [EXPIRES_SECONDS], EXPIRES_SECONDS: [EXPIRES_ANCHOR]},
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "JSONL training data"},
        "purpose": {"type": "string", "enum": [file_store.FINE_TUNE, "evals"]},
        "format": {"type": "string", "enum": list(FORMATS),
                   "description": "declare the layout instead of detecting it"},
        "invalid_records": {"type": "string", "enum": list(get_args(InvalidRecords)),
                            "default": "refuse",
                            "description": "skip: train on the valid records and count the "
                                           "others in the description; refuse: refuse the file"},
        EXPIRES_ANCHOR: {"type": "string", "enum": ["created_at"]},
        EXPIRES_SECONDS: {"type": "integer", "minimum": MIN_EXPIRES_AFTER_S,
                          "maximum": MAX_EXPIRES_AFTER_S,
                          "description": "delete the file this many seconds after its upload"},
    }}}}}}


@router.post("/files", response_model=FileObject, openapi_extra=_UPLOAD_FORM)
async def create_file(request: Request, tenant: Tenant, storage: Store) -> FileObject | Response:
    settings = request.app.state.settings
    file_id = names.new_file_id()
    key = names.file_content_key(file_id)
    try:
        upload = await receive_upload(request, storage, key,
                                      max_file_bytes=settings.max_upload_bytes)
        declared, invalid_records = _check_fields(upload.fields, upload.has_file)
        expires_after = _expires_after(upload.fields)
        _check_filename(upload.filename)
        purpose = upload.fields["purpose"]
        if purpose == EVALS:  # an eval's items: JSON objects, checked against the eval per run
            described = await run_in_threadpool(_check_eval_items, storage, key)
        else:
            described = await run_in_threadpool(_describe, request.app, key, declared,
                                                invalid_records)
        record = await run_in_threadpool(
            file_store.save_record, storage, tenant, file_id,
            filename=_display_name(upload.filename), purpose=purpose,
            size=upload.size, description=described, expires_after=expires_after)
    except PayloadTooLarge as exc:
        await _discard(storage, file_id)
        # Close the connection: otherwise the server keeps reading (and dropping) the rest of
        # the body to reuse the connection, and the client keeps sending it.
        return JSONResponse(exc.body(), status_code=exc.status, headers={"Connection": "close"})
    except BaseException:
        await _discard(storage, file_id)
        raise
    log.info("file %s: %d bytes, %s examples in format %s", file_id, upload.size,
             (described or {}).get("examples"), (described or {}).get("format", purpose))
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


def _check_fields(fields: dict[str, str], has_file: bool) -> tuple[str | None, InvalidRecords]:
    """Check the form; returns the declared format (None to detect it) and what invalid
    records do."""
    for name in fields:
        if name not in ("purpose", "format", "invalid_records", EXPIRES_ANCHOR, EXPIRES_SECONDS):
            raise InvalidRequest(f"Unknown parameter {name!r}: send 'file', 'purpose' and "
                                 "optionally 'expires_after', 'format' and 'invalid_records'.",
                                 param=name, code="unknown_parameter")
    if not has_file:
        raise InvalidRequest("Missing required parameter: 'file'.", param="file",
                             code="missing_required_parameter")
    purpose = fields.get("purpose")
    if purpose is None:
        raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose",
                             code="missing_required_parameter")
    if purpose not in (file_store.FINE_TUNE, EVALS):
        raise InvalidRequest(f"Invalid purpose {purpose!r}: this service accepts files for "
                             f"'{file_store.FINE_TUNE}' and '{EVALS}' only.", param="purpose",
                             code="invalid_purpose")
    declared = fields.get("format") or None
    if declared is not None and declared not in FORMATS:
        raise InvalidRequest(f"Invalid format {declared!r}: expected one of {', '.join(FORMATS)}, "
                             "or leave it out to detect the format.", param="format",
                             code="invalid_format")
    invalid_records = fields.get("invalid_records") or "refuse"
    if invalid_records not in get_args(InvalidRecords):
        raise InvalidRequest(f"Invalid invalid_records {invalid_records!r}: expected 'refuse' "
                             "(the default: a file with an invalid record is refused) or 'skip' "
                             "(train on the valid records).", param="invalid_records",
                             code="invalid_value")
    return declared, invalid_records  # type: ignore[return-value]


def _expires_after(fields: dict[str, str]) -> int | None:
    """Seconds after the upload at which the file expires (None: never), from OpenAI's
    ``expires_after`` form fields; a 400 naming the field otherwise."""
    anchor, seconds = fields.get(EXPIRES_ANCHOR), fields.get(EXPIRES_SECONDS)
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest(f"Invalid expires_after.anchor {anchor!r}: the only anchor is "
                             "'created_at'.", param="expires_after.anchor", code="invalid_value")
    try:
        value = int(seconds or "")
    except ValueError:
        value = None
    if value is None or not MIN_EXPIRES_AFTER_S <= value <= MAX_EXPIRES_AFTER_S:
        raise InvalidRequest(f"Invalid expires_after.seconds {(seconds or '')[:40]!r}: give a "
                             f"whole number of seconds from {MIN_EXPIRES_AFTER_S} (one hour) to "
                             f"{MAX_EXPIRES_AFTER_S} (30 days).", param="expires_after.seconds",
                             code="invalid_value")
    return value


EVALS = "evals"
"""The purpose of an eval's items (``service.evals.datasource``)."""


def _check_eval_items(storage: Storage, key: str) -> None:
    """Every line a JSON object (a 400 naming the first that is not); no description."""
    from service.evals.datasource import parse_lines

    parse_lines(storage.get(key), "file")


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


def _describe(app: FastAPI, key: str, declared: str | None,
              invalid_records: InvalidRecords) -> dict[str, Any]:
    """Check the stored upload; raises the refusal (400, or 413 past the decompressed limit)."""
    checks = FileChecks.from_settings(app.state.settings, file_tokenizer(app))
    with app.state.storage.open(key) as stream:
        report = check_file(stream, checks, declared_format=declared,
                            invalid_records=invalid_records)
    if not report.ok:
        raise refusal(report)
    return description(report, checks)


_load_lock = threading.Lock()


def file_tokenizer(app: FastAPI) -> FileTokenizer:
    """``app.state.file_tokenizer``, loading the first base model's tokenizer on first use.

    Without a loadable model the service still validates files, only without token counts.
    """
    with _load_lock:
        if getattr(app.state, "file_tokenizer", None) is None:
            try:
                app.state.file_tokenizer = load_file_tokenizer(app.state.settings)
            except Exception:
                log.warning("no tokenizer for the first base model: files are described without "
                            "token counts", exc_info=True)
                app.state.file_tokenizer = FileTokenizer()
    return app.state.file_tokenizer
