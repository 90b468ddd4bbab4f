"""The /classify hot path without a server: the raw body reader's limits (408/413/400),
the JSON answer, and the front layer that answers direct routes before BentoML's stack
(request metrics by status, API key), plus the BentoML hook it relies on."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from typing import Any

import bentoml
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from serve.api.body import read_raw_body
from serve.api.classify_route import ClassifyEndpoint, send_json
from serve.api.schemas import Limits
from serve.app.asgi import DirectRoutesApp, DirectRoutesFront, direct_routes_service
from serve.errors import ModelpressError, RequestError


def _receiver(*messages: dict[str, Any], then_wait: bool = False):
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        if then_wait:
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}
    return receive


def _scope(path: str = "/classify", method: str = "POST",
           headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "root_path": "",
            "headers": headers or [], "query_string": b""}


def _read(scope: dict[str, Any], receive: Any, **limits: Any) -> bytes:
    return asyncio.run(read_raw_body(scope, receive, Limits(**limits)))


def test_body_chunks_are_joined():
    receive = _receiver({"type": "http.request", "body": b'{"texts": ', "more_body": True},
                        {"type": "http.request", "body": b'["a"]}'})
    assert _read(_scope(), receive) == b'{"texts": ["a"]}'


def test_declared_oversize_body_is_413_before_reading():
    scope = _scope(headers=[(b"content-length", b"2000")])
    with pytest.raises(RequestError) as err:
        _read(scope, _receiver(), max_body_bytes=1000)
    assert err.value.status == 413 and "2000 bytes" in str(err.value)


def test_streamed_oversize_body_is_413():
    chunk = {"type": "http.request", "body": b"x" * 600, "more_body": True}
    with pytest.raises(RequestError) as err:
        _read(_scope(), _receiver(chunk, chunk, chunk), max_body_bytes=1000)
    assert err.value.status == 413 and str(err.value).startswith("body:")


def test_slow_body_is_408_and_disconnect_is_400():
    slow = _receiver({"type": "http.request", "body": b"{", "more_body": True}, then_wait=True)
    with pytest.raises(RequestError) as err:
        _read(_scope(), slow, body_timeout_s=0.05)
    assert err.value.status == 408 and "body_timeout_s" in str(err.value)
    gone = _receiver({"type": "http.request", "body": b"{", "more_body": True})
    with pytest.raises(RequestError) as err:
        _read(_scope(), gone)
    assert err.value.status == 400 and "disconnected" in str(err.value)


def test_starlette_routes_read_the_body_with_the_same_limits():
    from starlette.requests import Request

    from serve.api.body import read_body

    chunks = [{"type": "http.request", "body": b'{"prompts": ', "more_body": True},
              {"type": "http.request", "body": b'["a"]}'}]
    assert asyncio.run(read_body(Request(_scope(), _receiver(*chunks)), Limits())) == (
        b'{"prompts": ["a"]}')
    big = {"type": "http.request", "body": b"x" * 600, "more_body": True}
    with pytest.raises(RequestError) as err:
        asyncio.run(read_body(Request(_scope(), _receiver(big, big)),
                              Limits(max_body_bytes=1000)))
    assert err.value.status == 413


def _answer(status: int, payload: Any) -> tuple[int, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
    return asyncio.run(send_json(send, status, payload)), sent


def test_json_answer_headers_and_retry_after():
    status, sent = _answer(200, {"label": "positif ✓"})
    body = sent[1]["body"]
    assert status == 200 and json.loads(body) == {"label": "positif ✓"}
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(body)).encode()
    status, sent = _answer(503, {"error": {}})
    assert status == 503 and dict(sent[0]["headers"])[b"retry-after"] == b"1"


def test_unserialisable_answer_is_a_500_error_object():
    status, sent = _answer(200, {"score": float("nan")})
    assert status == 500 and sent[0]["status"] == 500
    assert json.loads(sent[1]["body"])["error"]["type"] == "server_error"


def test_classify_before_start_up_is_a_503_not_a_crash():
    def not_ready():
        raise ModelpressError("service is not initialised yet")
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
    status = asyncio.run(ClassifyEndpoint(not_ready)(
        _scope(), _receiver({"type": "http.request", "body": b"{}"}), send))
    assert status == sent[0]["status"] == 503
    assert dict(sent[0]["headers"])[b"retry-after"] == b"1"
    assert json.loads(sent[1]["body"])["error"]["message"].startswith("service: ")


class _Echo:
    """A raw direct endpoint: 200 with the body's length."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> int:
        body = await read_raw_body(scope, receive, Limits())
        return await send_json(send, 200, {"bytes": len(body)})


