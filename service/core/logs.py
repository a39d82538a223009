"""Structured logs: one JSON object per line, with the request id, tenant and job id where they
apply, and never a secret.

``setup_logging()`` is called by ``tuneserve up`` and, as Ray's ``worker_process_setup_hook``
(within ``service.ray.embedded.setup_worker`` on one machine), in every Ray worker process of the
service (Serve replicas, job drivers, training workers); a Serve application started another way
(KubeRay) calls it when its API replica builds the app. ``RequestContextMiddleware`` gives each
HTTP request an id and binds it (and the job id in the path) to the logging context;
``service.api.auth`` binds the tenant.
A training run's processes (the job's driver and its Ray Train workers) enter
``job_logging(job_id)``, so every line they write carries the job id, from any thread.

Secrets: the configured API keys, the AWS secret and session token, and anything that looks like
an ``Authorization`` header or a bearer token are replaced by ``[REDACTED]`` in every line our
handler writes, whatever logger or exception text it comes from.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import os
import re
import secrets as _secrets
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from service.core.names import JOB_ID_FORM

REDACTED = "[REDACTED]"
SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
MIN_SECRET_LENGTH = 4
"""Shorter configured values are not searched for: redacting every "ab" would garble the logs."""

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "tuneserve_log_context", default=None)

# "Authorization: Bearer x", "authorization=x", '"authorization": "x"', and bare "Bearer x".
_AUTH_PATTERNS = (
    re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(?:bearer\s+|basic\s+)?[^\s'\",}]+"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(?i)(tuneserve_key=)[^\s;'\",]+"),  # the dashboard's cookie
)

# Attributes every LogRecord has; anything else was passed with ``extra=`` and is kept.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


# --- context --------------------------------------------------------------------------------


def bind(**values: str | None) -> None:
    """Add fields to the current logging context (request id, tenant, job id).

    The context is a dict shared by reference: FastAPI runs sync dependencies and endpoints in
    worker threads with *copies* of the request's context, so a value bound in a dependency
    (the tenant) is seen by the endpoint and the access log only if all share one dict.
    """
    current = _context.get()
    if current is None:
        current = {}
        _context.set(current)
    current.update({k: v for k, v in values.items() if v is not None})


def context() -> dict[str, str]:
    return dict(_context.get() or {})


_process_fields: dict[str, str] = {}
"""Fields for every line of this process, under the context's: set by ``job_logging``."""


@contextlib.contextmanager
def job_logging(job_id: str) -> Iterator[None]:
    """Every line this process logs inside the block carries ``job_id``.

    For the processes of one training run: a Ray Train worker or the job's driver actor runs
    one job, so the id is set process-wide (threads that torch, datasets or Ray start do not
    inherit the context), and bound in this thread's context too, which wins should another
    job's id ever be bound elsewhere in the process.

    In a process the service set up (``setup_logging`` ran) whose JSON handler a framework
    has since removed, it is put back first: see ``_restore_handler``.
    """
    _restore_handler()
    previous = _process_fields.get("job_id")
    _process_fields["job_id"] = job_id
    token = new_context(**{**context(), "job_id": job_id})
    try:
        yield
    finally:
        reset_context(token)
        if previous is None:
            _process_fields.pop("job_id", None)
        else:
            _process_fields["job_id"] = previous


def new_context(**values: str) -> contextvars.Token:
    return _context.set(dict(values))


def reset_context(token: contextvars.Token) -> None:
    _context.reset(token)


# --- redaction ------------------------------------------------------------------------------


