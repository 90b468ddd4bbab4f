"""Step pacing on and off on the decode-bound load: aggregate tok/s, TTFT and ITL.

Per round, starts ``modelpress serve`` on one artifact twice (``--max-gap-ratio R`` and
``0``; the order alternates between rounds, stopped by PID) and runs ``bench.decode``'s
Locust closed loop against each: ``--users`` chat streams of 128 tokens for
``--window-s`` after a short warm-up. Prints one JSON line per run.

    python -m bench.pacing_ab build/bench/artifacts-smollm2/genai-int4 --users 8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

from bench.decode import run_decode
from serve.app.launcher import start_server


def run(artifact: Path, users: int, ratio: float, window_s: float, work: Path) -> dict:
    """One served decode-bound level with ``--max-gap-ratio ratio``."""
    load = os.getloadavg()[0]
    server = start_server(artifact, log_path=work / "server.log", max_gap_ratio=ratio)
    try:
        level = run_decode(server.url, [users], window_s, work, warmup_s=5.0)[0]
    finally:
        server.stop()
    return {"max_gap_ratio": ratio, "load_start": round(load, 2),
            "load_end": round(os.getloadavg()[0], 2),
            "output_tokens_per_s": round(level["output_tokens_per_s"], 1),
            "ttft_ms": level["ttft_ms"], "itl_ms": level["itl_ms"],
            "outcomes": level["outcomes"]}


def main() -> None:
    """CLI entry point."""
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--window-s", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            order = (args.ratio, 0.0) if i % 2 == 0 else (0.0, args.ratio)
            for ratio in order:
                work = Path(tmp) / f"round{i}-ratio{ratio:g}"
                work.mkdir()
                result = run(args.artifact, args.users, ratio, args.window_s, work)
                print(json.dumps({"round": i, **result}), flush=True)


if __name__ == "__main__":
    main()
