"""Served capacity against the lean reference server, in one run (``make bench-serve``).

For one classification artifact, one after another on the same machine and the same
``hey`` load (one text per request, closed loop, 1 and 32 connections):

1. ``reference`` — :mod:`bench.reference_server`, the measuring stick;
2. ``served`` — ``modelpress serve`` (BentoML, micro-batching on);
3. ``no-batching`` — ``modelpress serve --no-batching`` (one request per model call).

Each server is started, warmed up (excluded), loaded, then stopped by its PID. The mean
batch size at 32 connections comes from the served ``/metrics`` histogram
(``bentoml_service_adaptive_batch_size``, difference over that run) and from the
reference server's own counters. Writes JSON and a markdown section; ``--doc`` replaces
the section between the ``bench-serve`` markers of docs/benchmarks.md.

    python -m bench.serve_capacity ARTIFACT --data reviews.jsonl --json out.json \
        --doc docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.hey import run_hey
from serve.app.launcher import ROOT, free_port, server_env, start_server, wait_ready
from serve.settings import ServeSettings

log = logging.getLogger(__name__)

BEGIN, END = "<!-- bench-serve:begin -->", "<!-- bench-serve:end -->"
SERVERS = ("reference", "served", "no-batching")
TARGETS = {"served_vs_reference": 0.90, "mean_batch": 8.0, "p99_over_p50": 3.0,
           "batching_gain": 1.5}


def pick_text(data: Path) -> str:
    """The review of median length in a JSONL file with a ``text`` field."""
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines() if line]
    return sorted(texts, key=len)[len(texts) // 2]


def batch_counts(url: str) -> tuple[float, float]:
    """(batches, requests) of ``classify_batch`` from the server's counters."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    batches = requests = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "bentoml_service_adaptive_batch_size":
            continue
        for s in family.samples:
            if s.labels.get("method_name") != "classify_batch":
                continue
            if s.name.endswith("_count"):
                batches += s.value
            elif s.name.endswith("_sum"):
                requests += s.value
    return batches, requests


def reference_counts(url: str) -> tuple[float, float]:
    """(batches, requests) from the reference server's ``/readyz``."""
    body = httpx.get(f"{url}/readyz", timeout=10).json()
    return float(body["batches"]), float(body["requests"])


