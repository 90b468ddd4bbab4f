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
WINDOW_TOKENS, RUN_WINDOW = ("SSE", "window tokens"), ("RUN", "window")
OUTCOME = "OUTCOME"  # request type of the per-request outcome counts (see the locustfile)
ERROR = "ERROR"  # request type of the details of failures other than 503 (status, exception)
_EXTRA = {TTFT, ITL, TOKENS, SCHEDULE, RUN_START, WINDOW_TOKENS, RUN_WINDOW}


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


def _is_request(entry: dict[str, Any]) -> bool:
    return _key(entry) not in _EXTRA and entry["method"] not in (OUTCOME, ERROR)


def _counts(entries: list[dict[str, Any]], method: str) -> Counter:
    counts: Counter = Counter()
    for entry in entries:
        if entry["method"] == method:
            counts[entry["name"]] += entry["num_requests"]
    return counts


def outcomes(entries: list[dict[str, Any]]) -> dict[str, int] | None:
    """Counts of each request outcome (``sent``, ``200 done``, ``503``...), None if the
    runs recorded none; ``open at stop`` = sent minus every other outcome."""
    counts = _counts(entries, OUTCOME)
    if not counts:
        return None
    out = dict(counts)
    out["open at stop"] = counts["sent"] - sum(v for k, v in counts.items() if k != "sent")
    return out


def _decode(entries: list[dict[str, Any]], tokens: list[dict[str, Any]]) -> dict[str, Any]:
    """Decode-bound figures: tokens per stream and output tok/s inside the window."""
    streams = sum(e["num_requests"] for e in tokens)
    window_ms = sum(e["total_response_time"] for e in entries if _key(e) == RUN_WINDOW)
    window_tokens = sum(e["total_content_length"] for e in entries
                        if _key(e) == WINDOW_TOKENS)
    return {"tokens_per_request": (sum(e["total_content_length"] for e in tokens) / streams
                                   if streams else None),
            "window_s": window_ms / 1000 if window_ms else None,
            "window_tokens": window_tokens if window_ms else None,
            "output_tokens_per_s": window_tokens / (window_ms / 1000) if window_ms else None}


def _duration(run: list[dict[str, Any]]) -> float:
    """Seconds from the run's start (else its first response) to its last response."""
    requests = [e for e in run if _is_request(e)]
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
        ``latency_ms`` (request latency), ``ttft_ms``, ``itl_ms``, ``tokens_per_s``,
        ``schedule_latency_ms`` (open loop: latency from the scheduled send time),
        ``outcomes`` (see :func:`outcomes`), ``failures_503`` / ``failures_other``
        (deliberate overload answers vs every other failure), ``errors`` (what the other
        failures were: status or exception, counted), ``tokens_per_request``,
        ``window_s``, ``window_tokens`` and ``output_tokens_per_s`` (chat profile: tokens
        that arrived inside the measured window, over its length); keys a run did not
        measure are None.
    """
    entries = [e for run in runs for e in run]
    requests = [e for e in entries if _is_request(e)]
    n = sum(e["num_requests"] for e in requests)
    failures = sum(e["num_failures"] for e in requests)
    duration = sum(_duration(run) for run in runs)
    tokens = [e for e in entries if _key(e) == TOKENS]
    token_count = sum(e["total_content_length"] for e in tokens)
    counts = outcomes(entries)
    rejected = counts.get("503", 0) if counts else None
    return {
        "requests": n,
        "failures": failures,
        "failures_503": rejected,
        "failures_other": failures - rejected if counts else None,
        "outcomes": counts,
        "errors": dict(_counts(entries, ERROR)) or None,
        "failure_rate": failures / n if n else None,
        "duration_s": duration,
        "rps": n / duration if duration > 0 else None,
        "latency_ms": latency_summary(requests),
        "ttft_ms": latency_summary([e for e in entries if _key(e) == TTFT]),
        "itl_ms": latency_summary([e for e in entries if _key(e) == ITL]),
        "tokens_per_s": token_count / duration if tokens and duration > 0 else None,
        "schedule_latency_ms": latency_summary([e for e in entries if _key(e) == SCHEDULE]),
        **_decode(entries, tokens),
    }
