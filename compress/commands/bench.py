"""`modelpress bench`: load-test served artifacts with Locust and recommend one."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated

import typer

from serve.errors import ModelpressError


def _numbers(text: str, option: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ModelpressError(f"{option}: expected comma-separated numbers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise ModelpressError(f"{option}: values must be positive, got {text!r}")
    return values


def parse_seconds(text: str, option: str) -> float:
    """``30s``, ``2m``, ``500ms`` or a plain number of seconds → seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise ModelpressError(f"{option}: expected a duration like 30s or 2m, got {text!r}")
    scale = {"ms": 1e-3, "s": 1, None: 1, "m": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) * scale


def command(
    artifacts: Annotated[list[Path] | None, typer.Argument(
        help="Artifact folders (first = reference); none with --host.")] = None,
    data: Annotated[Path | None, typer.Option(
        help="Eval data (JSONL/CSV/TSV): replayed as load and scored for accuracy.")] = None,
    text_field: Annotated[str, typer.Option(help="Text field of --data.")] = "text",
    label_field: Annotated[str, typer.Option(help="Label field of --data.")] = "label",
    eval_samples: Annotated[int, typer.Option(help="Examples of --data to use.")] = 200,
    users: Annotated[str, typer.Option(
        help="Closed-loop user counts replaying --data ('' for none).")] = "1,8,32",
    decode_users: Annotated[str, typer.Option(
        help="Decode-bound chat levels: concurrent streams of long answers, e.g. 1,8,32 "
             "(streaming /v1/chat/completions; none by default).")] = "",
    decode_max_tokens: Annotated[int, typer.Option(
        min=1, help="max_tokens of every decode-bound request.")] = 128,
    rate: Annotated[str, typer.Option(
        help="Open-loop arrival rates in requests/s, e.g. 5,20 (none by default).")] = "",
    duration: Annotated[str, typer.Option(help="Run time per load level.")] = "30s",
    min_requests: Annotated[int, typer.Option(
        min=0, help="Past --duration, a load level runs on until this many responses have "
                    "arrived (at most --max-extend more); one with none fails.")] = 10,
    max_extend: Annotated[str, typer.Option(
        help="Longest extension of a load level waiting for --min-requests.")] = "60s",
    warmup: Annotated[str, typer.Option(help="Warm-up per artifact (not counted).")] = "10s",
    repeats: Annotated[int, typer.Option(min=1, help="Runs per load level.")] = 2,
    processes: Annotated[int | None, typer.Option(
        help="Locust worker processes (Locust's --processes).")] = None,
    slo: Annotated[str, typer.Option(help="Latency SLO, e.g. 'p95<200ms,failures<1%'.")] = (
        "p95<200ms"),
    max_accuracy_drop: Annotated[float, typer.Option(
        help="Largest accepted accuracy drop vs the reference.")] = 0.01,
    reference: Annotated[str | None, typer.Option(
        help="Reference artifact name (default: the first).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per generation request.")] = 32,
    serve_option: Annotated[list[str] | None, typer.Option(
        "--serve-option", help="Extra `modelpress serve` option, e.g. --serve-option=--no-batching"
    )] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("bench-results"),
    host: Annotated[str | None, typer.Option(
        help="Benchmark this running server instead of starting one (one ARTIFACT, or none "
             "for any OpenAI-compatible server: decode-bound levels only).")] = None,
    name: Annotated[str | None, typer.Option(
        help="Report name of a --host server given without an ARTIFACT.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Load-test each artifact's server with Locust, score it, and recommend one."""
    from rich.console import Console
    from rich.logging import RichHandler
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from bench.run import BenchConfig, run_bench

    console = Console(stderr=True)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    artifacts = artifacts or []
    config = BenchConfig(
        artifacts=artifacts, out=out, data=data, text_field=text_field,
        label_field=label_field or None, eval_samples=eval_samples,
        users=_numbers(users, "--users", int), rates=_numbers(rate, "--rate", float),
        duration_s=parse_seconds(duration, "--duration"), min_requests=min_requests,
        max_extend_s=parse_seconds(max_extend, "--max-extend"),
        warmup_s=parse_seconds(warmup, "--warmup"), repeats=repeats, processes=processes,
        slo=slo, max_accuracy_drop=max_accuracy_drop, host=host, reference=reference,
        max_new_tokens=max_new_tokens, server_args=serve_option or [],
        decode_users=_numbers(decode_users, "--decode-users", int),
        decode_max_tokens=decode_max_tokens, name=name)
    total = max(1, len(artifacts)) * config.steps_per_artifact()
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("bench", total=total)

        def progress(message: str, steps: int) -> None:
            bar.update(task, description=message, advance=steps)

        results = run_bench(config, progress)
    rec = results["recommendation"]
    stdout = Console()
    table = Table(title="modelpress bench")
    for column in ("artifact", "level", "requests", "failures", "req/s", "p50 ms", "p95 ms",
                   "p99 ms", "accuracy", "drop"):
        table.add_column(column)
    for art in results["artifacts"]:
        acc = art.get("accuracy") or {}
        cells = [f"{acc['value']:.4f}" if acc.get("value") is not None else "–",
                 f"{acc['drop']:.4f}" if acc.get("drop") is not None else "–"]
        if not art["loads"]:
            table.add_row(art["name"], art["status"], "", "", "", "", "", "", *cells)
        for level in art["loads"]:
            lat = level.get("latency_ms") or {}
            table.add_row(art["name"], level["label"], str(level["requests"]),
                          str(level["failures"]), _fmt(level.get("rps")),
                          *(_fmt(lat.get(k), 0) for k in ("p50", "p95", "p99")), *cells)
    stdout.print(table)
    _print_decode(stdout, results["artifacts"])
    if rec["recommended"]:
        stdout.print(f"recommended: [bold]{rec['recommended']}[/bold] — {rec['reason']}")
    else:
        stdout.print(f"[bold]no recommendation[/bold] — {rec['reason']}")
    for name, why in rec["rejected"].items():
        stdout.print(f"  {name}: {why}", markup=False, highlight=False)
    stdout.print(f"wrote {out}/results.json, results.csv, report.md, pareto.png")
    if not rec["recommended"] and (config.users or config.rates):
        raise typer.Exit(1)


def _print_decode(stdout, artifacts: list[dict]) -> None:
    """The decode-bound levels: output tok/s, TTFT/ITL p50/p95/p99, 503s vs others."""
    from rich.table import Table

    if not any(art.get("decode") for art in artifacts):
        return
    table = Table(title="decode-bound chat load (ms: p50 / p95 / p99)")
    for column in ("artifact", "streams", "tok/stream", "output tok/s", "TTFT ms", "ITL ms",
                   "503", "other failures"):
        table.add_column(column)
    for art in artifacts:
        for lv in art.get("decode") or []:
            table.add_row(art["name"], str(lv["users"]), _fmt(lv.get("tokens_per_request")),
                          _fmt(lv.get("output_tokens_per_s")),
                          *(" / ".join(_fmt((lv.get(key) or {}).get(p), 0)
                                       for p in ("p50", "p95", "p99"))
                            for key in ("ttft_ms", "itl_ms")),
                          str(lv.get("failures_503")), str(lv.get("failures_other")))
    stdout.print(table)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
