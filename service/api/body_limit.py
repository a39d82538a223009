"""A size limit on request bodies, enforced before a route parses them.

JSON bodies (job specs, chat requests) are read whole into memory by FastAPI, so without a
limit one request can hold the replica's memory. Uploads stream to storage under their own,
larger limit (``service.files.uploads``) and are left alone here.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import PayloadTooLarge

STREAMED_PATHS = frozenset({"/v1/files"})
"""Routes that read their body as a stream and enforce their own limit."""


class BodySizeLimit:
    """Answer 413 to a body larger than ``max_bytes``: at once when Content-Length says so,
    otherwise as soon as the bytes received pass the limit (chunked bodies)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE") \
                or scope["path"].rstrip("/") in STREAMED_PATHS:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        # Read the body up to the limit before the app sees it, then replay it: a route never
        # starts on a body that turns out too large half-way.
        messages: list[Message] = []
        received = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away; let the app see it
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        pending = iter(messages)

        async def replay() -> Message:
            return next(pending, None) or await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        error = PayloadTooLarge(
            f"The request body is larger than the limit of {self.max_bytes} bytes "
            "(TUNESERVE_MAX_REQUEST_BYTES).", param="body", code="request_too_large")
        body = json.dumps(error.body()).encode()
        # Close the connection: the client may still be sending the rest of the body.
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
