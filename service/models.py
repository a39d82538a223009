"""``/v1/models``: the base models, and the caller's tuned models and checkpoints."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from service.model_names import base_model_ids

router = APIRouter(tags=["models"])

_STARTED = int(time.time())


def _model_object(model_id: str, owned_by: str, created: int = _STARTED) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


@router.get("/models")
def list_models(request: Request) -> dict:
    settings = request.app.state.settings
    data = [_model_object(m, "tuneserve") for m in base_model_ids(settings)]
    return {"object": "list", "data": data}
