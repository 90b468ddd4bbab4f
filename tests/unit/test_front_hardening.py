"""The front layer's refusals without a server (issue 20): bounded metric labels for
made-up paths, the API key's scheme, 405 as the error object, websockets; client text in
log lines; the uvicorn connection guards (in-process server on loopback) and the BentoML
and uvicorn behaviours they rely on; one BENTOML_HOME per server."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import socket
import string
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from serve.api.log_text import for_log, names_for_log
from serve.api.openai_requests import CompletionRequest
from serve.api.route_table import OTHER, RouteTable
from serve.app.asgi import DirectRoutesApp, DirectRoutesFront
from serve.app.auth import ApiKeyMiddleware
from serve.app.connections import ConnectionLimits, guarded_protocol, install
from serve.app.launcher import server_env, server_home
from serve.settings import ServeSettings
from tests.unit.test_direct_routes import _call, _Echo, _Inner, _scope

KEY = "k3y"


def _front(api_key: str | None = KEY) -> tuple[DirectRoutesFront, list[str]]:
    routes = DirectRoutesApp([Route("/classify", _Echo(), methods=["POST"])],
                             direct=["/classify"])
    inner = _Inner(routes)
    inner.router.routes.insert(0, Route("/readyz", _ok, methods=["GET"]))
    return DirectRoutesFront(inner, routes, api_key), inner.calls


async def _ok(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


def _series(front: DirectRoutesFront) -> set[tuple[str, tuple]]:
    """Every (sample name, labels) the front's request metrics hold."""
    out = set()
    for metrics in front.metrics.values():
        for metric in (metrics.total, metrics.duration):
            for family in metric.collect():
                out.update((s.name, tuple(sorted(s.labels.items()))) for s in family.samples)
    return out


def _random_path(rng: random.Random) -> str:
    return "/" + "".join(rng.choices(string.ascii_letters + "%\x00\n", k=200))


@pytest.mark.parametrize("headers", [[], [(b"authorization", b"Bearer " + KEY.encode())]])
def test_refused_requests_on_random_paths_add_no_series(headers):
    front, inner_calls = _front()
    rng = random.Random(0)
    for _ in range(20):
        _call(front, _scope(_random_path(rng), "GET", headers))
    before = _series(front)
    statuses = set()
    for _ in range(500):
        sent = _call(front, _scope(_random_path(rng), rng.choice(["GET", "POST"]), headers))
        statuses.add(sent[0]["status"])
        assert "error" in json.loads(sent[1]["body"])
    assert statuses == ({404} if headers else {401})
    assert _series(front) == before
    assert set(front.metrics) == {OTHER}
    assert inner_calls == []  # nothing reached BentoML's layers


def test_unknown_path_404_and_nul_path_never_become_labels():
    front, inner_calls = _front(api_key=None)
    sent = _call(front, _scope("/metadata\x00", "GET"))
    body = json.loads(sent[1]["body"])
    assert sent[0]["status"] == 404 and body["error"]["code"] == "not_found"
    assert "\x00" not in body["error"]["message"]
    assert all("\x00" not in str(labels) for _, labels in _series(front))
    assert inner_calls == []
    assert _call(front, _scope("/metadata", "GET"))[0]["status"] == 200
    assert inner_calls == ["/metadata"]


def test_wrong_method_on_open_and_mounted_paths_is_405_error_object():
    front, inner_calls = _front()
    for path, allow in (("/readyz", b"GET, HEAD"), ("/classify", b"POST")):
        headers = [(b"authorization", b"Bearer " + KEY.encode())]
        sent = _call(front, _scope(path, "DELETE", headers))
        assert sent[0]["status"] == 405, path
        assert dict(sent[0]["headers"])[b"allow"] == allow
        assert json.loads(sent[1]["body"])["error"]["code"] == "method_not_allowed"
    assert inner_calls == []
    assert set(front.metrics) == {"/readyz", "/classify"}


@pytest.mark.parametrize("value", [b"bearer k3y", b"BEARER k3y", b"Bearer  k3y"])
def test_bearer_scheme_is_case_insensitive(value):
    front, _ = _front()
    assert _call(front, _scope(headers=[(b"authorization", value)]))[0]["status"] == 200


@pytest.mark.parametrize("value", [b"Bearer k3", b"Basic k3y", b"k3y", b"Bearerk3y", b""])
def test_wrong_credentials_are_refused(value):
    middleware = ApiKeyMiddleware(None, api_key=KEY)
    assert not middleware.allowed(_scope(headers=[(b"authorization", value)]))


def test_websockets_are_refused_before_the_app():
    front, inner_calls = _front(api_key=None)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
    asyncio.run(front({"type": "websocket", "path": "/x" * 100, "headers": []}, None, send))
    assert sent == [{"type": "websocket.close", "code": 1008}] and inner_calls == []


def test_static_files_are_known_only_under_their_canonical_path(tmp_path):
    (tmp_path / "app.js").write_text("1")
    table = RouteTable([Mount("/static", app=StaticFiles(directory=tmp_path))])

    def resolve(path: str, method: str = "GET"):
        return table.resolve({"type": "http", "method": method, "path": path,
                              "root_path": "", "headers": []})
    assert resolve("/static/app.js").label == "/static/app.js"
    for path in ("/static/x/../app.js", "/static//app.js", "/static/nope.js", "/static/"):
        assert resolve(path).label == OTHER, path
    assert resolve("/static/app.js", "POST").status == 405


