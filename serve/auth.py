"""The API key: ``modelpress serve --api-key KEY`` (or ``MODELPRESS_API_KEY``).

When a key is set, :class:`ApiKeyMiddleware` wraps the whole BentoML app (BentoML's own
routes included): every request needs ``Authorization: Bearer <key>``, else 401 with
OpenAI's error object and ``WWW-Authenticate: Bearer``. The key is compared in constant
time (:func:`hmac.compare_digest`).

Open without the key: the health checks (``/readyz``, ``/livez``, ``/healthz``), which
orchestrators probe without credentials, and ``/metrics``, which Prometheus scrapes
(counts and latencies only, no request content; as vLLM leaves it). Everything else,
``/docs.json`` and ``/openapi.json`` included, is closed.
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from serve.http_errors import error_body

OPEN_PATHS = frozenset({"/readyz", "/livez", "/healthz", "/metrics"})


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
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = open_paths

    def allowed(self, scope: Scope) -> bool:
        """Whether the request may pass: an open path, or the right bearer key."""
        if scope.get("path", "") in self.open_paths:
            return True
        sent = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                sent = value
                break
        return hmac.compare_digest(sent, self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.allowed(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps(error_body(
            "Authorization: missing or wrong API key; send 'Authorization: Bearer <key>'",
            401, param=None, code="invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