class Redactor:
    """Replaces known secret values and authorization-looking text."""

    def __init__(self, secrets: Iterable[str] = ()):
        self.secrets: set[str] = set()
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        self.secrets.update(s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH)
        # Longest first, so a key that contains another is replaced whole.
        self._ordered = sorted(self.secrets, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._ordered:
            if secret in text:
                text = text.replace(secret, REDACTED)
        for pattern in _AUTH_PATTERNS:
            text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
        return text


def secrets_from_env(environ: dict[str, str] | None = None) -> list[str]:
    """The values that must never be logged: API keys (``TUNESERVE_API_KEYS`` is
    ``key:tenant,…``) and the AWS credentials' secret parts."""
    env = os.environ if environ is None else environ
    found = [env[name] for name in SECRET_ENV_VARS if env.get(name)]
    for pair in env.get("TUNESERVE_API_KEYS", "").split(","):
        key = pair.strip().rpartition(":")[0] or pair.strip()
        if key:
            found.append(key)
    return found


_redactor = Redactor()


def redact(text: str) -> str:
    return _redactor(text)


def add_secrets(values: Iterable[str]) -> None:
    """Make further values (e.g. API keys from settings built in code) unloggable."""
    _redactor.add(values)


class RedactingFilter(logging.Filter):
    """Redacts the message of every record a handler emits (for non-JSON handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


# --- formatting -----------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", request_id?, tenant?, job_id?, …extra, exc?}``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        ours = {**_process_fields, **context()}
        for name, value in vars(record).items():
            if name not in _STANDARD_ATTRS and not name.startswith("_"):
                # Ray's CoreContextFilter stamps *its* job id (``01000000``) on records in
                # Ray workers: ours names the fine-tuning job and wins; Ray's is kept aside.
                line[f"ray_{name}" if name in ours and value != ours[name] else name] = value
        line.update(ours)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        # Redact the whole line last: secrets may hide in extras and tracebacks too.
        return redact(json.dumps(line, default=str, ensure_ascii=False))


_set_up: dict[str, Any] = {}
"""The last ``setup_logging`` arguments in this process (empty: never called)."""


def setup_logging(level: str | int | None = None, *, stream=None,
                  secrets: Iterable[str] = ()) -> None:
    """JSON lines on stderr for the root logger, with redaction; safe to call more than once."""
    _set_up.update(level=level, stream=stream)
    add_secrets(secrets_from_env())
    add_secrets(secrets)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_tuneserve", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._tuneserve = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    # Other handlers (Ray's, pytest's) keep working but must not leak secrets either.
    for other in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in other.filters):
            other.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("TUNESERVE_LOG_LEVEL", "INFO").upper())
    for noisy in ("httpx", "httpcore", "botocore", "boto3", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _restore_handler() -> None:
    """Ray Train configures its workers' logging with ``dictConfig`` after our setup hook ran:
    the root logger loses our JSON handler (and the redaction on the others) and gets Ray's
    plain console handler instead. In a process the service had set up, put ours back, and
    drop that console handler, which would write every line a second time, unredacted."""
    root = logging.getLogger()
    if not _set_up or any(getattr(h, "_tuneserve", False) for h in root.handlers):
        return
    for handler in list(root.handlers):
        if type(handler).__name__ == "PlainRayHandler" or (
                type(handler) is logging.StreamHandler
                and handler.stream in (sys.stderr, sys.stdout)):
            root.removeHandler(handler)
    setup_logging(_set_up.get("level"), stream=_set_up.get("stream"))


# --- per-request context --------------------------------------------------------------------

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_JOB_IN_PATH = re.compile(rf"/(?:fine_tuning/)?jobs/({JOB_ID_FORM})")
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
access_log = logging.getLogger("tuneserve.access")


class RequestContextMiddleware:
    """Binds ``request_id`` (the caller's ``X-Request-ID`` if sane, else a new one) and the job
    id in the path to the logging context, echoes the id in the response, and writes one access
    line per request (path only: query strings are not logged)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else f"req-{_secrets.token_hex(8)}"
        path = scope.get("path", "")
        job = _JOB_IN_PATH.search(path)
        token = new_context(request_id=request_id, **({"job_id": job.group(1)} if job else {}))
        status = {"code": 500}
        started = time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                names = {k.lower() for k, _ in message.get("headers", [])}
                if b"x-request-id" not in names:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            level = logging.DEBUG if path in _QUIET_PATHS else logging.INFO
            access_log.log(level, "%s %s %s", scope.get("method"), path, status["code"],
                           extra={"method": scope.get("method"), "path": path,
                                  "status": status["code"],
                                  "duration_ms": round((time.perf_counter() - started) * 1000, 1)})
            reset_context(token)
