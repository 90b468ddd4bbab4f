"""Offline benchmark of artifacts (no server): latency, tokens/s, bytes and metric.

For each artifact folder, through ``serve.runtimes.load_runtime`` (the server's code):

* classification — latency of ``class_probabilities`` at batch 1 and batch 32 (median of
  ``--repeats`` runs after ``--warmup`` runs);
* generation — greedy decode tokens/s at batch 1 and batch 8 (``--new-tokens`` tokens,
  completion tokens counted by the runtime, median of the repeats);
* the artifact's bytes on disk, weight bytes, eval metric, drop and gate from its manifest.

Usage::

    python -m bench.offline artifacts/minilm/* --markdown docs/benchmarks-offline.md

The rows print as a Markdown table; ``--json`` writes them for machines.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
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
    from serve.runtimes import GenerationParams

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
    from serve.runtimes import load_runtime

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
        "agreement": metrics.get("agreement"), "gate": manifest.gate.get("verdict"),
        "load_s": load_s, "device": runtime.device}
    if manifest.task == "text-classification":
        row.update(bench_classifier(runtime, warmup, repeats))
    else:
        row.update(bench_generator(runtime, warmup, max(1, repeats // 2), new_tokens))
    return row


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (columns depend on the task)."""
    lm = any("tokens_per_s_b1" in r for r in rows)
    speed = (["tok/s b1", "tok/s b8"] if lm else ["ms b1", "ms b32"])
    head = ["artifact", "format", "precision", "MB", *speed, "metric", "value", "drop",
            "agreement", "gate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        fast = ([_fmt(r.get("tokens_per_s_b1"), ".1f"), _fmt(r.get("tokens_per_s_b8"), ".1f")]
                if lm else [_fmt(r.get("latency_ms_b1"), ".2f"),
                            _fmt(r.get("latency_ms_b32"), ".1f")])
        cells = [r["artifact"], r["format"], r["precision"], f"{r['bytes'] / 1e6:.1f}", *fast,
                 _fmt(r["metric"]), _fmt(r["value"], ".4g"), _fmt(r["metric_drop"], ".4f"),
                 _fmt(r["agreement"], ".4f"), _fmt(r["gate"])]
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    folders = [p for p in args.artifacts if (p / "manifest.json").is_file()]
    rows = []
    for folder in folders:
        log.warning("benchmarking %s", folder)
        rows.append(bench_artifact(folder, args.warmup, args.repeats, args.new_tokens))
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
