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

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class InvalidRequest(TuneserveError):
    """The caller sent something we cannot accept; ``param`` names the field or line."""

    status = 400
    type = "invalid_request_error"


class Unauthorized(TuneserveError):
    """No API key, or a key that maps to no tenant."""

    status = 401
    type = "authentication_error"


class NotFound(TuneserveError):
    """The object does not exist, or belongs to another tenant (we never say which)."""

    status = 404
    type = "not_found_error"


class Conflict(TuneserveError):
    """The request clashes with the object's state (cancelling a finished job, a racing create)."""

    status = 409
    type = "conflict_error"


class AlreadyExists(Conflict):
    """A create-if-absent found the key already there."""


class PreconditionFailed(Conflict):
    """A compare-and-swap saw a different version than the caller expected."""


class Unprocessable(TuneserveError):
    """Well-formed but inconsistent, e.g. an Idempotency-Key reused with another body."""

    status = 422
    type = "invalid_request_error"


class PayloadTooLarge(TuneserveError):
    """The request body exceeds a configured limit."""

    status = 413
    type = "invalid_request_error"


class RateLimited(TuneserveError):
    """The service is saturated; retry after ``retry_after`` seconds."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int = 1, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class StorageError(TuneserveError):
    """The storage backend failed (unreachable, wrong credentials, I/O error)."""

    status = 503
    type = "server_error"
