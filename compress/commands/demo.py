"""`modelpress demo`: the real fine-tuned model end to end (see compress/demo/run.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def command(
    task: Annotated[str, typer.Option(help="classification or generation.")] = "classification",
    quick: Annotated[bool, typer.Option(
        help="Reduced run (fewer training steps, shorter load levels).")] = False,
    out: Annotated[Path, typer.Option(help="Output folder (cached between runs).")] = Path(
        "demo-output"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Fine-tune a real model with LoRA, compress it, serve and benchmark every variant."""
    import logging

    from rich.console import Console
    from rich.logging import RichHandler

    from compress.demo.run import run_demo

    console = Console(stderr=True, log_path=False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    for name in ("bitsandbytes", "kernels", "transformers", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    report_path = run_demo(task, quick, out, lambda message: console.log(message))
    print(report_path.read_text())
    print(f"report: {report_path}")
    print(f"plot:   {report_path.parent / 'pareto.png'}")
