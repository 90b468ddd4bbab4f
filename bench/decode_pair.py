"""Batch-1 decode speed against llama.cpp, interleaved round by round (drift-proof ratios).

``bench.offline`` times every artifact, then llama.cpp, once each; on a shared VM the
machine's speed drifts between those minutes (llama.cpp alone measured 121-151 tok/s in
consecutive idle runs), so one run's ratio says little. Here each round decodes the same
prompt once with every artifact and once with llama.cpp (a persistent process from the
peers venv, 2 threads, EOS banned), and the ratio is taken within the round; the table
gives medians over the rounds and the range of the per-round ratios.

    python -m bench.decode_pair build/bench/artifacts-smollm2-q15/int4-gguf \\
        --llama-cpp build/bench/smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf --rounds 10
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.offline import PROMPTS
from bench.peers import PEERS_PYTHON

log = logging.getLogger(__name__)

# One decode per stdin line; prints the tokens/s of that decode.
LLAMA_LOOP_SCRIPT = """
import sys, time
from llama_cpp import Llama
path, prompt, n, threads = sys.argv[1:5]
llm = Llama(model_path=path, n_threads=int(threads), n_ctx=512, verbose=False, seed=0)
ban = {llm.token_eos(): -1e9}
for _ in sys.stdin:
    llm.reset()
    start = time.perf_counter()
    out = llm(prompt, max_tokens=int(n), temperature=0.0, logit_bias=ban)
    print(out["usage"]["completion_tokens"] / (time.perf_counter() - start), flush=True)
"""


def _decode_rate(runtime, new_tokens: int) -> float:
    from serve.runtime.protocol import GenerationParams

    start = time.perf_counter()
    result = runtime.generate([PROMPTS[0]], GenerationParams(max_new_tokens=new_tokens))[0]
    return result.completion_tokens / (time.perf_counter() - start)


def decode_pair(artifacts: list[Path], gguf: Path, rounds: int, new_tokens: int,
                python: Path = PEERS_PYTHON, threads: int = 2) -> dict[str, Any]:
    """Per artifact: median tok/s, median and range of its per-round ratio to llama.cpp."""
    from serve.runtime.loader import load_runtime

    runtimes = {str(a): load_runtime(a) for a in artifacts}
    peer = subprocess.Popen([str(python), "-c", LLAMA_LOOP_SCRIPT, str(gguf), PROMPTS[0],
                             str(new_tokens), str(threads)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def llama() -> float:
        peer.stdin.write("go\n")
        peer.stdin.flush()
        return float(peer.stdout.readline())

    rates: dict[str, list[float]] = {name: [] for name in [*runtimes, "llama.cpp"]}
    try:
        for r in range(rounds + 1):  # round 0 warms every model up and is not counted
            row = {name: _decode_rate(rt, new_tokens) for name, rt in runtimes.items()}
            row["llama.cpp"] = llama()
            if r:
                for name, rate in row.items():
                    rates[name].append(rate)
            log.info("round %d: %s", r, ", ".join(f"{k.rsplit('/', 1)[-1]} {v:.1f}"
                                                   for k, v in row.items()))
    finally:
        peer.stdin.close()
        peer.wait(timeout=60)
    out = {"rounds": rounds, "new_tokens": new_tokens, "gguf": str(gguf),
           "llama_cpp_tokens_per_s": statistics.median(rates["llama.cpp"]),
           "llama_cpp_range": [min(rates["llama.cpp"]), max(rates["llama.cpp"])],
           "artifacts": []}
    for name in runtimes:
        ratios = [a / b for a, b in zip(rates[name], rates["llama.cpp"], strict=True)]
        out["artifacts"].append({
            "artifact": name, "tokens_per_s": statistics.median(rates[name]),
            "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios),
                                                                       max(ratios)],
            "rounds_at_or_above_1": sum(x >= 1.0 for x in ratios)})
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: print the interleaved comparison as a Markdown table (and optionally JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--llama-cpp", type=Path, required=True, help="The GGUF file.")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--peers-python", type=Path, default=PEERS_PYTHON)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = decode_pair(args.artifacts, args.llama_cpp, args.rounds, args.new_tokens,
                         args.peers_python)
    print(f"llama.cpp: median {result['llama_cpp_tokens_per_s']:.1f} tok/s "
          f"(range {result['llama_cpp_range'][0]:.1f}-{result['llama_cpp_range'][1]:.1f})")
    print("| artifact | tok/s b1 (median) | vs llama.cpp, per-round median | range | "
          "rounds ≥ 1.0× |\n|---|---|---|---|---|")
    for a in result["artifacts"]:
        print(f"| {Path(a['artifact']).name} | {a['tokens_per_s']:.1f} | "
              f"{a['ratio_median']:.2f}× | {a['ratio_range'][0]:.2f}–{a['ratio_range'][1]:.2f}"
              f" | {a['rounds_at_or_above_1']}/{result['rounds']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
