"""Exact totals from Locust's ``--json-file`` output.

Locust writes one entry per (request type, name) with the full response-time histogram
(``response_times``: milliseconds, rounded by Locust to 2 significant digits above 100 ms,
→ count). Percentiles are computed here from the merged histograms, so totals over several
repeats or entries are exact rather than averages of percentiles.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PERCENTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99}
# Entries the locustfile fires besides the HTTP requests themselves.
TTFT, ITL, TOKENS, SCHEDULE = ("SSE", "TTFT"), ("SSE", "ITL"), ("SSE", "tokens"), (
    "SCHEDULE", "from schedule")
RUN_START = ("RUN", "start")  # logged once at test start; its start_time opens the window
_EXTRA = {TTFT, ITL, TOKENS, SCHEDULE, RUN_START}


def load_entries(path: Path) -> list[dict[str, Any]]:
    """Read a Locust ``--json-file`` (a list of stats entries).

    Args:
        path: The file Locust wrote.

    Returns:
        The entries, with ``response_times`` keys converted back to numbers.
    """
    entries = json.loads(Path(path).read_text())
    for entry in entries:
        entry["response_times"] = {float(k): int(v) for k, v in entry["response_times"].items()}
    return entries


def histogram(entries: Iterable[dict[str, Any]]) -> Counter:
    """Merge the response-time histograms of several entries."""
    merged: Counter = Counter()
    for entry in entries:
        merged.update(entry["response_times"])
    return merged


def percentile(hist: Counter, fraction: float) -> float | None:
    """Nearest-rank percentile of a histogram (the smallest value covering ``fraction``)."""
    total = sum(hist.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= rank:
            return value
    return max(hist)


def latency_summary(entries: list[dict[str, Any]]) -> dict[str, float | None] | None:
    """p50/p90/p95/p99/max/mean in milliseconds over ``entries`` (None if no samples)."""
    hist = histogram(entries)
    count = sum(hist.values())
    if count == 0:
        return None
    summary: dict[str, float | None] = {k: percentile(hist, f) for k, f in PERCENTILES.items()}
    summary["max"] = max(e["max_response_time"] for e in entries if e["num_requests"])
    summary["mean"] = sum(e["total_response_time"] for e in entries) / count
    return summary


def _key(entry: dict[str, Any]) -> tuple[str, str]:
    return entry["method"], entry["name"]


def _duration(run: list[dict[str, Any]]) -> float:
    """Seconds from the run's start (else its first response) to its last response."""
    requests = [e for e in run if _key(e) not in _EXTRA]
    marks = [e["start_time"] for e in run if _key(e) == RUN_START]
    starts = marks or [e["start_time"] for e in requests if e["num_requests"]]
    ends = [e["last_request_timestamp"] for e in requests if e["last_request_timestamp"]]
    return (max(ends) - min(starts)) if starts and ends else 0.0


def summarize(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Totals of one or more Locust runs (repeats): the numbers that go into results.json.

    Counts and histograms are summed over the runs, and so are their durations, so ``rps``
    is total requests over total measured seconds.

    Args:
        runs: Stats entries of each ``--json-file`` output.

    Returns:
        ``requests``, ``failures``, ``failure_rate``, ``duration_s``, ``rps``,
        ``latency_ms`` (request latency), ``ttft_ms``, ``itl_ms``, ``tokens_per_s`` and
        ``schedule_latency_ms`` (open loop: latency from the scheduled send time); the
        streaming and schedule keys are None when the runs had no such entries.
    """
    entries = [e for run in runs for e in run]
    requests = [e for e in entries if _key(e) not in _EXTRA]
    n = sum(e["num_requests"] for e in requests)
    failures = sum(e["num_failures"] for e in requests)
    duration = sum(_duration(run) for run in runs)
    tokens = [e for e in entries if _key(e) == TOKENS]
    token_count = sum(e["total_content_length"] for e in tokens)
    return {
        "requests": n,
        "failures": failures,
        "failure_rate": failures / n if n else None,
        "duration_s": duration,
        "rps": n / duration if duration > 0 else None,
        "latency_ms": latency_summary(requests),
        "ttft_ms": latency_summary([e for e in entries if _key(e) == TTFT]),
        "itl_ms": latency_summary([e for e in entries if _key(e) == ITL]),
        "tokens_per_s": token_count / duration if tokens and duration > 0 else None,
        "schedule_latency_ms": latency_summary([e for e in entries if _key(e) == SCHEDULE]),
    }
