"""API keys → tenants. Every route but the health probes depends on ``get_tenant``."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.core import logs
from service.core.errors import Unauthorized
from service.core.settings import LOCAL_TENANT, Settings

COOKIE = "tuneserve_key"
"""The dashboard's login cookie (HttpOnly, SameSite=Strict): a browser cannot send a header."""
UI_HEADER = "x-tuneserve-ui"
"""Required on a state-changing request signed by the cookie: a cross-site form cannot set a
header, so this stops request forgery even where SameSite is not honoured."""


def tenant_for_key(settings: Settings, authorization: str | None) -> str:
    """The tenant a request acts for.

    With no keys configured (the embedded default, loopback only) everyone is the local tenant.
    """
    if not settings.api_keys:
        return LOCAL_TENANT
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.",
                           code="missing_api_key")
    key = key.strip()
    tenant = None
    # Compare against every key in constant time so timing does not leak a valid prefix.
    for candidate, owner in settings.api_keys.items():
        if hmac.compare_digest(candidate.encode(), key.encode()):
            tenant = owner
    if tenant is None:
        raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
    return tenant


# Declares the scheme in the OpenAPI document (clients and schemathesis see that every route
# needs a key); the check itself is ``tenant_for_key``, which also answers a missing key with 401.
_bearer = HTTPBearer(auto_error=False, description="An API key: 'Authorization: Bearer <key>'.")


def get_tenant(request: Request,
               _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None) -> str:
    authorization = request.headers.get("authorization")
    cookie = request.cookies.get(COOKIE)
    if authorization is None and cookie:
        if request.method not in ("GET", "HEAD") and request.headers.get(UI_HEADER) != "1":
            raise Unauthorized("A request authenticated by the dashboard cookie must carry the "
                               "header 'X-Tuneserve-UI: 1'.", code="missing_ui_header")
        authorization = f"Bearer {cookie}"
    tenant = tenant_for_key(request.app.state.settings, authorization)
    request.state.tenant = tenant
    logs.bind(tenant=tenant)
    return tenant
