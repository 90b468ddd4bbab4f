"""What every stage shares: its context, its result and the stage versions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from compress.recipe import Recipe


@dataclass
class StageContext:
    """What a stage may read besides its input folder.

    Attributes:
        recipe: The validated recipe.
        index: Position of the stage in ``recipe.stages``.
        report: Callback for a short progress message shown by the CLI.
    """

    recipe: Recipe
    index: int = 0
    report: Callable[[str], None] = lambda message: None


@dataclass
class StageResult:
    """What a stage reports back to the pipeline for the manifest.

    Attributes:
        metrics: Fidelity numbers (max abs diff, agreement, ...).
        precision: Weight precision of the output.
        format: ``torch`` or ``onnx``.
        details: Extra lineage facts (which base was used, adapter weights, ...).
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    format: str = "torch"
    details: dict[str, Any] = field(default_factory=dict)


#: Bumped when a stage's behaviour changes so old cached outputs are not reused.
STAGE_VERSIONS: dict[str, int] = {"merge": 1, "distill": 1}
