"""Offline benchmark of artifacts (no server): latency, tokens/s, bytes and metric.

For each artifact folder, through ``serve.runtime.loader.load_runtime`` (the server's code):

* classification — latency of ``class_probabilities`` at batch 1 and batch 32 (median of
  ``--repeats`` runs after ``--warmup`` runs);
* generation — greedy decode tokens/s at batch 1 and batch 8 (``--new-tokens`` tokens,
  completion tokens counted by the runtime, median of the repeats);
* the artifact's bytes on disk, weight bytes, eval metric, drop and gate from its manifest.

Usage::

    python -m bench.offline artifacts/minilm/* --markdown docs/benchmarks-offline.md

The rows print as a Markdown table; ``--json`` writes them for machines.

``--llama-cpp GGUF`` adds llama.cpp (llama-cpp-python from the peers venv, ``make
peers-venv``, run as a subprocess with the same prompt, greedy, EOS banned so every run
decodes ``--new-tokens`` tokens, 2 threads) as a peer row in the same run, and a column of
each LM's batch-1 speed relative to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SENTENCES = [
    "A gorgeous, witty film that never once talks down to its audience.",
    "The plot is thin and the jokes land with a dull thud; two hours I will not get back.",
    "An uneven but often moving portrait of a family coming apart.",
    "Neither the script nor the actors seem to know what this movie wants to be.",
]
PROMPTS = ["The capital of France is", "Here is a short story about a robot who",
           "The three most important things in life are", "Once upon a time, in a village"]


def _median_seconds(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_classifier(runtime, warmup: int, repeats: int) -> dict[str, Any]:
    """Median latency (ms) of one batch of 1 and of 32 texts."""
    out = {}
    for batch in (1, 32):
        texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
        seconds = _median_seconds(lambda t=texts: runtime.class_probabilities(t), warmup,
                                  repeats)
        out[f"latency_ms_b{batch}"] = seconds * 1000
    return out


def bench_generator(runtime, warmup: int, repeats: int, new_tokens: int) -> dict[str, Any]:
    """Median aggregate decode tokens/s at batch 1 and 8 (greedy, same prompt length)."""
    from serve.runtime.protocol import GenerationParams

    params = GenerationParams(max_new_tokens=new_tokens)
    out = {}
    for batch in (1, 8):
        prompts = [PROMPTS[0]] * batch  # equal lengths: no padding effects across runtimes
        rates = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            results = runtime.generate(prompts, params)
            seconds = time.perf_counter() - start
            if i >= warmup:
                rates.append(sum(r.completion_tokens for r in results) / seconds)
        out[f"tokens_per_s_b{batch}"] = statistics.median(rates)
    return out


def bench_artifact(path: Path, warmup: int, repeats: int, new_tokens: int) -> dict[str, Any]:
    """Benchmark one artifact; returns a row for the table."""
    from serve.runtime.loader import load_runtime

    start = time.perf_counter()
    runtime = load_runtime(path)
    load_s = time.perf_counter() - start
    manifest = runtime.manifest
    metrics = manifest.metrics
    row: dict[str, Any] = {
        "artifact": manifest.name, "format": manifest.format, "precision": manifest.precision,
        "bytes": manifest.total_bytes, "weight_bytes": metrics.get("weight_bytes"),
        "metric": metrics.get("metric"), "value": metrics.get("value"),
        "ci95": metrics.get("ci95"), "metric_drop": metrics.get("metric_drop"),
        "drop_ci95": metrics.get("drop_ci95"),
        "agreement": metrics.get("agreement"), "gate": manifest.gate.get("verdict"),
        "load_s": load_s, "device": runtime.device}
    if manifest.task == "text-classification":
        row.update(bench_classifier(runtime, warmup, repeats))
    else:
        row.update(bench_generator(runtime, warmup, max(1, repeats // 2), new_tokens))
    return row


LLAMA_CPP_SCRIPT = """
import json, sys, time
from llama_cpp import Llama
path, prompt, n, warmup, repeats, threads = sys.argv[1:7]
llm = Llama(model_path=path, n_threads=int(threads), n_ctx=512, verbose=False, seed=0)
ban = {llm.token_eos(): -1e9}
rates = []
for i in range(int(warmup) + int(repeats)):
    llm.reset()
    start = time.perf_counter()
    out = llm(prompt, max_tokens=int(n), temperature=0.0, logit_bias=ban)
    seconds = time.perf_counter() - start
    if i >= int(warmup):
        rates.append(out["usage"]["completion_tokens"] / seconds)
