"""What several variant methods build from: shared inputs and checks of the reference.

The checked fp32 ONNX export and the fp32 onnxruntime-genai build (both cached once per
reference in ``OUT/.cache``), the calibration texts, the genai-vs-torch check and the error
a method raises for a variant it cannot build. ``methods.py`` and ``quantize.py`` import
them; nothing here imports a method, so the registry stays a leaf.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.errors import InputError, StageFailed
from compress.recipe import Recipe
from compress.stages.registry import BuildContext
from serve.artifact import Manifest, atomic_dir, tree_digest

#: Export check tolerance, relative to the largest reference logit (at least 1).
FP32_TOLERANCE = 1e-3
GENAI_FP32_LOGPROB_TOL = 0.02


class VariantError(InputError):
    """A variant cannot be built as declared (task, method, data or device)."""


def cuda_available() -> bool:
    """True when torch sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def calibration_texts(recipe: Recipe, default: int = 128) -> list[str]:
    """The texts of ``data.calibration`` (its ``samples`` first ones)."""
    from compress.data import load_examples

    spec = recipe.data.calibration
    return [e.text for e in load_examples(spec, limit=spec.samples or default)]


def fp32_onnx(reference_dir: Path, reference: Manifest, out: Path,
              report: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The checked fp32 ONNX export of the reference, built once into ``OUT/.cache``."""
    from compress.stages import export

    folder = (out / ".cache" /
              f"onnx-fp32-{tree_digest(reference.files)[:16]}-v{export.EXPORT_VERSION}")
    record = folder / "export.json"
    if record.is_file():
        return folder, json.loads(record.read_text())
    report("exporting the reference to ONNX fp32")
    with atomic_dir(folder) as tmp:
        details = export.export_onnx(reference_dir, tmp, reference.task)
        report("checking ONNX Runtime against torch")
        if reference.task == "text-classification":
            details["check"] = export.check_classifier(reference_dir, tmp, FP32_TOLERANCE)
        else:
            details["check"] = export.check_causal_lm(reference_dir, tmp, FP32_TOLERANCE)
        (tmp / "export.json").write_text(json.dumps(details, indent=2))
    return folder, details


def genai_check(reference_dir: Path, folder: Path, precision: str) -> dict[str, Any]:
    """Next-token log-probs and greedy continuations of the genai model against torch.

    For fp32 the log-probs must agree within ``GENAI_FP32_LOGPROB_TOL`` nats (greedy
    continuations of a deep model can flip on near-ties of fused vs unfused kernels, so
    their identity rate is recorded, not required).
    """
    import numpy as np

    from compress.models import sample_texts
    from compress.stages.export import greedy_torch
    from serve.runtime.protocol import GenerationParams
    from serve.runtime.runtime_genai import GenaiRuntime
    from serve.runtime.runtime_torch import TorchRuntime

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


def genai_fp32(ctx: BuildContext) -> Path:
    """The onnxruntime-genai fp32 build of the reference, built once into ``OUT/.cache``."""
    from compress.stages.genai_build import build_genai

    folder = ctx.dst.parent / ".cache" / f"genai-fp32-{tree_digest(ctx.reference.files)[:16]}"
    if not (folder / "genai_config.json").is_file():
        ctx.report("building the onnxruntime-genai fp32 model to quantize")
        with atomic_dir(folder) as tmp:
            build_genai(ctx.reference_dir, tmp, "fp32", "cpu")
    return folder
