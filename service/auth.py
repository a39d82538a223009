"""API keys → tenants. Every route but the health probes depends on ``get_tenant``."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import Unauthorized
from service.settings import LOCAL_TENANT, Settings


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


def get_tenant(request: Request) -> str:
    tenant = tenant_for_key(request.app.state.settings, request.headers.get("authorization"))
    request.state.tenant = tenant
    return tenant
