"""The ``modelpress`` command. Heavy libraries are imported inside commands only, so
``modelpress --help`` is instant."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from compress.commands import bench as bench_command
from compress.commands import demo as demo_command
from compress.commands import eval as eval_command
from compress.commands import serve as serve_command
from serve.errors import ModelpressError

if TYPE_CHECKING:
    from compress.pipeline import StepRecord

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compress fine-tuned models, serve them, and benchmark them.")
console = Console(log_path=False)
err_console = Console(stderr=True)

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")]


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(message)s", handlers=[RichHandler(console=err_console,
                                                                    show_path=False)])
    # bitsandbytes warns on import about optional "kernels" (offline: its own CPU kernel is
    # used, see serve/runtime/runtime_torch.py); transformers/peft are chatty.
    for name in ("bitsandbytes", "kernels", "transformers", "peft", "accelerate", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # peft 0.21 reads this transformers 5 property on every adapter load
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _headline(metrics: dict) -> str:
    parts = []
    if isinstance(metrics.get("metric"), str) and isinstance(metrics.get("value"), int | float):
        ci = metrics.get("ci95") or []
        ci_text = f" [{ci[0]:.3g}, {ci[1]:.3g}]" if len(ci) == 2 else ""
        parts.append(f"{metrics['metric']}={metrics['value']:.4g}{ci_text}")
    for key in ("max_abs_diff", "top1_agreement", "agreement", "accuracy", "metric_drop"):
        if isinstance(metrics.get(key), int | float):
            parts.append(f"{key}={metrics[key]:.4g}")
    return " ".join(parts)


@app.command()
def compress(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    out: Annotated[Path, typer.Option(help="Output folder for the artifacts.")] = Path(
        "artifacts"),
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a recipe key, e.g. --set stages[1].student_layers=3.")] = None,
    verbose: Verbose = False,
) -> None:
    """Run a recipe: merge → distill → variants, each written as an artifact with a manifest."""
    _setup_logging(verbose)
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe

    parsed = load_recipe(recipe, set_ or [])
    with console.status(f"compressing {parsed.name}") as status:
        def report(message: str) -> None:
            status.update(message)
            console.log(message)

        records = run_recipe(parsed, out, report)
    table = Table(title=f"{parsed.name} → {out}")
    for column in ("artifact", "status", "seconds", "size", "fidelity / metrics", "gate"):
        table.add_column(column)
    for r in records:
        note = r.error if r.error else _headline(r.metrics)
        table.add_row(r.name, r.status, f"{r.seconds:.1f}", _fmt_bytes(r.bytes), note,
                      r.gate or "-")
    console.print(table)
    code = exit_code(records, len(parsed.stages))
    if code:
        raise typer.Exit(code)


def exit_code(records: list[StepRecord], n_stages: int) -> int:
    """``modelpress compress``'s exit status for a finished run.

    0: every stage and variant built or reused (a failed gate is reported, not an error).
    1: some variants failed, the others were built. Stages never fail here (a failing
    stage raises, exit 2).

    Raises:
        ModelpressError: Every variant failed: nothing deployable was made (exit 2).
    """
    variants = records[n_stages:]
    failed = [r for r in variants if r.status == "failed"]
    if variants and len(failed) == len(variants):
        raise ModelpressError(f"every variant failed ({len(failed)} of {len(variants)}; "
                              f"first: {failed[0].error}); nothing deployable was built")
    return 1 if failed else 0


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    verify: Annotated[bool, typer.Option(help="Verify file hashes.")] = True,
) -> None:
    """Show an artifact's manifest: what it is, how it was made and what it scores."""
    from serve.artifact import load_artifact

    manifest = load_artifact(artifact, verify=verify).manifest
    if as_json:
        print(manifest.model_dump_json(indent=2))
        return
    table = Table(show_header=False, title=f"{artifact}")
    table.add_row("name", manifest.name)
    table.add_row("task", manifest.task)
    table.add_row("format / precision", f"{manifest.format} / {manifest.precision}")
    table.add_row("files", f"{len(manifest.files)} files, {_fmt_bytes(manifest.total_bytes)}"
                  + (" (sha256 verified)" if verify else ""))
    table.add_row("gate", json.dumps(manifest.gate))
    for key, value in manifest.metrics.items():
        if key != "per_adapter":
            table.add_row(f"metric {key}", f"{value:.6g}" if isinstance(value, float)
                          else str(value))
    for name, result in manifest.eval.items():
        table.add_row(f"eval {name}", json.dumps(result)[:200])
    for step in manifest.lineage.get("stages", []):
        table.add_row(f"stage {step['kind']}", f"{step['seconds']:.1f} s "
                      + _headline(step.get("metrics", {})))
    for item in manifest.lineage.get("inputs", []):
        table.add_row(f"input {item['role']}", f"{item['path']} sha256:{item['sha256'][:12]}")
    packages = manifest.environment.get("packages", {})
    table.add_row("environment", f"python {manifest.environment.get('python')} "
                  + " ".join(f"{k}={v}" for k, v in packages.items()))
    table.add_row("created", manifest.created_at)
    console.print(table)


@app.command()
def tiny(
    out: Annotated[Path, typer.Argument(help="Folder for the tiny models.")] = Path("build/tiny"),
) -> None:
    """Build the tiny random models and LoRA adapters the tiny recipes and tests use."""
    _setup_logging(False)
    from compress.tiny import build_all

    for name, path in build_all(out).items():
        console.print(f"{name}: {path}")


# Each command lives in its own module under compress/commands (imports stay lazy there).
app.command("eval")(eval_command.command)
app.command("serve")(serve_command.command)
app.command("bench")(bench_command.command)
app.command("demo")(demo_command.command)


def _quiet_transformers() -> None:
    """No "Loading weights" bar (transformers 5 draws one on every model load) and only
    transformers' errors on stderr (e.g. not its one-time notices that a CPU runs the
    reference Qwen3.5 kernels), here and in the serve workers (they inherit the
    environment). transformers reads both variables when it is first imported."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    loaded = sys.modules.get("transformers.utils.logging")  # imported before main() ran
    if loaded is not None and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        loaded.disable_progress_bar()


def main() -> None:
    """Entry point: runs the CLI, turning user errors into one line and exit code 2."""
    _quiet_transformers()
    try:
        code = app(standalone_mode=False)
    except (click.exceptions.ClickException, typer.TyperException) as exc:
        # typer 0.29 parses with its own copy of click: its usage errors (a bad option
        # value) are TyperException subclasses, with click's show() and exit_code
        exc.show()  # type: ignore[union-attr]
        sys.exit(exc.exit_code)  # type: ignore[union-attr]
    except click.exceptions.Abort:
        sys.exit(130)
    except ModelpressError as exc:
        message = " ".join(str(exc).split())
        err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; re-run the same command to resume")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
