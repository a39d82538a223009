"""Liveness and readiness probes: the only routes that need no API key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.core.errors import TuneserveError

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        request.app.state.storage.list("", limit=1)
        checks["storage"] = "ok"
    except TuneserveError as exc:
        checks["storage"] = exc.message
    chat = request.app.state.chat
    checks["chat"] = "ok" if chat is None or chat.ready() else "starting"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503)
