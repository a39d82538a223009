"""Records that change by compare-and-swap: a fine-tuning job, an eval run, a data-generation job.

Each is one JSON object under one key. A change reads the record with its etag, applies the
caller's function and writes the result only if the etag is still the one read, retrying on a
lost race, so the API (a cancel) and a driver (progress, the result) never overwrite each other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel

from service.core.errors import Conflict, PreconditionFailed
from service.core.storage import Storage

R = TypeVar("R", bound=BaseModel)

ATTEMPTS = 50
RETRY_S = 0.02


def dump(record: BaseModel) -> bytes:
    """A record's stored form: its JSON with sorted keys."""
    return json.dumps(record.model_dump(mode="json"), sort_keys=True).encode()


def swap(storage: Storage, key: str, read: Callable[[], tuple[R, str]],
         change: Callable[[R], R | None], *, what: str,
         final: Callable[[R], bool] = lambda _: False,
         check: Callable[[R, R], None] | None = None) -> R:
    """``change`` applied to the latest record (a deep copy) by compare-and-swap.

    ``read`` returns the record and the etag it was read at. ``change`` returns the new record,
    or None to leave it as it is; a record that is ``final`` is returned unchanged, and ``check``
    (``current, updated``) may refuse a change by raising. ``what`` names the record in the 409
    when the races never end.
    """
    for _ in range(ATTEMPTS):
        current, etag = read()
        if final(current):
            return current
        updated = change(current.model_copy(deep=True))
        if updated is None:
            return current
        if check is not None:
            check(current, updated)
        try:
            storage.replace(key, dump(updated), etag)
            return updated
        except PreconditionFailed:
            time.sleep(RETRY_S)
    raise Conflict(f"{what} is changing too fast; try again.", code="busy")
