"""What a stream costs per token outside the model: its text, re-decoding the whole output
for every token (before) vs incremental detokenization
(:class:`serve.runtime.detokenize.IncrementalDetokenizer`); and the sampler's log-probabilities
(:class:`serve.runtime.sampling.Sampler`, greedy, with and without ``logprobs``).

    python -m bench.stream_cost --tokenizer build/bench/smollm2-135m-instruct --tokens 2000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from serve.runtime.detokenize import IncrementalDetokenizer
from serve.runtime.protocol import GenerationParams
from serve.runtime.sampling import Sampler

TEXT = ("Ünïcödé 日本語 🙂 and plain words: the model streams its answer token by token, "
        "and every token's text goes out as soon as it is complete. ")


def measure(tokenizer, ids: list[int]) -> dict[str, float]:
    """Seconds and tokens decoded per generated token, both ways, over ``ids``."""
    start, decoded = time.perf_counter(), 0
    for i in range(1, len(ids) + 1):
        tokenizer.decode(ids[:i], skip_special_tokens=True)
        decoded += i
    whole_s = time.perf_counter() - start
    detok, most, window = IncrementalDetokenizer(tokenizer), 0, 0
    start = time.perf_counter()
    for token in ids:
        detok.push(token)
        window += detok.decoded_tokens
        most = max(most, detok.decoded_tokens)
    detok.flush()
    incremental_s = time.perf_counter() - start
    return {"tokens": len(ids), "whole_s": round(whole_s, 4),
            "incremental_s": round(incremental_s, 4),
            "speedup": round(whole_s / incremental_s, 1),
            "whole_decoded_per_token": round(decoded / len(ids), 1),
            "incremental_decoded_per_token": round(window / len(ids), 2),
            "incremental_max_decoded_in_a_step": most}


def sampler_cost(vocab: int, rows: int = 1000) -> dict[str, float]:
    """Milliseconds a token for the greedy sampler over random ``[vocab]`` logits: without
    logprobs, with the chosen token's, and with 5 alternatives (interleaved twice)."""
    logits = np.random.default_rng(0).standard_normal((rows, vocab)).astype(np.float32)
    out: dict[str, list[float]] = {}
    for _ in range(2):
        for name, top in (("off", None), ("logprobs_0", 0), ("logprobs_5", 5)):
            sampler = Sampler(GenerationParams(logprobs=top))
            start = time.perf_counter()
            for row in logits:
                sampler(row)
            out.setdefault(name, []).append((time.perf_counter() - start) / rows * 1e3)
    return {f"{name}_ms": round(min(times), 3) for name, times in out.items()}


def main(argv: list[str] | None = None) -> int:
    """Print the figures as JSON (stream lengths up to ``--tokens``)."""
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="HF model folder")
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    ids = tokenizer(TEXT * (args.tokens // 10 + 1), add_special_tokens=False)["input_ids"]
    rows = [measure(tokenizer, ids[:n]) for n in (args.tokens // 4, args.tokens)]
    print(json.dumps({"detokenize": rows, "sampler": sampler_cost(len(tokenizer))}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
