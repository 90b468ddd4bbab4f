"""A burst of long prompts arriving while streams decode: what ``max_num_batched_tokens`` buys.

In process (no HTTP), on one artifact: ``--running`` streams decode, then ``--burst`` long
prompts (``--prompt-tokens`` each) arrive at once. Reported per budget: the running
streams' longest gap between two tokens (the stall a burst causes), their inter-token p99,
and the burst's time to first token (p50 / max).

    python -m bench.prefill_budget build/bench/artifacts-smollm2/genai-int4 \\
        --budgets 1000000 2048 512
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import numpy as np

from serve.engine.core import Engine, EngineConfig
from serve.runtime.loader import load_runtime
from serve.runtime.protocol import GenerationParams


async def _times(seq) -> list[float]:
    """Arrival times of a stream's tokens."""
    out = []
    while True:
        event = await seq.queue.get()
        if event.token is None:
            return out
        out.append(time.monotonic())


async def burst_run(engine: Engine, running_ids: list[int], burst_ids: list[int],
                    running: int, burst: int, new_tokens: int) -> dict:
    """``running`` streams decode; once each has a token, ``burst`` prompts arrive."""
    params = GenerationParams(max_new_tokens=new_tokens)
    streams = [engine.submit(running_ids, params) for _ in range(running)]
    for seq in streams:  # every running stream has started
        while seq.generated == 0:
            await asyncio.sleep(0.005)
    collectors = [asyncio.ensure_future(_times(s)) for s in streams]
    arrived = time.monotonic()
    burst_seqs = [engine.submit(burst_ids, GenerationParams(max_new_tokens=4))
                  for _ in range(burst)]
    firsts = [t[0] - arrived for t in await asyncio.gather(*(_times(s) for s in burst_seqs))]
    gaps = [np.diff(times) for times in await asyncio.gather(*collectors)]
    all_gaps = np.concatenate(gaps)
    return {"running_max_gap_s": round(float(all_gaps.max()), 3),
            "running_itl_p99_s": round(float(np.percentile(all_gaps, 99)), 3),
            "burst_ttft_p50_s": round(float(np.median(firsts)), 3),
            "burst_ttft_max_s": round(float(max(firsts)), 3)}


def main() -> None:
    """CLI entry point: one line of JSON per budget."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1_000_000, 2048, 512])
    parser.add_argument("--running", type=int, default=8)
    parser.add_argument("--burst", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--new-tokens", type=int, default=96)
    args = parser.parse_args()
    runtime = load_runtime(args.artifact)
    words = "the keeper of the lighthouse wrote a long letter to the sea " * 200
    ids = list(runtime.tokenizer(words)["input_ids"])
    burst_ids, running_ids = ids[:args.prompt_tokens], ids[:16]

    async def run(budget: int) -> dict:
        # EOS off: every stream decodes its full length
        engine = Engine(runtime.step_lm(), set(), EngineConfig(
            max_running=args.running + args.burst, max_num_batched_tokens=budget,
            max_kv_tokens=10**7))
        try:
            await burst_run(engine, running_ids, burst_ids, 1, 1, 4)  # warm-up, full length
            return {"max_num_batched_tokens": budget, **await burst_run(
                engine, running_ids, burst_ids, args.running, args.burst, args.new_tokens)}
        finally:
            engine.close()

    for budget in args.budgets:
        print(json.dumps(asyncio.run(run(budget))), flush=True)


if __name__ == "__main__":
    main()
