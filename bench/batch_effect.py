"""Batch effect of an LM artifact in the engine: greedy answers alone vs batched, and the
cost of per-row decoding (issue 20 #4).

For each artifact: ``--prompts`` random token prompts, ``--tokens`` greedy tokens each
(EOS ignored), first each prompt alone, then ``--rounds`` rounds of all of them submitted
together in a random order; it reports how many batched answers differ from the lone
ones and the tokens per second of both phases, with the step LM's batched decode and with
per-row decoding (``--modes``).

Usage::

    OMP_NUM_THREADS=1 python -m bench.batch_effect build/gpu-carry/gen/onnx-int8-dynamic \\
        build/gpu-carry/gen/genai-int8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


async def _tokens(seq: Any) -> list[int]:
    out = []
    while (event := await seq.queue.get()).token is not None:
        out.append(event.token)
    if event.error is not None:
        raise event.error
    return out


def measure(artifact: str, per_row: bool, prompts: int, rounds: int,
            tokens: int) -> dict[str, Any]:
    """Answers changed by their neighbours, and tok/s alone and batched.

    Args:
        artifact: An LM artifact folder.
        per_row: Decode one sequence per forward (else the batched step).
        prompts: Prompts per round.
        rounds: Batched rounds.
        tokens: Greedy tokens per answer.
    """
    from serve.engine.core import Engine, EngineConfig
    from serve.runtime.loader import load_runtime
    from serve.runtime.protocol import GenerationParams

    lm = load_runtime(artifact).step_lm()
    lm.per_row = per_row
    rng = np.random.default_rng(0)
    ids = [[2, *rng.integers(4, lm.vocab_size - 1, size=int(n)).tolist()]
           for n in rng.integers(3, 30, size=prompts)]
    params = GenerationParams(max_new_tokens=tokens)

    async def run() -> dict[str, Any]:
        engine = Engine(lm, set(), EngineConfig(max_running=max(32, prompts)))
        try:
            start = time.perf_counter()
            alone = [await _tokens(engine.submit(p, params)) for p in ids]
            alone_s = time.perf_counter() - start
            changed, start = 0, time.perf_counter()
            for _ in range(rounds):
                seqs = {i: engine.submit(ids[i], params) for i in rng.permutation(prompts)}
                got = {i: await _tokens(seq) for i, seq in seqs.items()}
                changed += sum(got[i] != alone[i] for i in range(prompts))
            batched_s = time.perf_counter() - start
        finally:
            engine.close()
        return {"artifact": artifact, "per_row": per_row, "changed": changed,
                "answers": prompts * rounds,
                "alone_tok_s": round(prompts * tokens / alone_s),
                "batched_tok_s": round(prompts * rounds * tokens / batched_s)}
    return asyncio.run(run())


def main() -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--modes", nargs="+", default=["batched", "per-row"],
                        choices=["batched", "per-row"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for artifact in args.artifacts:
        for mode in args.modes:
            log.info(json.dumps(measure(artifact, mode == "per-row", args.prompts,
                                        args.rounds, args.tokens)))


if __name__ == "__main__":
    main()
