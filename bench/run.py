"""The sweep: per artifact start the server, warm up, run the load levels, measure
accuracy, stop the server — then write the report.

``results.json`` schema (version 1)::

    {"schema_version": 1, "created_at": ISO-8601, "environment": {...},
     "config": {"users", "rates", "duration_s", "warmup_s", "repeats", "processes", "slo",
                "max_accuracy_drop", "host", "data", "eval_samples", "reference"},
     "artifacts": [{
        "name", "path", "task", "format", "precision", "bytes", "manifest_sha256",
        "status": "ok" | "failed" | "crashed", "error": str | null,
        "ready_s": seconds to /readyz, "peak_rss_bytes": server process tree peak RSS,
        "accuracy": null | {"metric", "value", "ci95": [lo, hi], "n", "higher_is_better",
                            "metrics", "drop", "drop_ci95", "agreement"},
        "loads": [{"mode": "closed" | "open", "label", "users", "rate",
                   "status": "ok" | "failed" (a run with no completed request),
                   "error": str | null, "min_requests",
                   "requests", "failures", "failure_rate", "duration_s", "rps",
                   "latency_ms": {"p50", "p90", "p95", "p99", "max", "mean"},
                   "ttft_ms", "itl_ms" (same keys, generation only), "tokens_per_s",
                   "schedule_latency_ms" (open loop: from the scheduled send time),
                   "spread": {"rps": {"min", "max", "n"}, "p95_ms": {"min", "max", "n"}},
                   "repeats": [per-repeat summaries, same keys]}],
        "decode": [decode-bound chat levels (bench/decode.py): the keys of "loads" plus
                   "max_tokens", "output_tokens_per_s", "tokens_per_request", "outcomes",
                   "failures_503", "failures_other"]}],
     "recommendation": {"recommended", "reason", "rejected": {name: reason}, "eligible"}}

Totals over repeats are exact (histograms merged); ``spread`` is the range over repeats.

A load level runs ``duration_s``, then on until ``min_requests`` responses have arrived, at
most ``max_extend_s`` more (a slow server or a busy machine still gives numbers). A level
with a run that completed no request is failed, and so is its artifact (the levels after
it and the accuracy pass are skipped).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.decode import DECODE_MAX_TOKENS, run_decode
from bench.loadgen import LoadError, LoadSpec, level_result, run_locust
from bench.recommend import parse_slo, recommend
from bench.report import write_report
from bench.server import RssSampler, ServerError, ServerProcess
from serve.artifact import MANIFEST_NAME, environment, load_artifact
from serve.errors import ModelpressError

log = logging.getLogger(__name__)
Progress = Callable[[str, int], None]  # (message, steps done since last call)


@dataclass
class BenchConfig:
    """What to measure and how hard.

    Attributes:
        artifacts: Artifact folders, benchmarked in order (the reference first).
        out: Output folder for results.json, results.csv, report.md, pareto.png.
        data: Eval data file (JSONL/CSV/TSV) replayed by the users and scored.
        text_field: Text column of ``data``.
        label_field: Label column of ``data`` (classification).
        eval_samples: Examples used (load inputs and accuracy pass).
        users: Closed-loop concurrency levels.
        rates: Open-loop arrival rates (requests/s).
        duration_s: Seconds per load level and repeat (at least; see ``min_requests``).
        min_requests: Responses a load level run waits for past ``duration_s``.
        max_extend_s: Longest wait for them (then a run with none fails its artifact).
        warmup_s: Warm-up seconds per artifact (not counted).
        repeats: Runs per load level.
        processes: Locust ``--processes`` (None: one process).
        slo: SLO string, e.g. ``p95<200ms``.
        max_accuracy_drop: Allowed accuracy drop vs the reference (None: no gate).
        host: Benchmark this running server instead of starting one (one artifact, or
            none: any OpenAI-compatible server, decode-bound levels only).
        reference: Artifact name accuracy drops are measured against (default: first).
        max_new_tokens: Generation length.
        server_args: Extra ``modelpress serve`` options (e.g. ``--max-batch-size 16``).
        ready_timeout_s: How long a server may take to become ready.
        decode_users: Decode-bound chat levels (concurrent streams; bench/decode.py).
        decode_max_tokens: ``max_tokens`` of every decode-bound request.
        name: Report name of a ``host`` benchmarked without an artifact.
    """

    artifacts: list[Path]
    out: Path
    data: Path | None = None
    text_field: str = "text"
    label_field: str | None = "label"
    eval_samples: int | None = 200
    users: list[int] = field(default_factory=lambda: [1, 8, 32])
    rates: list[float] = field(default_factory=list)
    duration_s: float = 30.0
    min_requests: int = 10
    max_extend_s: float = 60.0
    warmup_s: float = 10.0
    repeats: int = 2
    processes: int | None = None
    slo: str | None = "p95<200ms"
    max_accuracy_drop: float | None = 0.01
    host: str | None = None
    reference: str | None = None
    max_new_tokens: int = 32
    server_args: list[str] = field(default_factory=list)
    ready_timeout_s: float = 180.0
    decode_users: list[int] = field(default_factory=list)
    decode_max_tokens: int = DECODE_MAX_TOKENS
    name: str | None = None

    def steps_per_artifact(self) -> int:
        """Progress steps per artifact: start, warm-up, each load run, accuracy."""
        return 3 + self.repeats * (len(self.users) + len(self.rates) + len(self.decode_users))


def load_specs(config: BenchConfig) -> list[LoadSpec]:
    """The load levels in order: closed loop per user count, then open loop per rate."""
    bounds = {"min_requests": config.min_requests, "max_extend_s": config.max_extend_s}
    specs = [LoadSpec("closed", u, config.duration_s, processes=config.processes, **bounds)
             for u in config.users]
    open_users = max(1, config.processes or 1)
    specs += [LoadSpec("open", open_users, config.duration_s, rate=r,
                       processes=config.processes, **bounds) for r in config.rates]
    return specs


def _write_inputs(texts: list[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def artifact_names(paths: list[Path]) -> list[str]:
    """Report names: the folder name, or ``parent/folder`` where folder names repeat."""
    short = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if short.count(p.name) > 1 else p.name for p in paths]


def _artifact_entry(path: Path | None, name: str) -> dict[str, Any]:
    if path is None:  # a running server without an artifact (e.g. a peer)
        return {"name": name, "path": None, "task": "text-generation", "format": "external",
                "precision": None, "bytes": None, "manifest_sha256": None, "status": "ok",
                "error": None, "ready_s": None, "peak_rss_bytes": None, "accuracy": None,
                "loads": [], "decode": []}
    manifest = load_artifact(path, verify=False).manifest
    digest = hashlib.sha256((path / MANIFEST_NAME).read_bytes()).hexdigest()
    return {"name": name, "path": str(path),
            "task": manifest.task, "format": manifest.format, "precision": manifest.precision,
            "bytes": manifest.total_bytes, "manifest_sha256": digest, "status": "ok",
            "error": None, "ready_s": None, "peak_rss_bytes": None, "accuracy": None,
            "loads": [], "decode": []}


def bench_artifact(config: BenchConfig, path: Path | None, name: str, examples: list | None,
                   inputs: Path, reference: Any | None, progress: Progress,
                   is_reference: bool) -> tuple[dict[str, Any], Any]:
    """Benchmark one artifact; never raises for a server problem (it is recorded).

    Returns:
        ``(entry, predictions)``: the results.json entry and the accuracy-pass predictions
        (None when accuracy was not measured).
    """
    entry = _artifact_entry(path, name)
    work = config.out / "runs" / name.replace("/", "_")
    steps_left = config.steps_per_artifact()
    server = sampler = None
    preds = None
    try:
        if config.host:
            url = config.host.rstrip("/")
        else:
            progress(f"{name}: starting server", 0)
            server = ServerProcess(path, work / "server.log", config.server_args)
            sampler = RssSampler(server.pid)
            sampler.start()
            entry["ready_s"] = server.wait_ready(config.ready_timeout_s)
            url = server.url
        progress(f"{name}: warming up", 1)
        steps_left -= 1
        eval_levels = bool(config.users or config.rates)
        if config.warmup_s > 0 and eval_levels:  # decode-only: run_decode warms up itself
            run_locust(LoadSpec("closed", max(config.users or [1]), config.warmup_s), url,
                       inputs, entry["task"], work / "warmup", config.max_new_tokens)
        progress(f"{name}: load", 1)
        steps_left -= 1
        for spec in load_specs(config):
            runs = []
            for i in range(config.repeats):
                progress(f"{name}: {spec.label}, run {i + 1}/{config.repeats}", 0)
                runs.append(run_locust(spec, url, inputs, entry["task"], work / "load",
                                       config.max_new_tokens))
                if server and not server.alive():
                    raise ServerError(f"server crashed during {spec.label}:\n"
                                      f"{server.log_tail()}")
                progress(f"{name}: {spec.label}, run {i + 1}/{config.repeats}", 1)
                steps_left -= 1
            level = level_result(spec, runs)
            entry["loads"].append(level)
            if level["status"] == "failed":
                raise LoadError(level["error"])
        if config.decode_users:
            entry["decode"] = run_decode(
                url, config.decode_users, config.duration_s, work, config.decode_max_tokens,
                config.repeats, warmup_s=0 if eval_levels else config.warmup_s,
                progress=lambda message, steps: progress(f"{name}: {message}", steps))
            steps_left -= config.repeats * len(config.decode_users)
        if examples and path is not None:
            from bench.accuracy import accuracy_pass

            progress(f"{name}: accuracy pass ({len(examples)} examples)", 0)
            entry["accuracy"], preds = accuracy_pass(
                url, entry["task"], examples, None if is_reference else reference,
                config.max_new_tokens)
            if is_reference and entry["accuracy"]:
                entry["accuracy"].update(drop=0.0, agreement=1.0)
    except (ModelpressError, OSError) as exc:
        crashed = server is not None and entry["ready_s"] is not None and not server.alive()
        entry["status"] = "crashed" if crashed else "failed"
        entry["error"] = str(exc).splitlines()[0]
        log.error("%s: %s", name, exc)
    finally:
        if server is not None:
            server.stop()
        if sampler is not None:
            entry["peak_rss_bytes"] = sampler.stop() or None
        progress(f"{name}: done ({entry['status']})", steps_left)
    return entry, preds


def run_bench(config: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the whole sweep and write the four outputs into ``config.out``.

    Args:
        config: The sweep.
        progress: Called with a message and the number of steps just finished.

    Returns:
        The results dict (also written as ``results.json``).

    Raises:
        ModelpressError: Bad options (SLO, data file, artifact folder, --host with several
            artifacts) before anything starts.
    """
    progress = progress or (lambda message, steps: log.info(message))
    slo = parse_slo(config.slo)
    if config.host and len(config.artifacts) > 1:
        raise ModelpressError("--host benchmarks one running server: pass one ARTIFACT at most")
    if not config.host and not config.artifacts:
        raise ModelpressError("ARTIFACT: pass at least one artifact folder (or --host URL)")
    if not config.users and not config.rates and not config.decode_users:
        raise ModelpressError("--users, --rate and --decode-users are all empty: nothing to "
                              "measure")
    for path in config.artifacts:
        load_artifact(path, verify=False)  # fail fast on a missing or broken manifest
    examples = None
    texts = ["a quiet, moving film", "the plot never comes together"]
    if config.data:
        from compress.data import load_examples
        from compress.recipe import DataFile

        fields = {"path": config.data, "text": config.text_field}
        if config.label_field != "label":  # the default column may be absent (generation)
            fields["label"] = config.label_field
        spec = DataFile(**fields)
        examples = load_examples(spec, limit=config.eval_samples)
        texts = [e.text for e in examples]
    inputs = _write_inputs(texts, config.out / "runs" / "inputs.jsonl")
    named: list[tuple[Path | None, str]] = list(
        zip(config.artifacts, artifact_names(config.artifacts), strict=True))
    if not named:
        named = [(None, config.name or config.host)]
    if config.reference:
        ref = [(p, n) for p, n in named if config.reference in (n, str(p))]
        if not ref:
            raise ModelpressError(f"--reference {config.reference!r} is not one of the artifacts")
        named.remove(ref[0])
        named.insert(0, ref[0])
    results: dict[str, Any] = {
        "schema_version": 1, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        "config": {**{k: v for k, v in asdict(config).items() if k not in ("artifacts", "out")},
                   "reference": named[0][1], "data": str(config.data) if config.data else None},
        "artifacts": []}
    reference_preds = None
    for i, (path, name) in enumerate(named):
        entry, preds = bench_artifact(config, path, name, examples, inputs, reference_preds,
                                      progress, is_reference=i == 0)
        if i == 0:
            reference_preds = preds
        results["artifacts"].append(entry)
    results["recommendation"] = recommend(results["artifacts"], slo, config.max_accuracy_drop)
    write_report(results, config.out)
    return results


__all__ = ["BenchConfig", "LoadError", "run_bench"]
