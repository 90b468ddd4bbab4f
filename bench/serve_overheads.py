"""Two costs of the LLM serving path, measured on a real artifact.

``tokenize``: the real ``/generate`` and ``/v1/completions`` routes in process (no
server, the engine running the artifact) with a long prompt; tokenizer calls on the
prompt per request, tokenizer seconds per request, and seconds per request.
``rss``: ``modelpress serve`` the artifact, send a few ``/generate`` requests, then read
the worker's resident memory (its weights, once or twice).

    python -m bench.serve_overheads tokenize build/bench/artifacts-smollm2/genai-int4
    python -m bench.serve_overheads rss build/bench/artifacts-smollm2/genai-int4
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from serve.api.schemas import Limits
from serve.runtime.loader import load_runtime

PARAGRAPH = ("The lighthouse keeper walked along the shore at dawn, counting the ships that "
             "had passed in the night and writing their names in a worn notebook. ")


@dataclass
class CountingTokenizer:
    """A runtime's tokenizer that records every text it is called on (and the time).

    Attributes:
        inner: The tokenizer wrapped.
        calls: The texts of every call, in order.
        seconds: Time spent in calls.
    """

    inner: Any
    calls: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(text)
        start = time.perf_counter()
        try:
            return self.inner(text, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copying)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)


class InProcessService:
    """What :class:`serve.api.backend.Backend` needs from the service, over one runtime:
    its lock, the engine over ``runtime.step_lm()`` and an event-loop detokenizer."""

    def __init__(self, runtime: Any) -> None:
        from serve.engine.core import Engine, EngineConfig

        self.runtime = runtime
        self.lock = threading.Lock()
        self.detokenizer = copy.deepcopy(runtime.tokenizer)
        self.engine = Engine(runtime.step_lm(), set(runtime.eos_ids), EngineConfig())

    def metadata(self) -> dict[str, Any]:
        """Not served here."""
        return {}


def inprocess_app(runtime: Any, limits: Limits) -> tuple[Any, InProcessService]:
    """The generation routes (``/generate``, ``/v1/*``) as a Starlette app over
    ``runtime``; close the service's engine when done."""
    from starlette.applications import Starlette

    from serve.api.backend import Backend
    from serve.api.http_api import build_routes
    from serve.api.openai_api import build_openai_routes

    service = InProcessService(runtime)
    backend = Backend(service, limits, workers=1)  # type: ignore[arg-type]
    routes = [*build_routes(lambda: backend), *build_openai_routes(lambda: backend)]
    return Starlette(routes=routes), service


async def _post_all(app: Any, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                 timeout=600) as client:
        return [await client.post(path, json=body) for path, body in requests]


def measure_tokenize(artifact: str, words: int, rounds: int, max_input_tokens: int) -> dict:
    """Tokenizer calls and seconds per request for a long prompt on both routes."""
    runtime = load_runtime(artifact)
    prompt = (PARAGRAPH * (words // len(PARAGRAPH.split()) + 1))[: words * 6]
    app, service = inprocess_app(runtime, Limits(max_input_tokens=max_input_tokens,
                                                 max_text_chars=len(prompt) + 1))
    counter = CountingTokenizer(runtime.tokenizer)
    runtime.tokenizer = counter
    try:
        out: dict[str, Any] = {"prompt_chars": len(prompt),
                               "prompt_tokens": len(counter.inner(prompt)["input_ids"])}
        for path, body in [("/generate", {"prompts": [prompt], "max_new_tokens": 1}),
                           ("/v1/completions", {"prompt": prompt, "max_tokens": 1})]:
            asyncio.run(_post_all(app, [(path, body)]))  # warm-up
            counter.calls.clear()
            counter.seconds = 0.0
            start = time.perf_counter()
            answers = asyncio.run(_post_all(app, [(path, body)] * rounds))
            wall = time.perf_counter() - start
            assert all(a.status_code == 200 for a in answers), answers[0].text
            out[path] = {"tokenizer_calls_per_request": len(counter.calls) / rounds,
                         "tokenizer_ms_per_request": round(1e3 * counter.seconds / rounds, 3),
                         "ms_per_request": round(1e3 * wall / rounds, 2)}
        return out
    finally:
        service.engine.close()


def measure_rss(artifact: str, requests: int) -> dict:
    """The serving worker's RSS after a few ``/generate`` requests."""
    import psutil

    from serve.app.launcher import start_server

    with start_server(artifact, access_log=False) as server:
        for i in range(requests):
            r = httpx.post(f"{server.url}/generate", timeout=120, json={
                "prompts": [f"{PARAGRAPH} ({i})"], "max_new_tokens": 16})
            r.raise_for_status()
        procs = [psutil.Process(server.pid), *psutil.Process(server.pid).children(True)]
        rss = {p.pid: p.memory_info().rss for p in procs if p.is_running()}
    worker = max(rss.values())
    return {"worker_rss_mib": round(worker / 2**20, 1),
            "all_rss_mib": {str(k): round(v / 2**20, 1) for k, v in rss.items()}}


def main() -> None:
    """CLI entry point (prints JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["tokenize", "rss"])
    parser.add_argument("artifact")
    parser.add_argument("--words", type=int, default=2500, help="prompt length in words")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-input-tokens", type=int, default=4096)
    args = parser.parse_args()
    if args.what == "tokenize":
        out = measure_tokenize(args.artifact, args.words, args.rounds, args.max_input_tokens)
    else:
        out = measure_rss(args.artifact, args.rounds)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
