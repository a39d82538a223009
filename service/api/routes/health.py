"""Liveness and readiness probes: the only routes that need no API key."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.core.errors import TuneserveError

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 2.0
"""How long ``/readyz`` waits for storage and for each chat deployment to answer."""


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """200 when storage and every chat deployment answer; else 503, and ``checks`` names what
    cannot answer (``storage``, ``Chat-<slug>``) and why."""
    chat = request.app.state.chat
    storage, deployments = await asyncio.gather(
        _storage_check(request.app.state.storage),
        chat.ready(CHECK_TIMEOUT_S) if chat is not None else _no_chat())
    checks = {"storage": storage, **deployments}
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503)


async def _storage_check(storage) -> str:
    try:
        await asyncio.wait_for(asyncio.to_thread(storage.list, "", limit=1), CHECK_TIMEOUT_S)
    except TuneserveError as exc:
        return exc.message
    except TimeoutError:
        return f"storage did not answer within {CHECK_TIMEOUT_S:g} s"
    return "ok"


async def _no_chat() -> dict[str, str]:
    return {}
