"""The errors tuneserve raises, each mapped to one HTTP status and OpenAI error type.

One handler in ``service.api.app`` turns them into OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` so that the ``openai`` client raises the
matching ``BadRequestError``, ``NotFoundError``, ``ConflictError`` …
"""

from __future__ import annotations


class TuneserveError(Exception):
    """Base class; a bare instance is a server fault (500)."""

    status: int = 500
    type: str = "server_error"

    def __init_subclass__(cls, status: int | None = None, error_type: str | None = None, **kw):
        # Each error's status and OpenAI type on its class line: one line per fact.
        super().__init_subclass__(**kw)
        cls.status = status or cls.status
        cls.type = error_type or cls.type

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class InvalidRequest(TuneserveError, status=400, error_type="invalid_request_error"):
    """The caller sent something we cannot accept; ``param`` names the field or line."""


class Unauthorized(TuneserveError, status=401, error_type="authentication_error"):
    """No API key, or a key that maps to no tenant."""


class NotFound(TuneserveError, status=404, error_type="not_found_error"):
    """The object does not exist, or belongs to another tenant (we never say which)."""


class Conflict(TuneserveError, status=409, error_type="conflict_error"):
    """The request clashes with the object's state (cancelling a finished job, a racing create)."""


class AlreadyExists(Conflict):
    """A create-if-absent found the key already there."""


class PreconditionFailed(Conflict):
    """A compare-and-swap saw a different version than the caller expected."""


class Unprocessable(TuneserveError, status=422, error_type="invalid_request_error"):
    """Well-formed but inconsistent, e.g. an Idempotency-Key reused with another body."""


class PayloadTooLarge(TuneserveError, status=413, error_type="invalid_request_error"):
    """The request body exceeds a configured limit."""


class RateLimited(TuneserveError, status=429, error_type="rate_limit_error"):
    """The service is saturated; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: int = 1, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class StorageError(TuneserveError, status=503, error_type="server_error"):
    """The storage backend failed (unreachable, wrong credentials, I/O error)."""
