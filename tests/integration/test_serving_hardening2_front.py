"""Serving hardening II, the front (issue 20), live on loopback with the tiny classifier:
refused requests on made-up paths do not grow ``/metrics`` or the worker's memory, two
servers on one host keep separate ``/metrics``, half-open connections are closed by the
header deadline while a probe still answers.

``MODELPRESS_FLOOD_REQUESTS`` sets the flood's size (default 1,000; the figure in
docs/benchmarks.md is a 10,000 run).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import resource
import selectors
import socket
import string
import time

import httpx
import psutil
import pytest

from serve.app.launcher import ServerHandle, start_server
from tests.integration.test_service import _build

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FLOOD = int(os.environ.get("MODELPRESS_FLOOD_REQUESTS", "1000"))


@pytest.fixture(scope="module")
def classifier(tiny, tmp_path_factory):
    return _build(tiny, tmp_path_factory, "front-cls", "text-classification", "bert",
                  "bert-lora")


@pytest.fixture(scope="module")
def keyed_server(classifier, bentoml_env):
    handle = start_server(classifier, env=bentoml_env, api_key=KEY, access_log=False)
    yield handle
    handle.stop()


def _worker_rss(handle: ServerHandle) -> int:
    """RSS of the server's worker process(es), in bytes."""
    workers = [p for p in psutil.Process(handle.pid).children(recursive=True)
               if "_bentoml_impl.worker.service" in " ".join(p.cmdline())]
    assert workers, "no worker process found"
    return sum(p.memory_info().rss for p in workers)


async def _flood(url: str, n: int, seed: int) -> dict[int, int]:
    """``n`` requests on distinct random 1,000-character paths, half with the key;
    returns the count per status."""
    rng = random.Random(seed)
    counts: dict[int, int] = {}
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        async def one(i: int) -> None:
            path = "/x" + "".join(rng.choices(string.ascii_letters, k=998))
            r = await client.get(path, headers=AUTH if i % 2 else None)
            counts[r.status_code] = counts.get(r.status_code, 0) + 1
        for start in range(0, n, 64):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + 64))))
    return counts


def test_refused_flood_leaves_metrics_and_worker_memory_flat(keyed_server):
    url = keyed_server.url
    assert httpx.get(f"{url}/metadata", headers={"Authorization": f"bearer {KEY}"}
                     ).status_code == 200  # the scheme is case-insensitive
    r = httpx.post(f"{url}/readyz")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert httpx.get(f"{url}/metadata%00", headers=AUTH).status_code == 404
    asyncio.run(_flood(url, 200, seed=1))  # warm-up: every refusal's series exists
    metrics_before = len(httpx.get(f"{url}/metrics").content)
    rss_before = _worker_rss(keyed_server)
    counts = asyncio.run(_flood(url, FLOOD, seed=2))
    text = httpx.get(f"{url}/metrics").text
    metrics_after, rss_after = len(text), _worker_rss(keyed_server)
    log.info("%d refused requests: /metrics %d -> %d bytes, worker RSS %.1f -> %.1f MiB",
             FLOOD, metrics_before, metrics_after, rss_before / 2**20, rss_after / 2**20)
    assert counts == {401: FLOOD // 2 + FLOOD % 2, 404: FLOOD // 2}
    assert metrics_after < metrics_before * 1.01
    assert rss_after < rss_before * 1.01
    assert "\x00" not in text and "/x" not in text
    endpoints = set(re.findall(r'endpoint="([^"]*)"', text))
    assert "other" in endpoints and len(endpoints) < 20, endpoints


def _classify_count(url: str) -> float:
    """``bentoml_service_request_total`` of ``/classify`` answered 200."""
    text = httpx.get(f"{url}/metrics").text
    found = re.search(r'^bentoml_service_request_total\{[^}]*endpoint="/classify"[^}]*'
                      r'http_response_code="200"[^}]*\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_two_servers_keep_separate_metrics(classifier, bentoml_env):
    body = {"texts": ["a good story"]}
    with start_server(classifier, env=bentoml_env, access_log=False) as first:
        for _ in range(3):
            assert httpx.post(f"{first.url}/classify", json=body).status_code == 200
        with start_server(classifier, env=bentoml_env, access_log=False) as second:
            assert httpx.post(f"{second.url}/classify", json=body).status_code == 200
            assert _classify_count(first.url) == 3.0
            assert _classify_count(second.url) == 1.0
            assert "modelpress" in str(second.home) and second.home != first.home


def _half_open(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    sock.setblocking(False)
    return sock


def test_half_open_connections_are_closed_and_probes_answer(classifier, bentoml_env):
    n, header_timeout = 500, 3.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 200:
        if hard != resource.RLIM_INFINITY and hard < n + 200:
            pytest.skip(f"open-file limit {hard} < {n + 200}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 200, hard))
    with start_server(classifier, env=bentoml_env, access_log=False,
                      header_timeout_s=header_timeout) as server:
        opened = time.monotonic()
        socks = [_half_open(server.port) for _ in range(n)]
        probes = []
        for _ in range(3):
            start = time.monotonic()
            assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
            probes.append(time.monotonic() - start)
        closed = _wait_closed(socks, deadline=opened + header_timeout + 20)
        last = max(closed.values(), default=opened) - opened
        log.info("%d half-open connections: %d closed, last %.1f s after the first "
                 "opened; probes %s s", n, len(closed), last,
                 ", ".join(f"{p:.3f}" for p in probes))
        assert len(closed) == n
        assert last < header_timeout + 10
        assert min(probes) < 1.0
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def _wait_closed(socks: list[socket.socket], deadline: float) -> dict[int, float]:
    """Read each socket until the server closes it; returns when each closed."""
    closed: dict[int, float] = {}
    with selectors.DefaultSelector() as sel:
        for i, sock in enumerate(socks):
            sel.register(sock, selectors.EVENT_READ, i)
        while len(closed) < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                try:
                    data = key.fileobj.recv(65536)
                except ConnectionError:
                    data = b""
                if not data:
                    closed[key.data] = time.monotonic()
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
    for i, sock in enumerate(socks):
        if i not in closed:
            sock.close()
    return closed