def test_bentoml_app_is_starlette_with_routes():
    # Pins what RouteTable relies on: BentoML's worker app is a Starlette app whose
    # routes (Starlette.routes) include its own endpoints and the mounted app.
    import bentoml

    routes = DirectRoutesApp([Route("/classify", _Echo(), methods=["POST"])],
                             direct=["/classify"])

    @bentoml.service
    @bentoml.asgi_app(routes, path="/")
    class Toy:
        pass

    app = Toy.to_asgi()
    assert isinstance(app, Starlette)
    table = RouteTable(app.routes)
    for path, label in (("/classify", "/classify"), ("/readyz", "/readyz"),
                        ("/metrics", "/metrics"), ("/nowhere", OTHER)):
        scope = {"type": "http", "method": "POST" if path == "/classify" else "GET",
                 "path": path, "root_path": "", "headers": []}
        assert table.label(scope) == label


# --- client text in log lines ---------------------------------------------------------


def test_for_log_escapes_and_cuts():
    assert for_log("a\nb\x00c\u2028") == "a\\nb\\x00c\\u2028"
    long = for_log("x" * 10_000)
    assert len(long) < 250 and long.endswith("(10000 chars)")


def test_unknown_field_names_are_logged_escaped_and_bounded(caplog):
    forged = "x\n2026-01-01 ERROR forged line"
    extra = {forged: 1, **{f"k{i}" * 50: 1 for i in range(20_000)}}
    request = CompletionRequest.model_validate({"prompt": "hi", **extra})
    with caplog.at_level(logging.WARNING, logger="serve.api.openai_api"):
        request.check("/v1/completions")
    [record] = [r for r in caplog.records if "unknown fields" in r.getMessage()]
    line = record.getMessage()
    assert "\n" not in line and len(line) < 2000
    assert line.endswith(f"(+{len(extra) - 16} more)")
    assert names_for_log(["b", "a"], 2) == "a, b"


# --- connection guards ------------------------------------------------------------------


@pytest.fixture
def uvicorn_server():
    """An in-process uvicorn server with the guarded h11 protocol (short timeouts)."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    limits = ConnectionLimits(header_timeout_s=0.5, keep_alive_timeout_s=0.5,
                              max_connections=8)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(Starlette(routes=[Route("/readyz", _ok)]), log_config=None,
                            http=guarded_protocol(H11Protocol, limits), lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(timeout=10)


def _connect(port: int, data: bytes = b"") -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        conn.sendall(data)
    return conn


def _read_all(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (10 s at most)."""
    out = b""
    while chunk := conn.recv(65536):
        out += chunk
    return out


def test_partial_headers_get_408_and_are_closed(uvicorn_server):
    conn = _connect(uvicorn_server, b"GET /readyz HTTP/1.1\r\nHost: x\r\n")
    for _ in range(3):  # a byte now and then does not extend the deadline
        time.sleep(0.2)
        conn.sendall(b"X")
    answer = _read_all(conn)
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in answer


def test_silent_and_idle_connections_are_closed(uvicorn_server):
    silent = _connect(uvicorn_server)
    assert _read_all(silent) == b""
    idle = _connect(uvicorn_server, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _read_all(idle).startswith(b"HTTP/1.1 200 ")  # then closed: keep-alive over


def test_connections_past_the_cap_get_503(uvicorn_server):
    held = [_connect(uvicorn_server) for _ in range(8)]
    extra = _connect(uvicorn_server, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = _read_all(extra)
    assert answer.startswith(b"HTTP/1.1 503 ") and b'"server_overloaded"' in answer
    for conn in held:
        conn.close()


def test_install_makes_uvicorns_auto_protocol_the_guarded_one(monkeypatch):
    # Pins the uvicorn and BentoML behaviours install() relies on: uvicorn resolves its
    # "auto" HTTP protocol through HTTP_PROTOCOLS, and BentoML's worker leaves `http`
    # at its default.
    import uvicorn
    from uvicorn import config as uvicorn_config
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    monkeypatch.setitem(uvicorn_config.HTTP_PROTOCOLS, "auto",
                        uvicorn_config.HTTP_PROTOCOLS["auto"])
    cls = install(ConnectionLimits())
    config = uvicorn.Config(Starlette(), log_config=None)
    config.load()
    assert config.http_protocol_class is cls and issubclass(cls, AutoHTTPProtocol)
    from _bentoml_impl.worker import service as worker
    source = inspect.getsource(worker.main.callback)
    assert "uvicorn.Config(" in source and "http=" not in source


# --- one metrics store per server ------------------------------------------------------


def test_each_server_gets_its_own_bentoml_home(tmp_path):
    homes = [server_home(3000), server_home(3000)]
    try:
        assert homes[0] != homes[1] and all(h.is_dir() for h in homes)
        env = server_env(ServeSettings(), {"BENTOML_HOME": str(tmp_path)}, homes[0])
        assert env["BENTOML_HOME"] == str(homes[0])
    finally:
        for home in homes:
            home.rmdir()
    # BentoML puts the multiprocess metrics folder it empties at start under BENTOML_HOME
    from bentoml._internal.configuration.containers import BentoMLContainer
    assert Path(BentoMLContainer.prometheus_multiproc_dir.get()).parent == Path(
        BentoMLContainer.bentoml_home.get())


def test_refused_paths_are_escaped_in_the_access_log(caplog):
    routes = DirectRoutesApp([Route("/classify", _Echo(), methods=["POST"])],
                             direct=["/classify"])
    front = DirectRoutesFront(_Inner(routes), routes, None, access_log=True)
    scope = {**_scope("/a\n2026 ERROR forged" + "x" * 5000, "GET"), "scheme": "http"}
    with caplog.at_level(logging.INFO, logger="bentoml.access"):
        assert _call(front, scope)[0]["status"] == 404
    [line] = [r.getMessage() for r in caplog.records if r.name == "bentoml.access"]
    assert "\n" not in line and "\\n2026 ERROR forged" in line and len(line) < 400
