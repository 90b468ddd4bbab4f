"""`modelpress eval`: score artifacts on a dataset, with CIs and a paired reference
comparison, and record the results in each artifact's manifest under ``eval``."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from serve.errors import ModelpressError

log = logging.getLogger(__name__)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt(v, digits) for v in value) + "]"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def short_names(paths: list[str]) -> list[str]:
    """The fewest trailing path parts that tell the artifacts apart (``a/merge``, ``b/merge``)."""
    parts = [Path(p).parts for p in paths]
    longest = max((len(x) for x in parts), default=1)
    for depth in range(1, longest + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return list(paths)


def _table(results: dict[str, dict[str, Any]], data: Path, reference: Path | None) -> Table:
    title = f"eval on {data.name}" + (f" (reference: {reference})" if reference else "")
    table = Table(title=title)
    for column in ("artifact", "n", "metric", "value [95% CI]", "drop vs ref [95% CI]",
                   "agreement", "KL"):
        table.add_column(column, justify="left" if column in ("artifact", "metric") else "right")
    for name, r in zip(short_names(list(results)), results.values(), strict=True):
        ref = r.get("reference") or {}
        drop = (f"{_fmt(ref.get('metric_drop'))} {_fmt(ref.get('drop_ci95'))}"
                if ref else "-")
        table.add_row(name, str(r["n"]), r["metric"],
                      f"{_fmt(r['value'])} {_fmt(r['ci95'])}", drop,
                      _fmt(ref.get("agreement")), _fmt(ref.get("kl"), 5))
    return table


def _record(folder: Path, key: str, result: dict[str, Any]) -> None:
    """Store ``result`` under ``manifest.eval[key]`` (atomic rewrite of manifest.json only)."""
    from serve.artifact import read_manifest, save_manifest

    manifest = read_manifest(folder)
    manifest.eval[key] = result
    save_manifest(folder, manifest)


def command(
    artifacts: Annotated[list[Path], typer.Argument(help="Artifact folders to evaluate.")],
    data: Annotated[Path, typer.Option(help="Eval data: JSONL, CSV/TSV or .txt "
                                            "(optionally .gz/.bz2).")],
    reference: Annotated[Path | None, typer.Option(
        help="Reference artifact: agreement, KL and metric drop are measured against it.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Use the first N examples.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    text: Annotated[str | None, typer.Option(
        "--text", help="Text/prompt field of --data (default: text, else prompt...).")] = None,
    label: Annotated[str | None, typer.Option(
        "--label", help="Label field of --data (default: label, if present).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per model call.")] = 32,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    save: Annotated[bool, typer.Option(help="Store results in each manifest.")] = True,
) -> None:
    """Score artifacts on a dataset: metric with 95% CI, drop vs a reference, agreement."""
    from compress.data import file_digest, load_examples
    from compress.evaluate import predict, score
    from compress.recipe import DataFile
    from serve.runtime.loader import load_runtime

    if device not in ("auto", "cpu", "cuda"):
        raise ModelpressError(f"--device: expected auto, cpu or cuda, got {device!r}")
    if not data.is_file():
        raise ModelpressError(f"--data: no such file: {data}")
    fields = {k: v for k, v in (("text", text), ("label", label)) if v is not None}
    examples = load_examples(DataFile(path=data.resolve(), **fields), limit=limit)
    progress = sys.stderr.isatty()
    kwargs = {"batch_size": batch_size, "progress": progress}
    ref_pred, ref_task = None, None
    if reference is not None:
        ref_rt = load_runtime(reference, device=device)
        ref_task = ref_rt.manifest.task
        log.info("predicting with the reference %s", reference)
        ref_pred = predict(ref_rt, examples, **kwargs)
        del ref_rt
    digest = file_digest(data)
    results: dict[str, dict[str, Any]] = {}
    for folder in artifacts:
        runtime = load_runtime(folder, device=device)
        task = runtime.manifest.task
        if ref_task is not None and ref_task != task:
            raise ModelpressError(f"{folder}: a {task} artifact cannot be compared with the "
                                  f"{ref_task} reference {reference}")
        started = time.perf_counter()
        result = score(task, examples, predict(runtime, examples, **kwargs), ref_pred, seed=seed)
        result.update({"data": str(data.resolve()), "data_sha256": digest, "limit": limit,
                       "reference_artifact": str(reference.resolve()) if reference else None,
                       "device": runtime.device, "seed": seed,
                       "seconds": round(time.perf_counter() - started, 3),
                       "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        del runtime
        if save:
            _record(Path(folder), data.name, result)
        results[str(folder)] = result
    if json_out:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    else:
        console = Console()
        if not console.is_terminal:  # piped/captured: don't wrap the table at 80 columns
            console = Console(width=160)
        console.print(_table(results, data, reference))
