"""Run Locust headless as a subprocess and read its exact totals.

Locust is never imported here: it monkey-patches the process with gevent on import. Each
run is bounded in time (``-t``, plus a hard subprocess timeout).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bench.locust_stats import load_entries, summarize
from serve.errors import ModelpressError

log = logging.getLogger(__name__)
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
_SLACK_S = 60.0  # start-up + shutdown allowance on top of the run time


class LoadError(ModelpressError):
    """Locust could not run or wrote no results."""


@dataclass
class LoadSpec:
    """One Locust run.

    Attributes:
        mode: ``closed`` (N users back to back) or ``open`` (fixed arrival rate).
        users: Concurrent users (closed) or load-generating users (open).
        duration_s: Run time.
        rate: Open loop: total arrival rate in requests/s.
        processes: Locust worker processes (``--processes``; None = one process).
        profile: ``eval`` (the task's route with the eval inputs) or ``chat`` (decode-bound
            streaming chat completions, OpenAI format; see the locustfile).
        stop_timeout_s: Seconds requests in flight may finish after the run time (None:
            ``min(30, max(5, duration))``). Decode-bound levels let every stream finish.
        model: Chat profile: the ``model`` field sent (vLLM checks it).
        extra_body: Chat profile: fields added to every request body (server options).
        connections: Open loop: connections per user (None: the locustfile's 256).
        min_requests: Past ``duration_s`` the run goes on until this many responses have
            arrived (0: it stops at ``duration_s``), at most ``max_extend_s`` more.
        max_extend_s: Cap on that extension, in seconds.
    """

    mode: Literal["closed", "open"]
    users: int
    duration_s: float
    rate: float | None = None
    processes: int | None = None
    profile: Literal["eval", "chat"] = "eval"
    stop_timeout_s: float | None = None
    model: str | None = None
    extra_body: dict[str, Any] | None = None
    connections: int | None = None
    min_requests: int = 0
    max_extend_s: float = 60.0

    @property
    def cap_s(self) -> float:
        """Longest run time: ``duration_s``, plus ``max_extend_s`` when a minimum is set."""
        return self.duration_s + (self.max_extend_s if self.min_requests > 0 else 0.0)

    @property
    def label(self) -> str:
        """Short name of the load level, e.g. ``8 users``, ``5 req/s`` or ``8 streams``."""
        if self.mode == "open":
            return f"{self.rate:g} req/s" + (" chat" if self.profile == "chat" else "")
        noun = "stream" if self.profile == "chat" else "user"
        return f"{self.users} {noun}" + ("s" if self.users != 1 else "")


def _stop_timeout(spec: LoadSpec) -> float:
    """Seconds Locust lets requests in flight finish after the run time (then kills them)."""
    if spec.stop_timeout_s is not None:
        return spec.stop_timeout_s
    return min(30.0, max(5.0, spec.duration_s))


def level_result(spec: LoadSpec, runs: list[list[dict]]) -> dict[str, Any]:
    """A load level's entry of results.json: totals over its runs, the spread over runs
    (requests/s and p95) and each run's own summary.

    A run in which no request completed leaves nothing to measure: the level is then
    ``status: failed`` with the reason in ``error``.
    """
    per_run = [summarize([r]) for r in runs]
    total = summarize(runs)

    def spread(values: list[float | None]) -> dict[str, Any]:
        vals = [v for v in values if v is not None]
        return {"min": min(vals) if vals else None, "max": max(vals) if vals else None,
                "n": len(vals)}

    empty = sum(1 for r in per_run if not r["requests"])
    error = (f"{spec.label}: no request completed in {empty} of {len(runs)} runs "
             f"({spec.cap_s:g} s each)" if empty else None)
    return {"mode": spec.mode, "profile": spec.profile, "label": spec.label,
            "users": spec.users, "rate": spec.rate, "status": "failed" if empty else "ok",
            "error": error, "min_requests": spec.min_requests, **total,
            "spread": {"rps": spread([r["rps"] for r in per_run]),
                       "p95_ms": spread([(r["latency_ms"] or {}).get("p95") for r in per_run])},
            "repeats": per_run}


def locust_command() -> list[str]:
    """The ``locust`` executable next to this Python, else ``python -m locust``."""
    exe = Path(sys.executable).with_name("locust")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("locust")
    return [found] if found else [sys.executable, "-m", "locust"]


def run_locust(spec: LoadSpec, host: str, inputs: Path, task: str, work_dir: Path,
               max_new_tokens: int = 32) -> list[dict[str, Any]]:
    """Run one headless Locust load level against ``host``.

    Args:
        spec: The load level.
        host: Base URL of the server.
        inputs: JSONL of ``{"text": ...}`` lines replayed by the users.
        task: ``text-classification`` or ``text-generation``.
        work_dir: Where the JSON stats and the Locust log go.
        max_new_tokens: Generation length per request.

    Returns:
        Locust's stats entries (see ``bench.locust_stats``).

    Raises:
        LoadError: Locust failed or wrote no stats (with its log tail).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    rate = f"{spec.rate or 0:g}".replace(".", "p")  # Locust appends .json: no dot in the stem
    stem = work_dir / f"locust-{spec.profile}-{spec.mode}-{spec.users}u-{rate}r-{os.getpid()}"
    json_file = stem.with_name(stem.name + ".json")
    json_file.unlink(missing_ok=True)
    user_class = "OpenLoopUser" if spec.mode == "open" else "ClosedLoopUser"
    cmd = [*locust_command(), "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "-u", str(spec.users), "-r", str(spec.users), "-t", f"{spec.cap_s:g}s",
           "--stop-timeout", f"{_stop_timeout(spec):g}", "--host", host, "--json-file",
           str(stem), "--loglevel", "WARNING", "--exit-code-on-error", "0"]
    if spec.processes and spec.processes > 1:
        cmd += ["--processes", str(spec.processes)]
    cmd.append(user_class)
    env = {**os.environ, "MODELPRESS_BENCH_INPUTS": str(inputs), "MODELPRESS_BENCH_TASK": task,
           "MODELPRESS_BENCH_MAX_NEW_TOKENS": str(max_new_tokens),
           "MODELPRESS_BENCH_PROFILE": spec.profile, "MODELPRESS_BENCH_MODEL": spec.model or "",
           "MODELPRESS_BENCH_EXTRA_BODY": json.dumps(spec.extra_body or {}),
           "MODELPRESS_BENCH_CONNECTIONS": str(spec.connections or ""),
           "MODELPRESS_BENCH_MIN_REQUESTS": str(spec.min_requests),
           "MODELPRESS_BENCH_MIN_S": f"{spec.duration_s:g}"}
    if spec.mode == "open":
        if not spec.rate or spec.rate <= 0:
            raise LoadError(f"open loop needs a positive rate, got {spec.rate}")
        env["MODELPRESS_BENCH_USER_RATE"] = str(spec.rate / spec.users)
    log.info("locust %s", " ".join(cmd))
    bound = spec.cap_s + _stop_timeout(spec) + _SLACK_S
    log_path = stem.with_name(stem.name + ".log")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise LoadError(f"locust ran past {bound:.0f} s and was stopped; log {log_path}"
                            ) from None
    if code != 0 or not json_file.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise LoadError(f"locust exited with code {code} ({spec.label}); log {log_path}:\n{tail}")
    return load_entries(json_file)
