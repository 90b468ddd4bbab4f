"""Sequences admitted under one ``max_kv_tokens``: KV grown per token vs reserved up front.

In process, on one artifact: ``--requests`` greedy requests of ``--new-tokens`` (EOS off)
are submitted at once to an engine with ``--max-kv-tokens``. Reports the most sequences
running together (and the preemptions it took) against what worst-case reservation
(``prompt + max_new_tokens`` per sequence, the engine before issue 21) admits under the
same budget, and the tokens/s of both ways (the reservation rule run as a
``max_running`` cap, which is exactly what it admits for equal requests).

    python -m bench.kv_admission build/bench/artifacts-smollm2/genai-int4 --max-kv-tokens 4096
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from bench.engine_speed import PROMPT, measure
from serve.engine.core import Engine, EngineConfig
from serve.runtime.loader import load_runtime


def main() -> None:
    """CLI entry point: one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--max-kv-tokens", type=int, default=4096)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()
    runtime = load_runtime(args.artifact)
    ids = list(runtime.tokenizer(PROMPT)["input_ids"])
    reserved = args.max_kv_tokens // (len(ids) + args.new_tokens)

    async def run(max_running: int) -> dict:
        engine = Engine(runtime.step_lm(), set(), EngineConfig(
            max_running=max_running, max_kv_tokens=args.max_kv_tokens, prefix_cache=False))
        try:
            start = time.monotonic()
            row = await measure(engine, ids, args.requests, args.new_tokens)
            return {"max_running_seen": engine.max_running_seen,
                    "preemptions": engine.scheduler.preemptions,
                    "tok_per_s": row["tok_per_s"],
                    "seconds": round(time.monotonic() - start, 1)}
        finally:
            engine.close()

    report = {"artifact": args.artifact, "prompt_tokens": len(ids),
              "max_kv_tokens": args.max_kv_tokens, "requests": args.requests,
              "new_tokens": args.new_tokens,
              "reserved_worst_case": {"admitted": reserved, **asyncio.run(run(reserved))},
              "grown_per_token": asyncio.run(run(args.requests))}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
