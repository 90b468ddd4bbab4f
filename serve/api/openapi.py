"""The OpenAPI 3.1 schema of the public routes, served at ``GET /openapi.json``.

BentoML's ``/docs.json`` describes only BentoML's own APIs (and FastAPI apps), not the
Starlette routes mounted on the service; this schema is built from the route table itself:
each public route is a :class:`DocumentedRoute` carrying its :class:`RouteDoc` (the
pydantic models the route validates with, a summary, an example), declared beside its
handler. So Swagger UI, client generators and schemathesis see the real API, every error
as OpenAI's error object, and a new route is documented where it is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.routing import Route

from serve.api.schemas import Limits

REF = "#/components/schemas/{model}"

_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}}


@dataclass(frozen=True)
class RouteDoc:
    """What the schema says of one route.

    Attributes:
        summary: One line.
        request: The body's model (None: no body).
        response: The JSON answer's model (None: any object).
        streams: Also answers ``text/event-stream``.
        example: One valid body, published as the media type's ``example`` (Swagger UI
            pre-fills it; schemathesis sends it in its examples phase).
    """

    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    streams: bool = False
    example: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.request is not None and self.example is None:
            raise ValueError(f"{self.summary!r}: a route with a body needs an example")


class DocumentedRoute(Route):
    """A Starlette route with one method and its :class:`RouteDoc`.

    Args:
        path: The route's path.
        endpoint: Its handler (a request function or a raw ASGI callable).
        method: ``GET`` or ``POST``.
        doc: What the schema says of it.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], method: str,
                 doc: RouteDoc) -> None:
        super().__init__(path, endpoint, methods=[method])
        self.method = method.lower()
        self.doc = doc


_STATUSES = {"400": "Invalid request (the message names the field)",
             "401": "Missing or wrong API key (when the server has one)",
             "408": "Body not received in time", "413": "Body or input too large",
             "429": "Too many requests in flight", "500": "Internal error",
             "503": "Overloaded (retry after Retry-After)"}


# request field → the server limit that caps it (published as the schema's bound)
_CAPS = {"max_new_tokens": ("maximum", "max_new_tokens"),
         "max_tokens": ("maximum", "max_new_tokens"),
         "max_completion_tokens": ("maximum", "max_new_tokens"),
         "texts": ("maxItems", "max_items"), "prompts": ("maxItems", "max_items")}


def _apply_limits(schemas: dict[str, Any], requests: set[str], limits: Limits) -> None:
    """Publish this server's caps in the request schemas (``maximum``/``maxItems``)."""
    for name in sorted(requests):
        for field, spec in schemas[name]["properties"].items():
            if field in _CAPS:
                keyword, limit = _CAPS[field]
                spec[keyword] = getattr(limits, limit)


def openapi_schema(routes: Sequence[Any], title: str = "modelpress", version: str = "1",
                   api_key: bool = False, limits: Limits | None = None) -> dict[str, Any]:
    """The OpenAPI document of the public routes.

    Args:
        routes: The app's routes; the :class:`DocumentedRoute` ones are published.
        title: ``info.title`` (the served model's name).
        version: ``info.version``.
        api_key: Declare bearer authentication on every operation.
        limits: The server's caps, published as bounds (token counts, items).
    """
    public = [r for r in routes if isinstance(r, DocumentedRoute)]
    models = [(m, mode) for r in public
              for m, mode in ((r.doc.request, "validation"), (r.doc.response, "serialization"))
              if m]
    _, defs = models_json_schema(models, ref_template=REF)
    schemas = {**defs.get("$defs", {}), "Error": _ERROR}
    if limits is not None:
        _apply_limits(schemas, {r.doc.request.__name__ for r in public if r.doc.request},
                      limits)
    paths: dict[str, Any] = {}
    for route in public:
        path, doc = route.path, route.doc
        ok: dict[str, Any] = {"application/json": {"schema": (
            {"$ref": REF.format(model=doc.response.__name__)} if doc.response
            else {"type": "object"})}}
        if doc.streams:
            ok["text/event-stream"] = {"schema": {"type": "string"}}
        op: dict[str, Any] = {
            "operationId": path.strip("/").replace("/", "_"), "summary": doc.summary,
            "responses": {"200": {"description": "OK", "content": ok}, **{
                code: {"description": text, "content": {"application/json": {
                    "schema": {"$ref": REF.format(model="Error")}}}}
                for code, text in _STATUSES.items()}}}
        if doc.request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": REF.format(model=doc.request.__name__)},
                "example": doc.example}}}
        paths[path] = {route.method: op}
    document: dict[str, Any] = {"openapi": "3.1.0",
                                "info": {"title": title, "version": version},
                                "paths": paths, "components": {"schemas": schemas}}
    if api_key:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                                "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document
