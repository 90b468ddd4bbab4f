"""Fidelity of a variant against the reference on ``data.eval``, and its gate verdict.

Both models run through ``serve.runtime.loader.load_runtime`` and ``compress.evaluate`` — the
code the server and ``modelpress eval`` use. The reference is predicted once per run and
eval file; every variant is compared with those predictions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.recipe import Recipe
from compress.recipe_sections import Gates
from serve.artifact import sha256_file

log = logging.getLogger(__name__)


def evaluate_variant(recipe: Recipe, folder: Path, reference_dir: Path,
                     cache: dict[str, Any], report: Callable[[str], None]) -> dict[str, Any]:
    """Evaluate the variant in ``folder`` against the reference on ``recipe.data.eval``.

    Args:
        recipe: The recipe (its ``data.eval`` and task).
        folder: The variant folder (manifest already written).
        reference_dir: The reference artifact.
        cache: Reference predictions by (reference, eval file) — filled on first use.
        report: Progress callback.

    Returns:
        ``{"metrics": flat headline numbers, <eval file name>: full score}``; only
        ``{"metrics": {}}`` when the recipe has no eval data.
    """
    spec = recipe.data.eval
    if spec is None:
        return {"metrics": {}}
    from compress.data import load_examples
    from compress.evaluate import predict, score
    from serve.runtime.loader import load_runtime

    examples = load_examples(spec, limit=spec.samples)
    key = f"{reference_dir}|{sha256_file(spec.path)}|{spec.model_dump_json()}"
    if key not in cache:
        report(f"evaluating the reference on {len(examples)} examples of {spec.path.name}")
        reference = load_runtime(reference_dir)
        cache[key] = predict(reference, examples, progress=False)
        del reference
    report(f"evaluating on {len(examples)} examples of {spec.path.name}")
    runtime = load_runtime(folder)
    predictions = predict(runtime, examples, progress=False)
    result = score(recipe.task, examples, predictions, reference=cache[key])
    ref = result.get("reference", {})
    metrics = {"n": result["n"], "metric": result["metric"], "value": result["value"],
               "ci95": result["ci95"], "higher_is_better": result["higher_is_better"],
               "agreement": ref.get("agreement"), "kl": ref.get("kl"),
               "metric_drop": ref.get("metric_drop"), "drop_ci95": ref.get("drop_ci95"),
               "eval_device": getattr(runtime, "device", None)}
    return {"metrics": metrics, spec.path.name: result}


def gate_verdict(gates: Gates, metrics: dict[str, Any]) -> dict[str, Any]:
    """``passed`` / ``failed`` against the recipe's gates, with the reasons for a failure.

    ``not-evaluated`` when there is nothing to judge (no eval data in the recipe).
    """
    agreement, drop = metrics.get("agreement"), metrics.get("metric_drop")
    if agreement is None and drop is None:
        return {"verdict": "not-evaluated",
                "reasons": ["the recipe has no data.eval: nothing to compare"]}
    reasons = []
    if agreement is not None and agreement < gates.min_agreement:
        reasons.append(f"agreement {agreement:.4f} < min_agreement {gates.min_agreement:g}")
    if drop is not None and drop > gates.max_metric_drop:
        reasons.append(f"{metrics.get('metric', 'metric')} drop {drop:.4f} > "
                       f"max_metric_drop {gates.max_metric_drop:g}")
    return {"verdict": "failed" if reasons else "passed", "reasons": reasons,
            "min_agreement": gates.min_agreement, "max_metric_drop": gates.max_metric_drop}
