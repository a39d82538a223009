"""The API's description, behind the API keys: ``/openapi.json``, ``/docs`` and ``/redoc``.

FastAPI's own routes for these take no dependency, so ``create_app`` turns them off and includes
these with ``get_tenant``, like every route but the health probes (with no keys configured,
embedded on loopback, everyone passes as the local tenant). Any tenant's key
reads them. A browser sends no header: log in at ``/ui`` first, and the dashboard's cookie
signs the page and the document it fetches.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

OPENAPI_PATH = "/openapi.json"

router = APIRouter(include_in_schema=False)


@router.get(OPENAPI_PATH)
def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url=_openapi_url(request),
                               title=f"{request.app.title} - Swagger UI")


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=_openapi_url(request), title=f"{request.app.title} - ReDoc")


def _openapi_url(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/") + OPENAPI_PATH