print(json.dumps({"rates": rates}))
"""


def bench_llama_cpp(gguf: Path, python: Path, warmup: int, repeats: int, new_tokens: int,
                    threads: int = 2) -> dict[str, Any]:
    """Batch-1 greedy decode tokens/s of llama.cpp on ``gguf`` (the peer row).

    Never raises: a missing peers venv or a failing run gives a row saying why.
    """
    row: dict[str, Any] = {"artifact": f"llama.cpp ({gguf.name})", "format": "gguf",
                           "precision": gguf.stem.rsplit(".", 1)[-1],
                           "bytes": gguf.stat().st_size if gguf.is_file() else 0,
                           "device": "cpu", "peer": True}
    if not python.exists():
        return {**row, "status": f"not run: {python} missing (make peers-venv)"}
    cmd = [str(python), "-c", LLAMA_CPP_SCRIPT, str(gguf), PROMPTS[0], str(new_tokens),
           str(warmup), str(repeats), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        return {**row, "status": f"not run: llama.cpp failed ({last})"}
    rates = json.loads(proc.stdout.strip().splitlines()[-1])["rates"]
    return {**row, "status": "ok", "tokens_per_s_b1": statistics.median(rates),
            "command": " ".join(cmd[:2]) + " <bench.offline.LLAMA_CPP_SCRIPT> "
                       + " ".join(cmd[3:])}


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _ci(ci: Any, spec: str) -> str:
    return f"[{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else "-"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (columns depend on the task)."""
    lm = any("tokens_per_s_b1" in r or r.get("peer") for r in rows)
    peer = next((r for r in rows if r.get("peer") and r.get("tokens_per_s_b1")), None)
    speed = (["tok/s b1", "tok/s b8"] if lm else ["ms b1", "ms b32"])
    if peer:
        speed.append("b1 vs llama.cpp")
    head = ["artifact", "format", "precision", "MB", *speed, "metric", "value", "95% CI",
            "drop", "drop 95% CI", "agreement", "gate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        fast = ([_fmt(r.get("tokens_per_s_b1"), ".1f"), _fmt(r.get("tokens_per_s_b8"), ".1f")]
                if lm else [_fmt(r.get("latency_ms_b1"), ".2f"),
                            _fmt(r.get("latency_ms_b32"), ".1f")])
        if peer:
            b1 = r.get("tokens_per_s_b1")
            fast.append(f"{b1 / peer['tokens_per_s_b1']:.2f}x" if b1 else "-")
        relative = r.get("metric") == "perplexity"
        drop_spec = "+.1%" if relative else ".4f"
        cells = [r["artifact"], r["format"], r["precision"], f"{r['bytes'] / 1e6:.1f}", *fast,
                 _fmt(r.get("metric", r.get("status"))), _fmt(r.get("value"), ".4g"),
                 _ci(r.get("ci95"), ".4g"), _fmt(r.get("metric_drop"), drop_spec),
                 _ci(r.get("drop_ci95"), drop_spec), _fmt(r.get("agreement"), ".4f"),
                 _fmt(r.get("gate"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line entry: ``python -m bench.offline ARTIFACT...``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path, help="artifact folders")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    parser.add_argument("--llama-cpp", type=Path, metavar="GGUF",
                        help="add llama.cpp decoding this GGUF as a peer row (batch 1)")
    parser.add_argument("--peers-python", type=Path, default=Path(".venv-peers/bin/python"),
                        help="python of the venv with llama-cpp-python")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    folders = [p for p in args.artifacts if (p / "manifest.json").is_file()]
    rows = []
    for folder in folders:
        log.warning("benchmarking %s", folder)
        rows.append(bench_artifact(folder, args.warmup, args.repeats, args.new_tokens))
    if args.llama_cpp:
        log.warning("benchmarking llama.cpp on %s", args.llama_cpp)
        rows.append(bench_llama_cpp(args.llama_cpp, args.peers_python, args.warmup,
                                    max(1, args.repeats // 2), args.new_tokens))
    table = markdown(rows)
    machine = (f"{platform.processor() or platform.machine()}, "
               f"{len(os.sched_getaffinity(0))} cores available, "
               f"MODELPRESS_THREADS={os.environ.get('MODELPRESS_THREADS', 'all')}")
    print(table)
    print(f"\nmachine: {machine}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    if args.markdown:
        args.markdown.write_text(table + f"\n\nmachine: {machine}\n")


if __name__ == "__main__":
    main()
