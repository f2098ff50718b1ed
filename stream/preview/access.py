"""Who may use the preview: the token a request presents, compared in constant time, and the headers of
every response (no CORS, no caching, no framing)."""

from __future__ import annotations

import hmac
from types import MappingProxyType
from typing import Any

TOKEN_HEADER = "X-Preview-Token"
PUBLIC_PREFIX = "/static/"  # the page's script and style: no data in them, served without the token
SECURITY_HEADERS = MappingProxyType({
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the page URL carries the token
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; media-src 'self' blob:; img-src 'self' data: blob:; "
                               "frame-ancestors 'none'",
})


def presented_token(headers: Any, query: Any) -> str | None:
    """The token a request presents: ``X-Preview-Token``, ``Authorization: Bearer``, or ``?token=``."""
    value = headers.get(TOKEN_HEADER)
    if value:
        return value
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    value = query.get("token")
    return value or None


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison; an empty expected token never matches."""
    if not expected or given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def token_guard(token: str):
    """The aiohttp middleware that asks every request outside :data:`PUBLIC_PREFIX` for ``token`` (none: 401,
    a wrong one: 403) and adds :data:`SECURITY_HEADERS` to every response."""
    from aiohttp import web

    @web.middleware
    async def guard(request: web.Request, handler):
        if not request.path.startswith(PUBLIC_PREFIX):
            given = presented_token(request.headers, request.query)
            if given is None:
                return web.json_response({"error": "token required"}, status=401,
                                         headers={"WWW-Authenticate": "Bearer", **SECURITY_HEADERS})
            if not token_matches(given, token):
                return web.json_response({"error": "wrong token"}, status=403, headers=SECURITY_HEADERS)
        response = await handler(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    return guard


async def json_object_body(request: Any) -> tuple[dict[str, Any] | None, Any]:
    """A POST body that must be a JSON object: ``(body, None)``, or ``(None, a 400 response saying why)``."""
    import json

    from aiohttp import web

    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, web.json_response({"error": "body is not JSON"}, status=400)
    if not isinstance(body, dict):
        return None, web.json_response({"error": "body must be a JSON object"}, status=400)
    return body, None
