"""The FastAPI application: one router per OpenAI resource, one error handler, one auth rule
(every route but the health probes and the dashboard's log-in form needs a key).

``create_app`` is the only place the app is put together; the Serve ingress
(``service.ray.app``) and the tests call it with their own settings and back ends.
"""

from __future__ import annotations

import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api import docs as api_docs

from service.ui import dashboard

from service.api.routes import health

from service.core import logs

from service.api import metrics
from service.api.auth import get_tenant
from service.api.body_limit import BodySizeLimit
from service.core.errors import RateLimited, TuneserveError
from service.core.settings import Settings
from service.core.storage import open_storage

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, chat=None, runner=None) -> FastAPI:
    """Build the API.

    Args:
        settings: the service settings; read from ``TUNESERVE_*`` when None.
        chat: the chat back end (``service.chat.backends``); None disables chat completions.
        runner: the job runner (``service.jobs.scheduler``); None leaves jobs queued.
    """
    settings = settings or Settings()
    # FastAPI's /openapi.json, /docs and /redoc would be public: service.api.docs serves them
    # behind the keys instead.
    app = FastAPI(title="tuneserve", version="0.1.0",
                  description="OpenAI-compatible fine-tuning service.",
                  openapi_url=None, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.storage = open_storage(settings.storage_config())
    app.state.chat = chat
    app.state.runner = runner
    if runner is not None:  # the replica that schedules jobs also announces and expires
        app.state.background = _start_background(settings, app.state.storage)
    _install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    logs.add_secrets(settings.api_keys)
    logs.add_secrets(settings.webhook_secrets.values())
    app.add_middleware(metrics.MetricsMiddleware, metrics=metrics.init_metrics(app))
    app.add_middleware(logs.RequestContextMiddleware)  # outermost: every line gets the id

    authed = [Depends(get_tenant)]
    app.include_router(health.router)  # the only routes that need no key
    app.include_router(metrics.router, dependencies=authed)
    app.include_router(api_docs.router, dependencies=authed)
    app.include_router(dashboard.router)
    for router in _api_routers():
        app.include_router(router, prefix="/v1", dependencies=authed, responses=ERROR_RESPONSES)
    _document_limits(app, settings)
    return app


def _start_background(settings: Settings, storage) -> list:
    """Webhook deliveries and the file expiry sweep: threads of this replica, off the request
    path, their state in storage (see ``service.jobs.webhooks`` for why not a Ray actor)."""
    from service.files.expiry import ExpirySweeper
    from service.jobs.webhooks import Dispatcher

    return [Dispatcher(settings, storage).start(), ExpirySweeper(storage).start()]


def _document_limits(app: FastAPI, settings: Settings) -> None:
    """Put this deployment's limits into the OpenAPI document, so that what it calls valid
    is what the service accepts (the request models are static, the caps are settings)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            chat = schema.get("components", {}).get("schemas", {}).get("ChatCompletionRequest")
            for name in ("max_tokens", "max_completion_tokens"):
                field = (chat or {}).get("properties", {}).get(name, {})
                for option in field.get("anyOf", [field]):
                    if option.get("type") == "integer":
                        option["maximum"] = settings.max_tokens_cap
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    """The field, header or line at fault, when there is one."""
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, which every 4xx and 5xx of the API carries."""

    error: ErrorDetail


# Documented on every /v1 operation, so the OpenAPI document lists what a client can get
# (FastAPI's own 422 entry is replaced: request validation answers 400 here).
ERROR_RESPONSES: dict[int | str, dict] = {status: {"model": ErrorResponse, "description": text}
                                          for status, text in {
    400: "Invalid request; `param` names the field, header or line.",
    401: "Missing or wrong API key.",
    404: "No such object for this key's tenant.",
    409: "The request conflicts with the object's state.",
    413: "The body is larger than the limit.",
    422: "An Idempotency-Key reused with another body.",
    429: "At capacity; retry after `Retry-After` seconds.",
    503: "Storage or the chat deployment is unavailable.",
}.items()}


def _api_routers() -> list:
    from service.api.routes import chat
    from service.api.routes import files
    from service.api.routes import fine_tuning as jobs
    from service.api.routes import models
    from service.api.routes import evals, graders
    from service.api.routes import datagen

    return [models.router, jobs.router, files.router, chat.router, evals.router, graders.router,
            datagen.router]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TuneserveError)
    async def _ours(request: Request, exc: TuneserveError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
        if exc.status >= 500:
            log.error("request failed: %s", exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        raw_loc = tuple(first.get("loc", ()))
        loc = [str(p) for p in raw_loc if not _is_schema_tag(p)]
        # A problem with the body as a whole (not JSON, not an object) names the body.
        param = ".".join(loc) or ("body" if raw_loc[:1] == ("body",) else None)
        message = first.get("msg", "Invalid request")
        if first.get("type") == "json_invalid":
            # pydantic's location here is the character offset, not a field.
            param = "body"
            detail = (first.get("ctx") or {}).get("error", message)
            message = f"The request body is not valid JSON: {detail} (at character {raw_loc[-1]})."
        elif first.get("type") == "extra_forbidden":
            message = f"Unknown field {param!r}: it is not a parameter of this endpoint."
        elif param:
            message = f"Invalid value for {param!r}: {message}"
        body = {"error": {"message": message, "type": "invalid_request_error",
                          "param": param, "code": first.get("type")}}
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message, param, code = str(exc.detail), None, None
        if exc.status_code == 400 and message == _UNPARSABLE_BODY:
            # FastAPI's answer to a body json.loads gave up on (bad UTF-8, nested too deep).
            message = ("The request body could not be parsed: send one JSON object, UTF-8 "
                       "encoded, nested at most a few hundred levels deep.")
            param, code = "body", "invalid_body"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route that matched the path; the
            # others (GET and DELETE of one resource are two routes) belong in Allow too.
            headers["Allow"] = ", ".join(_allowed_methods(request.app, request.scope))
        body = {"error": {"message": message, "type": "invalid_request_error",
                          "param": param, "code": code}}
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        body = {"error": {"message": "Internal server error.", "type": "server_error",
                          "param": None, "code": None}}
        return JSONResponse(body, status_code=500)


def _allowed_methods(app: FastAPI, scope: dict) -> list[str]:
    """Every method some route serves at this path."""
    try:
        from fastapi.routing import iter_route_contexts
        routes = list(iter_route_contexts(app.routes))
    except ImportError:  # FastAPI before included routers were kept as nodes
        routes = list(app.routes)
    methods: set[str] = set()
    for route in routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(scope["path"]) and route.methods:
            methods |= set(route.methods)
    return sorted(methods)


_UNPARSABLE_BODY = "There was an error parsing the body"
"""FastAPI's detail when decoding a JSON body raised something other than a JSON error."""

# Parts of a pydantic error location that name the schema branch, not the caller's field.
_SCHEMA_TAGS = frozenset({"body", "query", "path", "header", "int", "float", "str", "bool"})


def _is_schema_tag(part: object) -> bool:
    return isinstance(part, str) and (part in _SCHEMA_TAGS or "[" in part or part.startswith("constrained-"))
