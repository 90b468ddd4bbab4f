"""The one error shape of every route: OpenAI's error object.

Every 4xx/5xx answer of the service's routes (``/classify``, ``/generate``, ``/v1/*``,
``/metadata``, unknown paths, API-key refusals) has the body::

    {"error": {"message": "texts[2]: must not be empty", "type": "invalid_request_error",
               "param": "texts[2]", "code": "invalid_value"}}

as OpenAI's API and vLLM's server answer, so the ``openai`` SDK fills ``e.message``,
``e.type``, ``e.param`` and ``e.code``. ``message`` always starts with the field it is
about; ``param`` is that field (``null`` when the error is not about one field).
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Send

log = logging.getLogger(__name__)

# status → (type, default code); types are OpenAI's where it has one
_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", "invalid_value"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    503: ("server_error", "server_overloaded"),
    504: ("server_error", "timeout"),
}


def error_body(message: str, status: int, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` for ``status``."""
    kind, default_code = _KINDS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error",
                 HTTPStatus(status).phrase.lower().replace(" ", "_")))
    return {"error": {"message": message, "type": kind, "param": param,
                      "code": code or default_code}}


def error_response(message: str, status: int, param: str | None = None,
                   code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error answer (``Retry-After: 1`` on 429/503)."""
    headers = dict(headers or {})
    if status in (429, 503):
        headers.setdefault("Retry-After", "1")
    return JSONResponse(error_body(message, status, param, code), status_code=status,
                        headers=headers or None)


def error_bytes(message: str, status: int, code: str | None = None) -> bytes:
    """The JSON body of :func:`error_body`, encoded."""
    return json.dumps(error_body(message, status, code=code)).encode()


async def send_error(send: Send, message: str, status: int, code: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> int:
    """Answer the error object through a raw ASGI ``send``; returns ``status``."""
    body = error_bytes(message, status, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or ())]})
    await send({"type": "http.response.body", "body": body})
    return status


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404 unknown path, 405 wrong method) in the same shape."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", None) or HTTPStatus(status).phrase
    return error_response(f"{request.url.path}: {detail}", status,
                          headers=getattr(exc, "headers", None))


async def server_error(request: Request, exc: Exception) -> Response:
    """An exception nothing else handled: 500 in the same shape (logged)."""
    log.error("unexpected error in %s", request.url.path, exc_info=exc)
    return error_response("internal error; see the server log", 500)


def fallback_routes(prefixes: list[str], routes: list[Any]) -> list[Any]:
    """Catch-all routes under ``prefixes`` (put last): 404, or 405 for a known path with
    another method, in the error shape. BentoML's mount hands the mounted app only the
    paths it has routes for; other unknown paths get BentoML's plain 404."""
    from starlette.routing import Route

    known = {getattr(r, "path", None) for r in routes}
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

    async def fallback(request: Request) -> Response:
        status = 405 if request.url.path in known else 404
        return error_response(f"{request.url.path}: {HTTPStatus(status).phrase}", status)

    return [Route(f"{prefix}/{{rest:path}}", fallback, methods=methods)
            for prefix in prefixes]


EXCEPTION_HANDLERS: dict[Any, Any] = {HTTPException: http_exception, Exception: server_error}
