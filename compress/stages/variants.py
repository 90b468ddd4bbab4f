"""Variants: deployable artifacts built from the reference (the last stage's output).

``build_variant`` validates the variant against the task and the machine, builds it
atomically into ``OUT/<name>/`` (ONNX export, ONNX Runtime quantization, onnxruntime-genai
builder, bitsandbytes), checks it against torch where a check is exact enough to fail on,
evaluates it on ``data.eval`` through ``serve.runtimes.load_runtime`` (the same code the
server runs) against the reference's predictions, and records the gate verdict.

A variant is reused when its cache key (variant config, reference files, eval and
calibration data, gates) equals the one in its manifest. The fp32 ONNX export that the
ONNX quantizers start from is built once per reference into ``OUT/.cache/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.errors import InputError, StageFailed
from compress.recipe import ExportVariant, QuantizeVariant, Recipe
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
from serve.errors import ModelpressError

log = logging.getLogger(__name__)

VARIANT_VERSION = 1
ONNX_METHODS = ("int8-dynamic", "int8-static", "int4-weight-only")
WEIGHT_SUFFIXES = (".onnx", ".data", ".onnx_data", ".safetensors")
#: Export check tolerance, relative to the largest reference logit (at least 1).
FP32_TOLERANCE = 1e-3
GENAI_FP32_LOGPROB_TOL = 0.02

_reference_predictions: dict[str, Any] = {}


class VariantError(InputError):
    """A variant cannot be built as declared (task, method, data or device)."""


def cuda_available() -> bool:
    """True when torch sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def variant_plan(recipe: Recipe, variant: Any) -> tuple[str, str]:
    """Check a variant against the recipe and machine; return its (format, precision).

    Raises:
        VariantError: naming the variant and what to change.
    """
    name, task = variant.name, recipe.task
    if isinstance(variant, ExportVariant):
        if variant.format == "onnx":
            if variant.precision not in ("fp32", "fp16"):
                raise VariantError(f"variant {name}: format onnx exports fp32 or fp16; for "
                                   f"{variant.precision} use kind: quantize with method "
                                   "int8-dynamic/int4-weight-only")
            return "onnx", variant.precision
        if task != "text-generation":
            raise VariantError(f"variant {name}: format onnx-genai is for text-generation "
                               f"models, this recipe is {task}; use format: onnx")
        if variant.device == "cuda" and not cuda_available():
            raise VariantError(f"variant {name}: device cuda asked for but no CUDA GPU is "
                               "available here; use device: cpu (fp32/int8/int4)")
        if variant.precision == "fp16" and variant.device != "cuda":
            raise VariantError(f"variant {name}: onnx-genai fp16 is a GPU-only option "
                               "(device: cuda); on CPU use precision fp32, int8 or int4")
        if variant.precision == "int8" and variant.device == "cuda":
            raise VariantError(f"variant {name}: onnx-genai int8 is built for CPU only; "
                               "use int4 or fp16 for cuda")
        return "onnx-genai", variant.precision
    assert isinstance(variant, QuantizeVariant)
    if variant.method == "int8-static":
        if task == "text-generation":
            raise VariantError(f"variant {name}: method int8-static is not available for "
                               "text-generation (the KV-cache graph is not calibrated); use "
                               "int8-dynamic, int4-weight-only or format onnx-genai")
        if recipe.data.calibration is None:
            raise VariantError(f"variant {name}: method int8-static needs calibration data; "
                               "add data.calibration: {path: FILE, samples: 128} to the "
                               "recipe (representative texts)")
    if variant.method in ONNX_METHODS:
        return "onnx", variant.method
    return "torch", variant.method


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _file_digest(path: Path | None) -> str | None:
    return sha256_file(path) if path is not None and path.is_file() else None


