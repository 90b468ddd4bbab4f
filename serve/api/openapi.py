"""The OpenAPI 3.1 schema of the public routes, served at ``GET /openapi.json``.

BentoML's ``/docs.json`` describes only BentoML's own APIs (and FastAPI apps), not the
Starlette routes mounted on the service; this schema is built from the same pydantic
models the routes validate with, so Swagger UI, client generators and schemathesis see
the real API: ``/classify``, ``/generate``, ``/metadata``, ``/v1/completions``,
``/v1/chat/completions`` and ``/v1/models``, every error as OpenAI's error object.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from serve.api.openai_requests import ChatRequest, CompletionRequest
from serve.api.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    GenerateRequest,
    GenerateResponse,
    Limits,
)

REF = "#/components/schemas/{model}"

_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}}

# (path, method, request model or None, response model or None, summary, streams)
_ROUTES: list[tuple[str, str, type[BaseModel] | None, type[BaseModel] | None, str, bool]] = [
    ("/classify", "post", ClassifyRequest, ClassifyResponse,
     "Classify texts (text-classification artifacts).", False),
    ("/generate", "post", GenerateRequest, GenerateResponse,
     "Complete prompts; `stream: true` answers server-sent events (one prompt).", True),
    ("/v1/completions", "post", CompletionRequest, None,
     "OpenAI-compatible text completion.", True),
    ("/v1/chat/completions", "post", ChatRequest, None,
     "OpenAI-compatible chat completion.", True),
    ("/v1/models", "get", None, None, "The served model, OpenAI's list format.", False),
    ("/metadata", "get", None, None, "The artifact's manifest summary and server limits.",
     False),
]
# One valid request per body, published as the media type's ``example`` (Swagger UI
# pre-fills it; schemathesis sends it in its examples phase).
_EXAMPLES: dict[str, dict[str, Any]] = {
    "/classify": {"texts": ["a fine, moving film"]},
    "/generate": {"prompts": ["Once upon a time"], "max_new_tokens": 16},
    "/v1/completions": {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Say hello."}],
                             "max_tokens": 16, "temperature": 0},
}
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


def _apply_limits(schemas: dict[str, Any], limits: Limits) -> None:
    """Publish this server's caps in the request schemas (``maximum``/``maxItems``)."""
    for name in ("ClassifyRequest", "GenerateRequest", "CompletionRequest", "ChatRequest"):
        for field, spec in schemas[name]["properties"].items():
            if field in _CAPS:
                keyword, limit = _CAPS[field]
                spec[keyword] = getattr(limits, limit)


def openapi_schema(title: str = "modelpress", version: str = "1", api_key: bool = False,
                   limits: Limits | None = None) -> dict[str, Any]:
    """The OpenAPI document of the public routes.

    Args:
        title: ``info.title`` (the served model's name).
        version: ``info.version``.
        api_key: Declare bearer authentication on every operation.
        limits: The server's caps, published as bounds (token counts, items).
    """
    models = [(m, mode) for _, _, req, resp, _, _ in _ROUTES
              for m, mode in ((req, "validation"), (resp, "serialization")) if m]
    _, defs = models_json_schema(models, ref_template=REF)
    schemas = {**defs.get("$defs", {}), "Error": _ERROR}
    if limits is not None:
        _apply_limits(schemas, limits)
    paths: dict[str, Any] = {}
    for path, method, req, resp, summary, streams in _ROUTES:
        ok: dict[str, Any] = {"application/json": {"schema": (
            {"$ref": REF.format(model=resp.__name__)} if resp else {"type": "object"})}}
        if streams:
            ok["text/event-stream"] = {"schema": {"type": "string"}}
        op: dict[str, Any] = {
            "operationId": path.strip("/").replace("/", "_"), "summary": summary,
            "responses": {"200": {"description": "OK", "content": ok}, **{
                code: {"description": text, "content": {"application/json": {
                    "schema": {"$ref": REF.format(model="Error")}}}}
                for code, text in _STATUSES.items()}}}
        if req is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": REF.format(model=req.__name__)},
                "example": _EXAMPLES[path]}}}
        paths[path] = {method: op}
    doc: dict[str, Any] = {"openapi": "3.1.0", "info": {"title": title, "version": version},
                           "paths": paths, "components": {"schemas": schemas}}
    if api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                           "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