@contextmanager
def running(kind: str, artifact: Path, max_batch_size: int, work: Path) -> Iterator[str]:
    """Start one server kind on a free port, yield its URL, stop it by PID."""
    if kind == "reference":
        port = free_port()
        env = server_env(ServeSettings(artifact=str(artifact)))
        log_file = open(work / "reference.log", "wb")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen([sys.executable, "-m", "bench.reference_server", str(artifact),
                                 "--port", str(port), "--max-batch-size", str(max_batch_size)],
                                cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(proc, url, timeout=180)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log_file.close()
        return
    handle = start_server(artifact, batching=kind != "no-batching", access_log=False,
                          max_batch_size=max_batch_size, max_latency_ms=10_000,
                          log_path=work / f"{kind}.log")
    try:
        yield handle.url
    finally:
        handle.stop()


def measure(kind: str, artifact: Path, body: Path, max_batch_size: int, duration_s: float,
            warmup_s: float, work: Path) -> dict[str, Any]:
    """Load one server at 1 and 32 connections; mean batch size over the 32 run."""
    counts = reference_counts if kind == "reference" else batch_counts
    with running(kind, artifact, max_batch_size, work) as url:
        target = f"{url}/classify"
        run_hey(target, body, 32, warmup_s)
        one = run_hey(target, body, 1, duration_s)
        b0, r0 = counts(url)
        many = run_hey(target, body, 32, duration_s)
        b1, r1 = counts(url)
    for result in (one, many):
        if not result.ok:
            raise RuntimeError(f"{kind}: failures under load: {result.as_dict()}")
    mean_batch = (r1 - r0) / (b1 - b0) if b1 > b0 else float("nan")
    log.info("%s: c1 %.1f req/s, c32 %.1f req/s (p50 %.1f ms, p99 %.1f ms), mean batch %.2f",
             kind, one.rps, many.rps, many.p50_ms, many.p99_ms, mean_batch)
    return {"c1": one.as_dict(), "c32": many.as_dict(), "mean_batch_c32": mean_batch}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median over rounds of each server's numbers, and the ratios the targets name."""
    def med(kind: str, *path: str) -> float:
        values = []
        for r in runs[kind]:
            v: Any = r
            for key in path:
                v = v[key]
            values.append(float(v))
        return statistics.median(values)

    table = {kind: {"c1_rps": med(kind, "c1", "rps"), "c32_rps": med(kind, "c32", "rps"),
                    "c32_p50_ms": med(kind, "c32", "p50_ms"),
                    "c32_p99_ms": med(kind, "c32", "p99_ms"),
                    "mean_batch_c32": med(kind, "mean_batch_c32")} for kind in runs}
    served, ref, off = table["served"], table["reference"], table["no-batching"]
    ratios = {"served_vs_reference": served["c32_rps"] / ref["c32_rps"],
              "mean_batch": served["mean_batch_c32"],
              "p99_over_p50": served["c32_p99_ms"] / served["c32_p50_ms"],
              "batching_gain": served["c32_rps"] / off["c32_rps"]}
    met = {k: (v <= TARGETS[k] if k == "p99_over_p50" else v >= TARGETS[k])
           for k, v in ratios.items()}
    return {"table": table, "ratios": ratios, "met": met}


def markdown(result: dict[str, Any]) -> str:
    """The docs/benchmarks.md section (between the markers)."""
    s = result["summary"]
    lines = [BEGIN, "", f"Run {result['date']} UTC, `{result['command']}`; artifact "
             f"`{result['artifact']}`; one text per request ({len(result['text'])} "
             f"characters); `hey -z {result['duration_s']:g}s` per level after a "
             f"{result['warmup_s']:g} s warm-up; {result['rounds']} round(s), medians; "
             f"load average before the run: {result['loadavg']:.2f}.", "",
             "| server | 1 conn req/s | 32 conn req/s | p50 ms | p99 ms | mean batch |",
             "|---|---|---|---|---|---|"]
    for kind, row in s["table"].items():
        lines.append(f"| {kind} | {row['c1_rps']:.1f} | {row['c32_rps']:.1f} | "
                     f"{row['c32_p50_ms']:.1f} | {row['c32_p99_ms']:.1f} | "
                     f"{row['mean_batch_c32']:.2f} |")
    names = {"served_vs_reference": "served / reference req/s at 32 (target ≥ 0.90)",
             "mean_batch": "served mean batch at 32 (target ≥ 8)",
             "p99_over_p50": "served p99 / p50 at 32 (target ≤ 3)",
             "batching_gain": "batching on / off req/s at 32 (target ≥ 1.5)"}
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    for key, name in names.items():
        verdict = "met" if s["met"][key] else "**missed**"
        lines.append(f"| {name} | {s['ratios'][key]:.2f} | {verdict} |")
    return "\n".join([*lines, "", END])


def write_doc(doc: Path, section: str) -> None:
    """Replace the marked section of ``doc`` (or append it under a heading)."""
    text = doc.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Served capacity vs a lean server (make bench-serve)" \
            "\n\n" + section + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> None:
    """CLI: run the three servers and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="JSONL with a text field")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, default=Path("build/bench/serve-capacity.json"))
    parser.add_argument("--doc", type=Path, help="markdown file whose section to replace")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    text = pick_text(args.data)
    loadavg = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in SERVERS}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        body = work / "body.json"
        body.write_text(json.dumps({"texts": [text]}))
        for _ in range(args.rounds):
            for kind in SERVERS:
                runs[kind].append(measure(kind, args.artifact, body, args.max_batch_size,
                                          args.duration, args.warmup, work))
    result = {"date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "command": " ".join(["python -m bench.serve_capacity",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "artifact": str(args.artifact), "text": text,
              "duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds,
              "loadavg": loadavg, "runs": runs, "summary": summarize(runs)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    section = markdown(result)
    print(section)
    if args.doc:
        write_doc(args.doc, section)


if __name__ == "__main__":
    main()
