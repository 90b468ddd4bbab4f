"""How ``/classify`` reaches its endpoint without BentoML's per-request layers.

BentoML wraps the mounted public routes in its own ASGI stack (request metrics, tracing,
timeout, context middleware, router, mount); with a small classifier those layers cost
about as much CPU as the model (docs/benchmarks.md, issue 14). Two shortcuts:

* :class:`DirectRoutesFront` is the outermost layer of the worker's app (installed through
  ``@bentoml.service(service_class=...)``, :func:`direct_routes_service`): it refuses
  what the app does not serve (API key, unknown path, method) before BentoML records
  anything, answers the ``direct`` routes itself, recording BentoML's request metrics
  under their names, and hands every other request to BentoML's app unchanged.
* :class:`DirectRoutesApp`, the mounted app, calls the same endpoints without Starlette's
  layers when a request does come through BentoML's stack (BentoML configured).

Direct endpoints are raw ASGI callables returning the status they sent, and never raise
(:class:`serve.api.classify_route.ClassifyEndpoint`). The mounted app stays a
:class:`~starlette.applications.Starlette` instance on purpose: BentoML's mount asks a
Starlette app which paths it serves, so BentoML's own routes (``/``, ``/docs.json``...)
keep working beside it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.api.http_errors import send_error
from serve.api.log_text import for_log
from serve.api.route_table import Resolution, RouteTable, route_path
from serve.app.auth import ApiKeyMiddleware
from serve.app.auth import refuse as refuse_without_key
from serve.app.connections import ConnectionLimits
from serve.app.connections import install as install_connection_guards
from serve.app.request_metrics import RequestMetrics


class DirectRoutesApp(Starlette):
    """Starlette app that calls the endpoints of ``direct`` paths without its layers.

    Args:
        routes: The app's routes (Starlette ``Route`` objects).
        direct: Paths whose endpoints run directly: raw ASGI callables that return the
            status they sent and never raise.
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

    def endpoint_for(self, scope: Scope) -> Any:
        """The endpoint of a direct route ``scope`` asks for, else None."""
        if scope["type"] != "http":
            return None
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        return self.direct.get((scope["method"], path))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoint_for(scope)
        if endpoint is None:
            await super().__call__(scope, receive, send)
            return
        await call_direct(self, endpoint, scope, receive, send)


async def call_direct(app: Starlette, endpoint: Any, scope: Scope, receive: Receive,
                      send: Send) -> int:
    """Run a direct endpoint of ``app`` (raw ASGI); returns the status it sent."""
    scope["app"] = app
    return await endpoint(scope, receive, send)


class DirectRoutesFront:
    """Outermost ASGI layer of the served app: it refuses what the app does not serve and
    answers the ``direct`` routes, before BentoML's own stack; every other request goes
    to BentoML's app unchanged.

    Refused here, so no BentoML layer records or logs them by their raw path (issue 20):
    a request without the API key (401), an unknown path (404), a known path with
    another method (405), all as OpenAI's error object; websocket requests (the app has
    no websocket route). The request metrics of what is answered here are recorded
    under BentoML's names (:class:`RequestMetrics`) with a bounded ``endpoint`` label:
    the route's path, or ``other`` for every unknown path
    (:class:`serve.api.route_table.RouteTable`).

    For a small model BentoML's per-request layers (request metrics, tracing, timeout,
    context, router, mount) cost as much CPU as the model (docs/benchmarks.md, issue 14).
    What the direct routes still need from them is done here or by the route itself:
    the request metrics, the API key (:class:`serve.app.auth.ApiKeyMiddleware`), errors as
    JSON (a direct endpoint such as :class:`serve.api.classify_route.ClassifyEndpoint`
    answers every error itself and never raises) and deadlines (the body timeout and
    the micro-batcher's ``max_latency_ms``).

    With ``access_log`` each answer given here is logged as BentoML's access log would
    (``bentoml.access`` logger, same line shape, the path escaped and cut).

    Args:
        app: BentoML's ASGI app for the service (a Starlette app: its routes decide
            which paths are known).
        routes: The mounted app whose direct routes are answered here.
        api_key: The bearer key every route but the open ones needs (None: open).
        access_log: Log every request answered here.
        direct: Answer the direct routes here (False: only refuse).
    """

    def __init__(self, app: ASGIApp, routes: DirectRoutesApp, api_key: str | None,
                 access_log: bool = False, direct: bool = True) -> None:
        self.app = app
        self.routes = routes
        self.table = RouteTable(app.routes)
        self.auth = ApiKeyMiddleware(app, api_key=api_key) if api_key else None
        self.access = logging.getLogger("bentoml.access") if access_log else None
        self.direct = direct
        self.metrics: dict[str, RequestMetrics] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = 401 if self.auth is not None and not self.auth.allowed(scope) else 0
        endpoint = self.routes.endpoint_for(scope) if self.direct else None
        if endpoint is not None:  # the hot path: no route search
            where = Resolution(route_path(scope), 0)
        else:
            where = self.table.resolve(scope)
            refusal = refusal or where.status
            if not refusal:
                await self.app(scope, receive, send)
                return
        metrics = self.metrics.get(where.label)
        if metrics is None:
            metrics = self.metrics[where.label] = RequestMetrics(where.label)
        start, status = metrics.started(), 500
        try:
            if refusal:
                status = await refuse(refusal, where, scope, send)
            else:
                status = await call_direct(self.routes, endpoint, scope, receive, send)
        finally:
            metrics.finished(start, status)
            if self.access is not None:
                self.log_access(scope, status, start)

    def log_access(self, scope: Scope, status: int, start: float) -> None:
        """One access-log line, in BentoML's shape (the path escaped and cut)."""
        client = scope.get("client")
        self.access.info("%s (scheme=%s,method=%s,path=%s) (status=%d) %.3fms",
                         f"{client[0]}:{client[1]}" if client else "_", scope["scheme"],
                         for_log(scope["method"], 16), for_log(scope["path"]), status,
                         (time.perf_counter() - start) * 1000)


async def refuse(status: int, where: Resolution, scope: Scope, send: Send) -> int:
    """Answer 401 (no key), 404 or 405 as OpenAI's error object; returns ``status``."""
    if status == 401:
        return await refuse_without_key(send)
    path = for_log(route_path(scope))
    if status == 405:
        return await send_error(send, f"{path}: Method Not Allowed", 405,
                                headers=[(b"allow", ", ".join(where.allow).encode())])
    return await send_error(send, f"{path}: Not Found", 404)


def direct_routes_service(routes: DirectRoutesApp, api_key: str | None,
                          access_log: bool = False, direct: bool = True,
                          connections: ConnectionLimits | None = None
                          ) -> type[bentoml.Service]:
    """A :class:`bentoml.Service` class whose app is fronted by :class:`DirectRoutesFront`.

    Pass it as ``@bentoml.service(service_class=...)`` (BentoML's public hook for a
    service class); the worker builds its app with :meth:`bentoml.Service.to_asgi`,
    then its uvicorn server, which gets ``connections``' guards
    (:func:`serve.app.connections.install`).
    """
    class DirectRoutesService(bentoml.Service):
        def to_asgi(self, is_main: bool = True) -> ASGIApp:
            if connections is not None:
                install_connection_guards(connections)
            return DirectRoutesFront(super().to_asgi(is_main=is_main), routes, api_key,
                                     access_log, direct)

    return DirectRoutesService
