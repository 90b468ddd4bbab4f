"""Variants: deployable artifacts built from the reference (the last stage's output).

``build_variant`` looks up the variant's registered method (``registry.py``; the built-in
ones are in ``methods.py``), checks the variant against the task and the machine with the
method's ``plan``, builds it atomically into ``OUT/<name>/`` with the method's ``build``
(ONNX export, ONNX Runtime quantization, onnxruntime-genai builder, bitsandbytes),
checks it against torch where a check is exact enough to fail on, evaluates it on
``data.eval`` through ``serve.runtime.loader.load_runtime`` (the same code the server runs)
against the reference's predictions, and records the gate verdict.

Any failure is raised as one ``VariantFailed`` from the original exception, so the
pipeline records it and builds the other variants.

A variant is reused when its cache key (variant config, method version, reference files,
eval and calibration data, gates) equals the one in its manifest. The fp32 ONNX export that
the ONNX quantizers start from is built once per reference into ``OUT/.cache/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.errors import VariantFailed
from compress.recipe import Recipe
from compress.stages import registry
from serve.artifact import (
    ArtifactError,
    Manifest,
    atomic_dir,
    load_artifact,
    save_manifest,
    sha256_file,
    tree_digest,
    write_manifest,
)
from serve.runtime.loader import check_format

log = logging.getLogger(__name__)

VARIANT_VERSION = 2
WEIGHT_SUFFIXES = (".onnx", ".data", ".onnx_data", ".safetensors")
_reference_predictions: dict[str, Any] = {}

__all__ = ["VariantFailed", "build_variant", "variant_plan"]


def variant_plan(recipe: Recipe, variant: Any) -> tuple[str, str]:
    """Check a variant against the recipe and machine; return its (format, precision).

    The check is the registered method's ``plan`` (``compress/stages/methods.py``); the
    format it plans must be one a runtime serves (``serve/runtime/loader.py``).

    Raises:
        compress.stages.variant_inputs.VariantError: naming the variant and what to change.
        ArtifactError: The method plans a format no runtime serves.
    """
    fmt, precision = registry.method_of(variant).plan(recipe, variant)
    return check_format(fmt, f"variant {variant.name}"), precision


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _file_digest(path: Path | None) -> str | None:
    return sha256_file(path) if path is not None and path.is_file() else None


def _cache_key(recipe: Recipe, variant: Any, reference: Manifest) -> str:
    data = recipe.data
    parts = [VARIANT_VERSION, registry.method_of(variant).version,
             variant.model_dump(mode="json"), recipe.task,
             tree_digest(reference.files), recipe.gates.model_dump(mode="json")]
    for spec in (data.eval, data.calibration):
        parts.append(None if spec is None else
                     [spec.model_dump(mode="json", exclude={"path"}), _file_digest(spec.path)])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def build_variant(recipe: Recipe, variant: Any, reference_dir: Path, dst: Path,
                  report: Callable[[str], None] = lambda m: None) -> Manifest:
    """Build, check, evaluate and gate one variant into ``dst`` (atomically).

    Args:
        recipe: The validated recipe.
        variant: An ``ExportVariant`` or ``QuantizeVariant`` from ``recipe.variants``.
        reference_dir: The reference artifact (last stage output).
        dst: ``OUT/<variant name>``.
        report: Progress callback.

    Returns:
        The variant's manifest (gate verdict included; a failed gate is kept and marked).

    Raises:
        ModelpressError: The variant cannot be built; the message names it and the fix.
    """
    try:
        method = registry.method_of(variant)
        fmt, precision = variant_plan(recipe, variant)
        reference = load_artifact(reference_dir).manifest
        key = _cache_key(recipe, variant, reference)
        try:
            cached = load_artifact(dst).manifest
            if cached.lineage.get("cache_key") == key:
                report(f"unchanged, reusing {dst}")
                return cached
        except ArtifactError:
            pass
        return _build(recipe, variant, method, fmt, precision, reference_dir, reference,
                      key, dst, report)
    except Exception as exc:  # a variant that fails must not stop the others
        log.debug("variant %s failed", variant.name, exc_info=True)
        raise VariantFailed(variant.name, exc) from exc


def _build(recipe: Recipe, variant: Any, method: registry.Method, fmt: str, precision: str,
           reference_dir: Path, reference: Manifest, key: str, dst: Path,
           report: Callable[[str], None]) -> Manifest:
    """Build, evaluate and gate one variant whose plan and cache check passed."""
    start = time.perf_counter()
    with atomic_dir(dst) as tmp:
        options = getattr(variant, "options", None) or variant
        details = method.build(registry.BuildContext(
            recipe, variant, options, reference_dir, reference, tmp, report))
        step = {"kind": variant.kind, "name": variant.name, "method": method.name,
                "method_version": method.version,
                "config": variant.model_dump(mode="json"),
                "seconds": round(time.perf_counter() - start, 3), "details": details}
        manifest = write_manifest(tmp, Manifest(
            name=variant.name, task=recipe.task, format=fmt, precision=precision,
            lineage={"cache_key": key, "reference": str(reference_dir),
                     "inputs": reference.lineage.get("inputs", []),
                     "recipe": recipe.name,
                     "stages": [*reference.lineage.get("stages", []), step]}))
        metrics: dict[str, Any] = {"bytes": manifest.total_bytes,
                                   "weight_bytes": _weight_bytes(tmp),
                                   "reference_weight_bytes": _weight_bytes(reference_dir)}
        for part in ("check", "linear4bit_check"):
            if part in details:
                metrics[part] = details[part]
        if "export" in details:
            metrics["export_check"] = details["export"].get("check")
        from compress.stages.gates import evaluate_variant, gate_verdict

        evaluation = evaluate_variant(recipe, tmp, reference_dir, _reference_predictions,
                                      report)
        metrics.update(evaluation.pop("metrics", {}))
        manifest.metrics = metrics
        manifest.eval = evaluation
        manifest.gate = gate_verdict(variant.gates or recipe.gates, metrics)
        save_manifest(tmp, manifest)
    return manifest
