"""Prefix caching over HTTP: chat requests sharing a long system prompt, cache on vs off.

Starts ``modelpress serve`` twice on one artifact (default, then ``--no-prefix-cache``),
stops each by PID. Per server: one warm-up request with the system prompt, then
``--streams`` concurrent clients each send ``--rounds`` chat requests (the shared system
prompt, a distinct question each), greedy. Reports TTFT p50/p90 per mode, their ratio,
and how many answers are identical with and without the cache (all of them is only
guaranteed with ``--serve-arg=--batch-invariant``: otherwise a stream that decodes alone
for a while in one run and beside others in the other can flip a near-tie).

    python -m bench.prefix_cache build/bench/artifacts-smollm2/genai-int4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
from pathlib import Path

import httpx
import numpy as np
from tokenizers import Tokenizer

from bench.sse_client import start, stream

CHAT = "/v1/chat/completions"
TOPICS = ["lighthouses", "tides", "bread", "glaciers", "owls", "trains", "copper", "tea",
          "volcanoes", "bees", "clocks", "maps", "salt", "kites", "rivers", "violins"]


def system_prompt(artifact: Path, tokens: int) -> str:
    """A system prompt of about ``tokens`` tokens (by the artifact's tokenizer)."""
    tok = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    sentences, text = 0, ""
    while len(tok.encode(text).ids) < tokens:
        sentences += 1
        text += (f"Rule {sentences}: answer questions about {TOPICS[sentences % 16]} "
                 f"briefly, politely and with facts numbered {sentences * 7 % 97}. ")
    return text


async def _session(url: str, system: str, questions: list[str], max_tokens: int) -> list:
    async with httpx.AsyncClient(timeout=600) as client:
        out = []
        for q in questions:
            body = {"messages": [{"role": "system", "content": system},
                                 {"role": "user", "content": q}], "max_tokens": max_tokens}
            out.append((q, await stream(client, url, CHAT, body)))
        return out


async def run_mode(url: str, system: str, streams: int, rounds: int, max_tokens: int) -> dict:
    """Warm up, then ``streams`` clients × ``rounds`` requests; TTFTs and answers."""
    await _session(url, system, ["Say hello."], 4)
    questions = [[f"Question {s}.{r}: what do you know about {TOPICS[(s + r) % 16]}?"
                  for r in range(rounds)] for s in range(streams)]
    sessions = await asyncio.gather(*(_session(url, system, qs, max_tokens)
                                      for qs in questions))
    results = [item for session in sessions for item in session]
    ttfts = [r["ttft_s"] for _, r in results]
    return {"ttft_p50_s": round(float(np.median(ttfts)), 3),
            "ttft_p90_s": round(float(np.percentile(ttfts, 90)), 3),
            "answers": {q: r["text"] for q, r in results}}


def main() -> None:
    """CLI entry point: one JSON object."""
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="extra `modelpress serve` option (repeatable)")
    args = parser.parse_args()
    system = system_prompt(args.artifact, args.system_tokens)
    report: dict = {"artifact": str(args.artifact), "streams": args.streams,
                    "rounds": args.rounds, "system_tokens": args.system_tokens}
    with tempfile.TemporaryDirectory() as work:
        for mode, flags in (("cache", []), ("no_cache", ["--no-prefix-cache"])):
            server = start(args.artifact, Path(work), mode, [*args.serve_arg, *flags])
            try:
                report[mode] = asyncio.run(run_mode(server.url, system, args.streams,
                                                    args.rounds, args.max_tokens))
                report[mode]["hit_tokens"] = _hits(server.url)
            finally:
                server.stop()
    answers = [report[m].pop("answers") for m in ("cache", "no_cache")]
    same = sum(answers[0][q] == answers[1].get(q) for q in answers[0])
    report["identical_answers"] = f"{same}/{len(answers[0])}"
    report["ttft_p50_ratio"] = round(report["cache"]["ttft_p50_s"]
                                     / report["no_cache"]["ttft_p50_s"], 3)
    print(json.dumps(report, indent=1))


def _hits(url: str) -> float:
    """``modelpress:prefix_cache_hits_total`` on the server's ``/metrics``."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("modelpress:prefix_cache_hits_total"):
            return float(line.split()[-1])
    return 0.0


if __name__ == "__main__":
    main()
