"""The OpenAPI schema is derived from the route table: every route the API layer builds is
documented where it is declared, and the schema lists exactly those routes."""

from __future__ import annotations

import pytest

from serve.api.http_api import build_routes
from serve.api.openai_api import build_openai_routes
from serve.api.openapi import DocumentedRoute, RouteDoc, openapi_schema
from serve.api.schemas import ClassifyRequest, Limits


def _routes() -> list:
    return [*build_routes(lambda: None), *build_openai_routes(lambda: None)]


def test_the_schema_lists_exactly_the_routes_of_the_table():
    routes = _routes()
    assert all(isinstance(route, DocumentedRoute) for route in routes)
    doc = openapi_schema(routes, limits=Limits(max_new_tokens=77))
    assert {(path, method) for path, ops in doc["paths"].items() for method in ops} == {
        (route.path, route.method) for route in routes}
    for route in routes:
        if route.doc.request is not None:  # each published example is a valid body
            route.doc.request.model_validate(route.doc.example)
    assert doc["components"]["schemas"]["GenerateRequest"]["properties"][
        "max_new_tokens"]["maximum"] == 77


def test_a_route_with_a_body_needs_an_example():
    with pytest.raises(ValueError, match=r"'Classify\.': a route with a body needs an example"):
        RouteDoc("Classify.", ClassifyRequest)
