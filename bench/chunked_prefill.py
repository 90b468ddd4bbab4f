"""Chunked prefill over HTTP: a long prompt arrives while streams decode.

Per ``--budgets`` × ``--gap-ratios`` pair, starts ``modelpress serve
--max-num-batched-tokens B --max-gap-ratio R`` on one artifact (stopped by PID):
``--streams`` greedy completions of ``--new-tokens`` decode; once each has streamed
``--lead`` chunks, one ``--prompt-tokens`` prompt arrives. Reports the streams' longest
gap between two chunks (all of them, and those ending after the long prompt arrived)
against their median gap, and the long prompt's TTFT. Also (``--overhead``) served
1-stream tok/s against the in-process engine (``bench.engine_speed``'s measure) on the
same artifact in the same run.

    python -m bench.chunked_prefill build/bench/artifacts-smollm2/genai-int4 \\
        --budgets 2048 --gap-ratios 2 0 --overhead
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from tokenizers import Tokenizer

from bench.engine_speed import PROMPT
from bench.sse_client import start, stream

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
STORY = "Write a long, detailed story about {}, with many characters and places."
TOPICS = ["a lighthouse keeper", "a baker", "a river pilot", "an owl", "a clockmaker",
          "a tea merchant", "a violinist", "a mapmaker"]


def long_prompt(artifact: Path, tokens: int) -> str:
    """A prompt of about ``tokens`` tokens (by the artifact's tokenizer)."""
    tok = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    words = ("the keeper of the lighthouse wrote a long letter to the sea about ships, "
             "storms and the lamps of distant harbours. ") * (tokens // 8)
    ids = tok.encode(words).ids[:tokens]
    return tok.decode(ids)


async def interference(url: str, streams: int, new_tokens: int, lead: int,
                       prompt: str) -> dict:
    """``streams`` decode; the long prompt arrives once each has ``lead`` chunks."""
    async with httpx.AsyncClient(timeout=600) as client:
        await stream(client, url, COMPLETIONS, {"prompt": "Hello", "max_tokens": 4})
        bodies = [{"messages": [{"role": "user", "content": STORY.format(
            TOPICS[i % len(TOPICS)])}], "max_tokens": new_tokens} for i in range(streams)]
        progress = [0] * streams
        tasks = [asyncio.ensure_future(_tracked(client, url, b, progress, i))
                 for i, b in enumerate(bodies)]
        while min(progress) < lead and not all(t.done() for t in tasks):
            await asyncio.sleep(0.01)
        arrived = time.monotonic()
        long = await stream(client, url, COMPLETIONS, {"prompt": prompt, "max_tokens": 4})
        results = await asyncio.gather(*tasks)
    gaps = np.concatenate([np.diff(r["times"]) for r in results])
    if not gaps.size:
        raise RuntimeError(f"the streams sent {[len(r['times']) for r in results]} chunks")
    # gaps that end after the long prompt arrived: the ones it can cause (a stream's first
    # gaps also hold the other streams' own admission, before it arrives)
    after = [g for r in results for t1, g in zip(r["times"][1:], np.diff(r["times"]),
                                                  strict=True) if t1 >= arrived]
    median = float(np.median(gaps))
    return {"stream_chunks": [len(r["times"]) for r in results],
            "median_gap_s": round(median, 4),
            "max_gap_s": round(float(gaps.max()), 4),
            "max_gap_over_median": round(float(gaps.max()) / median, 2),
            "max_gap_after_arrival_s": round(float(max(after, default=0.0)), 4),
            "max_gap_after_arrival_over_median": round(max(after, default=0.0) / median, 2),
            "long_ttft_s": round(long["ttft_s"], 3)}


async def _tracked(client: httpx.AsyncClient, url: str, body: dict, progress: list[int],
                   index: int) -> dict:
    """A streamed request whose chunk count shows in ``progress[index]`` while it runs."""
    body = {"temperature": 0, **body, "stream": True}
    times: list[float] = []
    async with client.stream("POST", url + CHAT, json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                times.append(time.monotonic())
                progress[index] = len(times)
    return {"times": times}


async def served_one_stream(url: str, tokens: int) -> dict:
    """One greedy chat stream of ``tokens`` over HTTP: tokens/wall (as engine_speed counts)."""
    messages = [{"role": "user", "content": PROMPT}]
    async with httpx.AsyncClient(timeout=600) as client:
        await stream(client, url, CHAT, {"messages": messages, "max_tokens": 8})
        body = {"messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        start, count = time.monotonic(), 0
        async with client.stream("POST", url + CHAT, json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        count = usage["completion_tokens"]
        wall = time.monotonic() - start
    return {"tokens": count, "seconds": round(wall, 3), "tok_per_s": round(count / wall, 1)}


def inprocess_one_stream(artifact: Path, tokens: int) -> dict:
    """``bench.engine_speed``'s 1-stream measure, EOS on (as the server), on the same chat
    prompt's token ids."""
    from bench.engine_speed import measure
    from serve.api.chat import render
    from serve.engine.core import Engine, EngineConfig
    from serve.runtime.loader import load_runtime

    runtime = load_runtime(artifact)
    text = render(runtime.tokenizer, [{"role": "user", "content": PROMPT}])
    ids = list(runtime.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def run() -> dict:
        engine = Engine(runtime.step_lm(), set(runtime.eos_ids), EngineConfig())
        try:
            await measure(engine, ids, 1, 8)
            return await measure(engine, ids, 1, tokens)
        finally:
            engine.close()

    return asyncio.run(run())


def main() -> None:
    """CLI entry point: one JSON object."""
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048])
    parser.add_argument("--gap-ratios", type=float, nargs="+", default=[2.0, 0.0],
                        help="--max-gap-ratio values (0: chunks fill the budget)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--lead", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    parser.add_argument("--overhead", action="store_true")
    args = parser.parse_args()
    prompt = long_prompt(args.artifact, args.prompt_tokens)
    report: dict = {"artifact": str(args.artifact), "streams": args.streams,
                    "prompt_tokens": args.prompt_tokens, "runs": {}}
    pairs = [(b, r) for b in args.budgets for r in args.gap_ratios]
    with tempfile.TemporaryDirectory() as work:
        for i, (budget, ratio) in enumerate(pairs):
            name = f"budget {budget}, gap ratio {ratio:g}"
            server = start(args.artifact, Path(work), f"b{budget}-r{ratio:g}",
                           ["--max-num-batched-tokens", str(budget),
                            "--max-gap-ratio", f"{ratio:g}"])
            try:
                report["runs"][name] = asyncio.run(interference(
                    server.url, args.streams, args.new_tokens, args.lead, prompt))
                if args.overhead and i == 0:
                    report["served_1_stream"] = asyncio.run(served_one_stream(
                        server.url, args.new_tokens))
            finally:
                server.stop()
    if args.overhead:
        report["inprocess_1_stream"] = inprocess_one_stream(args.artifact, args.new_tokens)
        report["served_over_inprocess"] = round(report["served_1_stream"]["tok_per_s"]
                                                / report["inprocess_1_stream"]["tok_per_s"], 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
