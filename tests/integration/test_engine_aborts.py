"""Issue 20 #6 on a live server (tiny LM): clients that give up before their answer abort
their requests in the engine on every generation route, streamed or not, waiting for
admission or running. ``/metrics`` counts the aborts, and once they are counted nothing
generates any more: the next request's tokens are the only ones the counter gains."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from serve.app.launcher import start_server
from tests.integration.test_engine_http import _metrics
from tests.unit.variant_fixtures import build_lm_variants

pytestmark = pytest.mark.integration

PROMPT = "the movie is"  # the tiny LM's greedy answer runs the full 110 tokens (no EOS)
CHAT = [{"role": "user", "content": PROMPT}]
ROUTES = [("/generate", {"prompts": [PROMPT], "max_new_tokens": 110}),
          ("/generate", {"prompts": [PROMPT], "max_new_tokens": 110, "stream": True}),
          ("/v1/completions", {"prompt": PROMPT, "max_tokens": 110, "temperature": 0}),
          ("/v1/completions", {"prompt": PROMPT, "max_tokens": 110, "temperature": 0,
                               "stream": True}),
          ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 110, "temperature": 0}),
          ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 110, "temperature": 0,
                                    "stream": True})]
REQUESTS = ROUTES * 3  # 18 requests; one runs at a time (max_running=1)


@pytest.fixture(scope="module")
def merge(tiny, tmp_path_factory):
    out = build_lm_variants(tiny, tmp_path_factory.mktemp("engine-aborts"), [
        "{name: genai-fp32, kind: export, format: onnx-genai, precision: fp32}"])
    return out / "merge"  # the torch LM: the slowest steps, the longest queue


async def _request(url: str, path: str, body: dict) -> None:
    """One request on its own connection; cancelled, the connection is closed."""
    async with httpx.AsyncClient(timeout=120) as client:
        if body.get("stream"):
            async with client.stream("POST", url + path, json=body) as r:
                async for _ in r.aiter_bytes():
                    pass
        else:
            await client.post(url + path, json=body)


def _until(url: str, check, what: str) -> dict[str, float]:
    """``/metrics`` once ``check`` holds for it."""
    deadline = time.monotonic() + 60  # a bound for a broken build, not a measurement
    while not check(m := _metrics(url)):
        assert time.monotonic() < deadline, f"{what}: {m}"
        time.sleep(0.02)
    return m


def test_clients_that_give_up_abort_on_every_route(merge, bentoml_env):
    with start_server(merge, env=bentoml_env, access_log=False, max_running=1,
                      max_new_tokens=110) as server:
        before = _metrics(server.url)

        def delta(m: dict[str, float], name: str) -> float:
            return m.get(f"modelpress:{name}", 0.0) - before.get(f"modelpress:{name}", 0.0)

        async def give_up() -> float:
            tasks = [asyncio.ensure_future(_request(server.url, path, body))
                     for path, body in REQUESTS]
            # the clients give up once every request is in the engine (a client that goes
            # before the server submitted its request leaves nothing to abort or count),
            # most of them still waiting for admission
            m = await asyncio.to_thread(_until, server.url, lambda m: m.get(
                "modelpress:num_requests_waiting", 0) + m.get(
                "modelpress:num_requests_running", 0) + delta(m, "request_success_total")
                + delta(m, "request_aborted_total") == len(REQUESTS)
                and m["modelpress:num_requests_waiting"] >= len(REQUESTS) // 2, "no queue")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return m["modelpress:num_requests_waiting"]

        waiting = asyncio.run(give_up())
        # every request ends: aborted (client gone) or finished before its client went
        settled = _until(server.url, lambda m: delta(m, "request_aborted_total")
                         + delta(m, "request_success_total") == len(REQUESTS)
                         and m["modelpress:num_requests_running"] == 0
                         and m["modelpress:num_requests_waiting"] == 0, "not settled")
        ok = httpx.post(f"{server.url}/generate", json={"prompts": [PROMPT],
                                                        "max_new_tokens": 5}, timeout=60)
        after = _metrics(server.url)
    assert ok.status_code == 200
    # those still queued when their clients went never ran: aborted, not completed
    assert delta(settled, "request_aborted_total") >= waiting - 1 >= len(REQUESTS) // 2 - 1
    # nothing generated for the gone clients after the aborts were counted
    assert (after["modelpress:generation_tokens_total"]
            - settled["modelpress:generation_tokens_total"]
            == ok.json()["results"][0]["completion_tokens"] == 5)
    assert delta(settled, "generation_tokens_total") < len(REQUESTS) * 110 / 2
