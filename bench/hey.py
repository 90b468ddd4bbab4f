"""Run ``hey`` (a native HTTP load generator, Debian package ``hey``) and read its summary.

Capacity runs use ``hey`` rather than Locust: on a 2-core machine shared with the server,
Locust's Python users cost far more client CPU than the server's own request handling,
so they measure the load generator. ``hey`` runs closed-loop connections (``-c``) for a
fixed time (``-z``), with keep-alive, all sending the same body.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serve.errors import ModelpressError


class HeyError(ModelpressError):
    """``hey`` is missing, failed, or printed no summary."""


@dataclass
class HeyResult:
    """One ``hey`` run.

    Attributes:
        connections: Concurrent closed-loop connections (``-c``).
        seconds: Wall time of the run.
        requests: Responses received (any status).
        rps: Responses per second.
        p50_ms: Median latency.
        p99_ms: 99th percentile latency.
        statuses: Responses by HTTP status.
        errors: Client-side errors (connection refused, timeouts...).
    """

    connections: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0

    @property
    def ok(self) -> bool:
        """Every response was a 200 and there were no client errors."""
        return self.errors == 0 and set(self.statuses) == {200}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def hey_path() -> str:
    """The ``hey`` executable.

    Raises:
        HeyError: Not installed (``apt-get install hey``; ``make bench-serve`` does it).
    """
    path = shutil.which("hey")
    if path is None:
        raise HeyError("hey is not installed: apt-get install -y hey (make bench-serve "
                       "installs it)")
    return path


def parse_summary(text: str, connections: int) -> HeyResult:
    """Parse ``hey``'s text summary.

    Raises:
        HeyError: The summary lacks the totals or the latency distribution.
    """
    def number(pattern: str) -> float:
        match = re.search(pattern, text)
        if match is None:
            raise HeyError(f"hey printed no {pattern!r}: {text[-500:]}")
        return float(match.group(1))

    statuses = {int(code): int(n) for code, n in
                re.findall(r"\[(\d{3})\]\s+(\d+) responses", text)}
    errors = 0
    if "Error distribution:" in text:  # lines like "  [12]\tPost ...: connection refused"
        tail = text.split("Error distribution:", 1)[1]
        errors = sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]\s", tail, flags=re.M))
    return HeyResult(connections=connections, seconds=number(r"Total:\s+([\d.]+) secs"),
                     requests=sum(statuses.values()),
                     rps=number(r"Requests/sec:\s+([\d.]+)"),
                     p50_ms=1000 * number(r"50% in ([\d.]+) secs"),
                     p99_ms=1000 * number(r"99% in ([\d.]+) secs"),
                     statuses=statuses, errors=errors)


def run_hey(url: str, body: Path, connections: int, duration_s: float,
            timeout_s: int = 20) -> HeyResult:
    """POST ``body`` (JSON) to ``url`` from ``connections`` connections for ``duration_s``.

    Raises:
        HeyError: hey missing or failing.
    """
    cmd = [hey_path(), "-z", f"{duration_s:g}s", "-c", str(connections), "-m", "POST",
           "-T", "application/json", "-D", str(body), "-t", str(timeout_s), url]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=duration_s + timeout_s + 30)
    if proc.returncode != 0:
        raise HeyError(f"hey exited with {proc.returncode}: {proc.stderr[-500:]}")
    return parse_summary(proc.stdout, connections)