class _Inner(Starlette):
    """Stands for BentoML's app: its routes (one of its own, the mounted app), and a
    record of the requests that reached it."""

    def __init__(self, routes: DirectRoutesApp) -> None:
        super().__init__(routes=[Route("/metadata", _plain, methods=["GET"]),
                                 Mount("/", app=routes)])
        self.calls: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls.append(scope["path"])
        await PlainTextResponse("inner")(scope, receive, send)


async def _plain(request: Any) -> PlainTextResponse:
    return PlainTextResponse("inner")


def _front(api_key: str | None = None,
           access_log: bool = False) -> tuple[DirectRoutesFront, list[str]]:
    routes = DirectRoutesApp([Route("/classify", _Echo(), methods=["POST"])],
                             direct=["/classify"])
    inner = _Inner(routes)
    return DirectRoutesFront(inner, routes, api_key, access_log), inner.calls


def _call(app: Any, scope: dict[str, Any], body: bytes = b"{}") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
    asyncio.run(app(scope, _receiver({"type": "http.request", "body": body}), send))
    return sent


def _count(front: DirectRoutesFront, metric: str, status: str) -> float:
    family = getattr(front.metrics["/classify"], metric).collect()[0]
    return sum(s.value for s in family.samples if s.labels.get("http_response_code") == status
               and s.name.endswith(("_total", "_count")))


def test_front_answers_direct_routes_and_records_bentoml_request_metrics():
    front, inner_calls = _front()
    for _ in range(3):
        sent = _call(front, _scope(), b'{"texts": ["a"]}')
        assert sent[0]["status"] == 200 and json.loads(sent[1]["body"]) == {"bytes": 16}
    _call(front, _scope("/metadata", "GET"))
    sent = _call(front, _scope("/classify", "GET"))  # not the direct route's method
    assert sent[0]["status"] == 405 and json.loads(sent[1]["body"])["error"]["code"] == (
        "method_not_allowed")
    assert inner_calls == ["/metadata"]
    assert _count(front, "total", "200") == 3 and _count(front, "duration", "200") == 3
    assert _count(front, "total", "405") == 1


def test_front_checks_the_api_key_on_direct_routes():
    front, inner_calls = _front(api_key="k3y")
    sent = _call(front, _scope())
    assert sent[0]["status"] == 401 and json.loads(sent[1]["body"])["error"]["code"] == (
        "invalid_api_key")
    sent = _call(front, _scope(headers=[(b"authorization", b"Bearer k3y")]))
    assert sent[0]["status"] == 200
    assert _count(front, "total", "401") == 1 and _count(front, "total", "200") == 1
    assert inner_calls == []


def test_front_writes_bentoml_access_log_lines(caplog):
    front, _ = _front(access_log=True)
    scope = {**_scope(), "scheme": "http", "client": ("127.0.0.1", 5000)}
    with caplog.at_level(logging.INFO, logger="bentoml.access"):
        _call(front, scope)
    [line] = [r.getMessage() for r in caplog.records if r.name == "bentoml.access"]
    assert line.startswith("127.0.0.1:5000 (scheme=http,method=POST,path=/classify) "
                           "(status=200) ") and line.endswith("ms")


def test_bentoml_builds_the_worker_app_through_the_service_class():
    # Pins the two BentoML behaviours the front layer relies on: @bentoml.service takes
    # service_class, and the worker builds its ASGI app with Service.to_asgi().
    routes = DirectRoutesApp([Route("/classify", _Echo(), methods=["POST"])],
                             direct=["/classify"])
    service_cls = direct_routes_service(routes, api_key=None)

    @bentoml.service(service_class=service_cls)
    @bentoml.asgi_app(routes, path="/")
    class Toy:
        pass

    assert isinstance(Toy, service_cls)
    app = Toy.to_asgi()
    assert isinstance(app, DirectRoutesFront) and app.routes is routes
    from _bentoml_impl.worker import service as worker
    assert ".to_asgi(" in inspect.getsource(worker)
