"""In-process speed of the generation engine: aggregate decode tok/s with 1 and N
concurrent streams on one artifact (no HTTP), and its batch-1 / batch-N ratio.

    python -m bench.engine_speed build/bench/artifacts-smollm2/genai-int4 --streams 1 8

Compare with the served numbers (``modelpress bench``) to see what HTTP costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from serve.engine.core import Engine, EngineConfig
from serve.runtime.loader import load_runtime
from serve.runtime.protocol import GenerationParams

PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a message "
          "in a bottle, with many characters and places.")


async def _stream(engine: Engine, ids: list[int], n: int) -> tuple[int, float]:
    seq = engine.submit(ids, GenerationParams(max_new_tokens=n))
    start, tokens, first = time.monotonic(), 0, None
    while True:
        event = await seq.queue.get()
        if event.token is None:
            return tokens, (first or time.monotonic()) - start
        first = first or time.monotonic()
        tokens += 1


async def measure(engine: Engine, ids: list[int], streams: int, n: int) -> dict:
    """Run ``streams`` requests of ``n`` tokens together; aggregate tok/s and TTFTs."""
    start = time.monotonic()
    done = await asyncio.gather(*(_stream(engine, ids, n) for _ in range(streams)))
    wall = time.monotonic() - start
    tokens = sum(t for t, _ in done)
    return {"streams": streams, "tokens": tokens, "seconds": round(wall, 3),
            "tok_per_s": round(tokens / wall, 1),
            "ttft_max_s": round(max(f for _, f in done), 3)}


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch-invariant", action="store_true",
                        help="the engine's batch-invariant decoding (EngineConfig)")
    args = parser.parse_args()
    runtime = load_runtime(args.artifact)
    ids = list(runtime.tokenizer(PROMPT)["input_ids"])

    async def run() -> list[dict]:
        # EOS off: every stream decodes exactly --tokens tokens
        engine = Engine(runtime.step_lm(), set(), EngineConfig(max_running=max(args.streams),
                                                             batch_invariant=args.batch_invariant))
        try:
            await measure(engine, ids, 1, 8)  # warm-up
            return [await measure(engine, ids, s, args.tokens) for s in args.streams]
        finally:
            engine.close()

    rows = asyncio.run(run())
    base = rows[0]["tok_per_s"]
    for row in rows:
        row["vs_first"] = round(row["tok_per_s"] / base, 2)
    print(json.dumps({"artifact": args.artifact, "batch_invariant": args.batch_invariant,
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