def _cache_key(recipe: Recipe, variant: Any, reference: Manifest) -> str:
    data = recipe.data
    parts = [VARIANT_VERSION, variant.model_dump(mode="json"), recipe.task,
             tree_digest(reference.files), recipe.gates.model_dump(mode="json")]
    for spec in (data.eval, data.calibration):
        parts.append(None if spec is None else
                     [spec.model_dump(mode="json", exclude={"path"}), _file_digest(spec.path)])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def fp32_onnx(reference_dir: Path, reference: Manifest, out: Path,
              report: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The checked fp32 ONNX export of the reference, built once into ``OUT/.cache``."""
    from compress.stages import export

    folder = out / ".cache" / f"onnx-fp32-{tree_digest(reference.files)[:16]}"
    record = folder / "export.json"
    if record.is_file():
        return folder, json.loads(record.read_text())
    report("exporting the reference to ONNX fp32 (optimum)")
    with atomic_dir(folder) as tmp:
        details = export.export_onnx(reference_dir, tmp, reference.task)
        report("checking ONNX Runtime against torch")
        if reference.task == "text-classification":
            details["check"] = export.check_classifier(reference_dir, tmp, FP32_TOLERANCE)
        else:
            details["check"] = export.check_causal_lm(reference_dir, tmp, FP32_TOLERANCE)
        (tmp / "export.json").write_text(json.dumps(details, indent=2))
    return folder, details


def _build_files(recipe: Recipe, variant: Any, fmt: str, reference_dir: Path,
                 reference: Manifest, dst: Path, report: Callable[[str], None]) -> dict:
    """Write the variant's model files into ``dst``; return details for the manifest."""
    from compress.stages import export, quantize

    if fmt == "torch":
        report(f"quantizing with bitsandbytes ({variant.method})")
        return quantize.bnb_quantize(reference_dir, dst, recipe.task, variant.method)
    if fmt == "onnx-genai":
        report(f"building with onnxruntime-genai ({variant.precision}, {variant.device})")
        details = export.build_genai(reference_dir, dst, variant.precision, variant.device,
                                     variant.block_size, variant.symmetric)
        details["check"] = _genai_check(reference_dir, dst, variant.precision)
        return details
    src, details = fp32_onnx(reference_dir, reference, dst.parent, report)
    base = {"export": details}
    if isinstance(variant, ExportVariant) and variant.precision == "fp32":
        export.copy_side_files(src, dst)
        (dst / "model.onnx").write_bytes((src / "model.onnx").read_bytes())
        for data in src.glob("model.onnx*data"):
            (dst / data.name).write_bytes(data.read_bytes())
        (dst / "export.json").unlink(missing_ok=True)
        return base
    if isinstance(variant, ExportVariant):
        report("converting fp32 ONNX to fp16")
        base["fp16"] = export.convert_fp16(src, dst)
        base["fp16"]["note"] = ("fp16 targets the CUDA EP; evaluated here on "
                                + ("CUDA" if cuda_available() else
                                   "the CPU EP (no GPU): accuracy is indicative, speed is not"))
    elif variant.method == "int8-dynamic":
        report("quantizing: int8 dynamic (per-channel)")
        base["quantization"] = quantize.int8_dynamic(src, dst)
    elif variant.method == "int8-static":
        from compress.data import load_examples

        spec = recipe.data.calibration
        texts = [e.text for e in load_examples(spec, limit=spec.samples or 128)]
        report(f"quantizing: int8 static QDQ, {variant.calibration_method} calibration on "
               f"{len(texts)} samples")
        base["quantization"] = quantize.int8_static(src, dst, texts,
                                                    variant.calibration_method)
    else:
        report(f"quantizing: int4 weight-only (MatMulNBits, block {variant.block_size})")
        base["quantization"] = quantize.int4_weight_only(src, dst, variant.block_size,
                                                         variant.symmetric)
    (dst / "export.json").unlink(missing_ok=True)
    return base


def _genai_check(reference_dir: Path, folder: Path, precision: str) -> dict[str, Any]:
    """Next-token log-probs and greedy continuations of the genai model against torch.

    For fp32 the log-probs must agree within ``GENAI_FP32_LOGPROB_TOL`` nats (greedy
    continuations of a deep model can flip on near-ties of fused vs unfused kernels, so
    their identity rate is recorded, not required).
    """
    import numpy as np

    from compress.models import sample_texts
    from compress.stages.export import greedy_torch
    from serve.runtime_genai import GenaiRuntime
    from serve.runtime_torch import TorchRuntime
    from serve.runtimes import GenerationParams

    prompts, n_new = sample_texts(4), 12
    runtime = GenaiRuntime(folder, Manifest(name="check", task="text-generation",
                                            format="onnx-genai", precision=precision), "cpu")
    torch_rt = TorchRuntime(reference_dir, Manifest(name="reference", task="text-generation",
                                                    format="torch", precision="fp32"), "cpu")
    diff = 0.0
    for (ids_t, lp_t), (ids_g, lp_g) in zip(torch_rt.next_token_logprobs(prompts),
                                            runtime.next_token_logprobs(prompts), strict=True):
        if not np.array_equal(ids_t, ids_g):
            raise StageFailed("onnxruntime-genai model tokenizes differently from torch")
        diff = max(diff, float(np.abs(lp_t - lp_g).max()))
    same = 0
    for prompt, ids in zip(prompts, greedy_torch(reference_dir, prompts, n_new), strict=True):
        expected, _, _ = runtime._finish(ids, GenerationParams(max_new_tokens=n_new))
        got = runtime.generate([prompt], GenerationParams(max_new_tokens=n_new))[0].text
        same += got == expected
    result = {"max_logprob_diff": diff, "greedy_identical": same / len(prompts),
              "samples": len(prompts), "max_new_tokens": n_new}
    if precision == "fp32" and diff > GENAI_FP32_LOGPROB_TOL:
        raise StageFailed(f"onnxruntime-genai fp32 log-probs differ from torch by {diff:.3g} "
                          f"nats (allowed {GENAI_FP32_LOGPROB_TOL})")
    return result


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
    start = time.perf_counter()
    try:
        with atomic_dir(dst) as tmp:
            details = _build_files(recipe, variant, fmt, reference_dir, reference, tmp,
                                   report)
            step = {"kind": variant.kind, "name": variant.name,
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
    except ModelpressError as exc:
        raise type(exc)(f"variant {variant.name}: {exc}") if not str(exc).startswith(
            "variant ") else exc from None
    except Exception as exc:  # a library failing on this model must not stop the others
        log.debug("variant %s failed", variant.name, exc_info=True)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise StageFailed(f"variant {variant.name}: {type(exc).__name__}: {first}") from exc
    return manifest
