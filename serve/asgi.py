"""The mounted app of the service: a Starlette app whose hottest routes skip its layers.

BentoML mounts the public routes' app under its own ASGI stack (metrics, tracing,
timeout, context middleware, router). Inside it, a plain Starlette app would add a
second ServerErrorMiddleware, ExceptionMiddleware, router and request/response wrapper
per request: with a small model, that costs about as much CPU as the model call. The
``direct`` routes (``/classify``) skip them: their endpoints are guarded by
:func:`serve.http_api.endpoint`, which already turns every error into a JSON answer, so
the layers skipped had nothing left to do. Every other route goes through Starlette.

It stays a :class:`~starlette.applications.Starlette` instance on purpose: BentoML's
mount asks a Starlette app which paths it serves, so BentoML's own routes (``/``,
``/docs.json``...) keep working beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send


class DirectRoutesApp(Starlette):
    """Starlette app that calls the endpoints of ``direct`` paths without its layers.

    Args:
        routes: The app's routes (Starlette ``Route`` objects).
        direct: Paths whose endpoints run directly; they must never raise (guarded).
        **kwargs: Passed to :class:`Starlette`.
    """

    def __init__(self, routes: Sequence[Any], direct: Sequence[str] = (),
                 **kwargs: Any) -> None:
        super().__init__(routes=list(routes), **kwargs)
        self.direct: dict[tuple[str, str], Any] = {}
        for route in routes:
            if isinstance(route, Route) and route.path in direct:
                for method in route.methods or ():
                    self.direct[(method, route.path)] = route.endpoint
        missing = set(direct) - {path for _, path in self.direct}
        if missing:
            raise ValueError(f"direct routes not found among the routes: {sorted(missing)}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = None
        if scope["type"] == "http":
            path, root = scope["path"], scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            endpoint = self.direct.get((scope["method"], path))
        if endpoint is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        response = await endpoint(Request(scope, receive, send))
        await response(scope, receive, send)
