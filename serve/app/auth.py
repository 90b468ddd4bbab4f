"""The API key: ``modelpress serve --api-key KEY`` (or ``MODELPRESS_API_KEY``).

When a key is set, every request needs ``Authorization: Bearer <key>`` (the scheme is
case-insensitive, RFC 7235), else 401 with OpenAI's error object and
``WWW-Authenticate: Bearer``. The key is compared in constant time
(:func:`hmac.compare_digest`). :class:`serve.app.asgi.DirectRoutesFront` checks it first,
before BentoML's layers record anything.

Open without the key: the health checks (``/readyz``, ``/livez``, ``/healthz``), which
orchestrators probe without credentials, and ``/metrics``, which Prometheus scrapes
(counts and latencies only, no request content; as vLLM leaves it). Everything else,
``/docs.json`` and ``/openapi.json`` included, is closed.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from serve.api.http_errors import send_error

OPEN_PATHS = frozenset({"/readyz", "/livez", "/healthz", "/metrics"})


def bearer_token(scope: Scope) -> bytes | None:
    """The credentials of an ``Authorization: Bearer ...`` header (any scheme case)."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.lstrip(b" ") if scheme.lower() == b"bearer" else None
    return None


class ApiKeyMiddleware:
    """Pure ASGI middleware refusing requests without the bearer key (401).

    Args:
        app: The wrapped ASGI app.
        api_key: The key clients must send.
        open_paths: Paths served without the key.
    """

    def __init__(self, app: ASGIApp, api_key: str,
                 open_paths: frozenset[str] = OPEN_PATHS) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self.app = app
        self.expected = api_key.encode()
        self.open_paths = open_paths

    def allowed(self, scope: Scope) -> bool:
        """Whether the request may pass: an open path, or the right bearer key."""
        if scope.get("path", "") in self.open_paths:
            return True
        token = bearer_token(scope)
        return token is not None and hmac.compare_digest(token, self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.allowed(scope):
            await self.app(scope, receive, send)
            return
        await refuse(send)


async def refuse(send: Send) -> int:
    """Answer the 401 (OpenAI's error object, ``WWW-Authenticate: Bearer``)."""
    return await send_error(
        send, "Authorization: missing or wrong API key; send 'Authorization: Bearer <key>'",
        401, code="invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
