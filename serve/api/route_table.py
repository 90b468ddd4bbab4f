"""Which requests the worker's app serves, decided before any layer records them.

BentoML's request-metrics middleware (and its tracing and access-log layers) label what
they record with the raw request path, so requests to made-up paths would each add series
to ``/metrics`` and memory to the worker (issue 20). :class:`RouteTable` resolves a
request against the app's routes with Starlette's public matching API
(:meth:`starlette.routing.BaseRoute.matches`) and returns a bounded label: the route's
path for a known route, :data:`OTHER` for everything else. Only requests it resolves to
a label other than :data:`OTHER` reach BentoML's stack, so every path BentoML records is
one of a fixed set.

Catch-all routes (a path parameter, such as the ``/v1/{rest:path}`` fallback) are not
"known": their answer is a 404 or 405 the front gives itself. Static files (BentoML's UI
assets) are known only under their canonical path and when the file exists, so
``/static_content/a/../x.js`` cannot mint a label.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

OTHER = "other"  # the one label every unknown path shares


@dataclass(frozen=True)
class Resolution:
    """Where a request goes.

    Attributes:
        label: The route's path, or :data:`OTHER`.
        status: 0 when a route serves the request; 404 or 405 to answer otherwise.
        allow: The methods the path accepts (for a 405's ``Allow`` header).
    """

    label: str
    status: int
    allow: tuple[str, ...] = ()


def route_path(scope: Scope) -> str:
    """The request path without the app's ``root_path``."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class RouteTable:
    """Resolves HTTP requests against a Starlette app's routes (BentoML's app).

    Args:
        routes: The app's top-level routes (``Starlette.routes``); mounted Starlette apps
            are searched through their own routes.
    """

    def __init__(self, routes: Sequence[Any]) -> None:
        self.routes = list(routes)

    def resolve(self, scope: Scope) -> Resolution:
        """The label and verdict for an ``http`` scope."""
        allow: set[str] = set()
        label = self._find(self.routes, scope, allow)
        if label is not None:
            return Resolution(label, 0)
        if allow:
            return Resolution(route_path(scope), 405, tuple(sorted(allow)))
        return Resolution(OTHER, 404)

    def label(self, scope: Scope) -> str:
        """The label of a request: its route's path, or :data:`OTHER`."""
        res = self.resolve(scope)
        return res.label if res.status != 404 else OTHER

    def _find(self, routes: Sequence[Any], scope: Scope, allow: set[str]) -> str | None:
        for route in routes:
            match, child = route.matches(scope)
            if match is Match.NONE:
                continue
            if isinstance(route, Mount):
                found = self._in_mount(route, {**scope, **child}, allow)
            elif isinstance(route, Route) and not route.param_convertors:
                found = route.path if match is Match.FULL else None
                if match is Match.PARTIAL:
                    allow.update(route.methods or ())
            else:  # a catch-all (path parameters) or an unknown kind of route
                found = None
            if found is not None:
                return found
        return None

    def _in_mount(self, mount: Mount, scope: Scope, allow: set[str]) -> str | None:
        if mount.routes:
            return self._find(mount.routes, scope, allow)
        if isinstance(mount.app, StaticFiles):
            return static_label(mount, scope, allow)
        return None


def static_label(mount: Mount, scope: Scope, allow: set[str]) -> str | None:
    """The label of an existing static file requested under its canonical path."""
    rel = mount.app.get_path(scope).replace(os.sep, "/")
    path = f"{mount.path}/{rel}"
    if path != route_path({**scope, "root_path": scope.get("app_root_path", "")}):
        return None
    _, found = mount.app.lookup_path(rel)
    if found is None or not stat.S_ISREG(found.st_mode):
        return None
    if scope["method"] not in ("GET", "HEAD"):
        allow.update(("GET", "HEAD"))
        return None
    return path
