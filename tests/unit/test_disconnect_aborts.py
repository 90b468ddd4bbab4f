"""Issue 20 #6, in process: a client that disconnects before its response aborts its
request in the engine on every generation route, streamed or not, waiting for admission
or running; the sequence's rows are freed and ``request_aborted_total`` counts it.

The engine's LM is gated: its decode waits until the test opens the gate, so which
request runs and which wait is fixed, whatever the machine's speed."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from prometheus_client import REGISTRY

from bench.serve_overheads import inprocess_app
from serve.api.schemas import Limits
from serve.engine.core import Engine, EngineConfig
from serve.runtime.loader import load_runtime
from tests.unit.variant_fixtures import build_lm_variants

PROMPT = "the movie is"
CHAT = [{"role": "user", "content": PROMPT}]
WAITING = [("/generate", {"prompts": [PROMPT], "max_new_tokens": 100, "stream": True}),
           ("/generate", {"prompts": [PROMPT], "max_new_tokens": 100}),
           ("/v1/completions", {"prompt": PROMPT, "max_tokens": 100}),
           ("/v1/completions", {"prompt": PROMPT, "max_tokens": 100, "stream": True}),
           ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 100}),
           ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 100, "stream": True})]


class _GatedLM:
    """A real step LM whose decodes wait for ``gate``; records the freed slots."""

    def __init__(self, lm) -> None:
        self.lm, self.vocab_size, self.max_length = lm, lm.vocab_size, lm.max_length
        self.gate, self.decoding = threading.Event(), threading.Event()
        self.freed: list[int] = []

    def prefill(self, slot, ids):
        return self.lm.prefill(slot, ids)

    def decode(self, slots, tokens):
        self.decoding.set()
        self.gate.wait()
        return self.lm.decode(slots, tokens)

    def free(self, slot):
        self.freed.append(slot)
        self.lm.free(slot)

    def reserve(self, rows, length):
        self.lm.reserve(rows, length)


@pytest.fixture(scope="module")
def runtime(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("disconnect")
    out = build_lm_variants(tiny, root, [
        "{name: genai-fp32, kind: export, format: onnx-genai, precision: fp32}"])
    return load_runtime(out / "genai-fp32")


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(f"modelpress:{name}") or 0.0


async def _call(app, path: str, body: dict, gone: asyncio.Event) -> list[dict]:
    """One request on the raw ASGI app; its client disconnects once ``gone`` is set."""
    first = [True]

    async def receive() -> dict:
        if first[0]:
            first[0] = False
            return {"type": "http.request", "body": json.dumps(body).encode(),
                    "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "server": ("t", 80), "client": ("c", 1),
             "headers": [(b"content-type", b"application/json")]}
    await app(scope, receive, send)
    return sent


async def _until(check, what: str) -> None:
    deadline = time.monotonic() + 60  # a bound for a broken build, not a measurement
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


def test_disconnect_aborts_waiting_and_running_requests_on_every_route(runtime):
    app, service = inprocess_app(runtime, Limits())
    service.engine.close()
    lm = _GatedLM(runtime.step_lm())
    service.engine = engine = Engine(lm, set(), EngineConfig(max_running=1))
    aborted, generated = _sample("request_aborted_total"), _sample("generation_tokens_total")

    async def main() -> list[list[dict]]:
        gone = asyncio.Event()
        running = asyncio.ensure_future(_call(app, "/generate", {
            "prompts": [PROMPT], "max_new_tokens": 100}, gone))
        await _until(lm.decoding.is_set, "the first request never ran")
        waiting = [asyncio.ensure_future(_call(app, path, body, gone))
                   for path, body in WAITING]
        await _until(lambda: _sample("num_requests_waiting") == len(WAITING),
                     "the other requests never queued")
        gone.set()  # every client goes: one running, six waiting for admission
        calls = [running, *waiting]
        done, _ = await asyncio.wait(calls, timeout=30)  # a bound for a broken build
        lm.gate.set()
        assert len(done) == len(calls), "a handler went on after its client had gone"
        answers = [c.result() for c in calls]
        await _until(lambda: _sample("request_aborted_total") - aborted == 1 + len(WAITING),
                     "the engine did not count the aborts")
        return answers

    try:
        answers = asyncio.run(main())
        assert _sample("num_requests_running") == 0 and _sample("num_requests_waiting") == 0
        # the running one was freed after at most the step under way; none other ran
        assert lm.freed == [0]
        assert _sample("generation_tokens_total") - generated <= 2
    finally:
        lm.gate.set()
        engine.close()
    # nobody was listening: no response was started with a 200
    assert all(a[0]["status"] == 499 for a in answers)


def test_a_message_other_than_disconnect_ends_the_watch_not_the_request():
    from starlette.requests import Request
    from starlette.responses import Response

    from serve.api.http_api import until_disconnect

    calls = []

    async def receive() -> dict:  # an ASGI layer that answers at once, again and again
        calls.append(1)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def handler(request) -> Response:
        await asyncio.sleep(0.01)
        return Response("done")

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    response = asyncio.run(until_disconnect(handler, request))
    assert response is not None and response.body == b"done"
    assert len(calls) == 1  # no busy loop on receive
