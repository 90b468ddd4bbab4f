"""What a stream's text costs: re-decoding the whole output for every token (before) vs
incremental detokenization (:class:`serve.detokenize.IncrementalDetokenizer`).

    python -m bench.detok_cost --tokenizer build/bench/smollm2-135m-instruct --tokens 2000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from serve.detokenize import IncrementalDetokenizer

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


def main(argv: list[str] | None = None) -> int:
    """Print the figures as JSON for stream lengths up to ``--tokens``."""
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="HF model folder")
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    ids = tokenizer(TEXT * (args.tokens // 10 + 1), add_special_tokens=False)["input_ids"]
    rows = [measure(tokenizer, ids[:n]) for n in (args.tokens // 4, args.tokens)]
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
