"""The built-in variant methods, each one ``@register`` entry (see ``registry.py``).

``kind: export`` — ``onnx`` (transformers' ONNX exporter, fp32/fp16) and ``onnx-genai``
(onnxruntime-genai builder). ``kind: quantize`` — ``int8-dynamic``, ``int8-static`` (ONNX
Runtime), ``int4-weight-only`` (MatMulNBits with a registered int4 algorithm, see ``int4.py``),
``nf4`` and ``int8-bnb`` (bitsandbytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from compress.recipe import Recipe
from compress.recipe_sections import ExportVariant, Strict
from compress.stages.registry import BuildContext, register
from compress.stages.variant_inputs import (
    VariantError,
    calibration_texts,
    cuda_available,
    fp32_onnx,
    genai_check,
)

#: GGUF block types the exact import writes into MatMulNBits by default (``gguf_rows``).
GGUF_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K")


class NoOptions(Strict):
    """A method without options."""


class Int8StaticOptions(Strict):
    """Options of ``int8-static``.

    Attributes:
        calibration_method: How activation ranges are calibrated on ``data.calibration``.
    """

    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"


class Int4Options(Strict):
    """Options of ``int4-weight-only`` (MatMulNBits).

    Attributes:
        algorithm: A registered int4 algorithm (``compress/stages/int4.py``): ``rtn``,
            ``gptq`` (needs ``data.calibration``), ``hqq``, ``k_quant``, ``k_quant_mixed``.
        block_size: Weights per scale (power of two, >= 16).
        symmetric: Symmetric quantization (rtn/gptq; hqq and k_quant are asymmetric);
            None: the algorithm's default (rtn symmetric, gptq asymmetric).
        accuracy_level: MatMulNBits compute type on CPU (4: int8 activations, fastest;
            1: fp32).
        graph: Which fp32 graph is quantized: ``onnx`` (the ``format: onnx`` export,
            served by ONNX Runtime; ``optimum``, its name before optimum was dropped, is
            read as ``onnx``) or ``genai`` (the onnxruntime-genai builder's fp32 model,
            served by its C++ generator; text-generation only).
        int8_lm_head: Quantize the LM head to 8 bits instead of 4.
        embeddings: ``int4`` quantizes the embedding table (GatherBlockQuantized; ORT
            quantizes Gather to 4 bits only), ``fp32`` keeps it.
        gguf_blocks: Write the GGUF's quantized blocks into the MatMuls whose weights they
            reproduce exactly instead of rounding again (rows are matched by their exact
            values, so a wrong or unrelated GGUF simply matches nothing).
        gguf_file: The GGUF to import blocks from (relative to the recipe); default: the
            base's ``gguf_file`` when the base was loaded from a GGUF.
        gguf_types: GGUF block types to import (``Q4_0``, ``Q4_1``, ``Q4_K`` at 4 bits;
            ``Q8_0``, ``Q5_0``, ``Q5_1``, ``Q5_K``, ``Q6_K`` at 8 bits: MatMulNBits has no
            5/6-bit storage); the other tensors go to ``algorithm`` (e.g. leave ``Q8_0``
            out for an int4 LM head).
        gguf_fuse: Imported Q4 MatMuls that read one input (q/k/v, gate/up) become one
            MatMulNBits with one offset correction, split afterwards (same weights).
        gguf_node_sums: Q4_1 offsets multiply block sums of the activations as the
            MatMulNBits quantizes them (extra output channels), as llama.cpp does; false:
            fp32 block sums ``x @ E`` (same weights either way; on SmolLM2 the node sums
            agree more with the reference, 0.952 vs 0.949, and are faster).
        percdamp: GPTQ dampening (fraction of the mean Hessian diagonal).
        actorder: GPTQ: quantize columns in order of decreasing activation energy.
        calibration_max_length: Tokens per calibration text (GPTQ).
    """

    algorithm: str = "rtn"
    block_size: int = Field(default=32, ge=16)
    symmetric: bool | None = None
    accuracy_level: int = Field(default=4, ge=0, le=4)
    graph: Literal["onnx", "genai"] = "onnx"
    int8_lm_head: bool = False
    embeddings: Literal["fp32", "int4"] = "fp32"
    gguf_blocks: bool = True
    gguf_file: Path | None = None
    gguf_types: list[Literal["Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q5_0", "Q5_1", "Q5_K",
                             "Q6_K"]] = Field(default_factory=lambda: list(GGUF_TYPES))
    gguf_fuse: bool = True
    gguf_node_sums: bool = True
    percdamp: float = Field(default=0.01, gt=0)
    actorder: bool = False
    calibration_max_length: int = Field(default=128, gt=1)

    @field_validator("graph", mode="before")
    @classmethod
    def _old_graph_name(cls, value: Any) -> Any:
        # recipes written for the optimum-onnx stack name the same graph ``optimum``
        return "onnx" if value == "optimum" else value

    @model_validator(mode="after")
    def _check(self) -> Int4Options:
        from compress.stages.int4 import ALGORITHMS

        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: unknown int4 algorithm {self.algorithm!r}; choose "
                             f"one of {', '.join(sorted(ALGORITHMS))}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: {self.block_size} is not a power of two")
        return self


# --- export -----------------------------------------------------------------------------

def _plan_onnx(recipe: Recipe, variant: ExportVariant) -> tuple[str, str]:
    if variant.precision not in ("fp32", "fp16"):
        raise VariantError(f"variant {variant.name}: format onnx exports fp32 or fp16; for "
                           f"{variant.precision} use kind: quantize with method "
                           "int8-dynamic/int4-weight-only")
    return "onnx", variant.precision


@register("export", "onnx", config=ExportVariant, plan=_plan_onnx, version=3,
          summary="ONNX export (transformers' exporter), fp32 or fp16")
def _build_onnx(ctx: BuildContext) -> dict[str, Any]:
    from compress.stages import export

    src, details = fp32_onnx(ctx.reference_dir, ctx.reference, ctx.dst.parent, ctx.report)
    base: dict[str, Any] = {"export": details}
    if ctx.variant.precision == "fp32":
        export.copy_side_files(src, ctx.dst)
        for path in [src / "model.onnx", *src.glob("model.onnx*data")]:
            (ctx.dst / path.name).write_bytes(path.read_bytes())
    else:
        ctx.report("converting fp32 ONNX to fp16")
        base["fp16"] = export.convert_fp16(src, ctx.dst)
        base["fp16"]["note"] = ("fp16 targets the CUDA EP; evaluated here on "
                                + ("CUDA" if cuda_available() else
                                   "the CPU EP (no GPU): accuracy is indicative, speed is not"))
    (ctx.dst / "export.json").unlink(missing_ok=True)
    return base


def _plan_genai(recipe: Recipe, variant: ExportVariant) -> tuple[str, str]:
    name = variant.name
    if recipe.task != "text-generation":
        raise VariantError(f"variant {name}: format onnx-genai is for text-generation "
                           f"models, this recipe is {recipe.task}; use format: onnx")
    if variant.device == "cuda" and not cuda_available():
        raise VariantError(f"variant {name}: device cuda asked for but no CUDA GPU is "
                           "available here; use device: cpu (fp32/int8/int4)")
    if variant.precision == "fp16" and variant.device != "cuda":
        raise VariantError(f"variant {name}: onnx-genai fp16 is a GPU-only option "
                           "(device: cuda); on CPU use precision fp32, int8 or int4")
    if variant.precision == "int8" and variant.device == "cuda":
        raise VariantError(f"variant {name}: onnx-genai int8 is built for CPU only; "
                           "use int4 or fp16 for cuda")
    if variant.algorithm and variant.precision != "int4":
        raise VariantError(f"variant {name}: algorithm applies to precision int4 only (this "
                           f"variant is {variant.precision})")
    return "onnx-genai", variant.precision


@register("export", "onnx-genai", config=ExportVariant, plan=_plan_genai, version=3,
          summary="onnxruntime-genai model builder")
def _build_genai(ctx: BuildContext) -> dict[str, Any]:
    from compress.stages.genai_build import build_genai

    v = ctx.variant
    ctx.report(f"building with onnxruntime-genai ({v.precision}, {v.device}"
               + (f", {v.algorithm}" if v.algorithm else "") + ")")
    details = build_genai(ctx.reference_dir, ctx.dst, v.precision, v.device,
                          v.block_size, v.symmetric, v.algorithm)
    details["check"] = genai_check(ctx.reference_dir, ctx.dst, v.precision)
    return details


# --- quantize ---------------------------------------------------------------------------

def _plan_onnx_quantize(recipe: Recipe, variant: Any) -> tuple[str, str]:
    return "onnx", variant.method


def _plan_static(recipe: Recipe, variant: Any) -> tuple[str, str]:
    if recipe.task == "text-generation":
        raise VariantError(f"variant {variant.name}: method int8-static is not available "
                           "for text-generation (the KV-cache graph is not calibrated); use "
                           "int8-dynamic, int4-weight-only or format onnx-genai")
    if recipe.data.calibration is None:
        raise VariantError(f"variant {variant.name}: method int8-static needs calibration "
                           "data; add data.calibration: {path: FILE, samples: 128} to the "
                           "recipe (representative texts)")
    return "onnx", variant.method


@register("quantize", "int8-dynamic", config=NoOptions, plan=_plan_onnx_quantize, version=3,
          summary="ONNX Runtime dynamic int8, per-channel")
def _build_int8_dynamic(ctx: BuildContext) -> dict[str, Any]:
    from compress.stages import quantize

    src, details = fp32_onnx(ctx.reference_dir, ctx.reference, ctx.dst.parent, ctx.report)
    ctx.report("quantizing: int8 dynamic (per-channel)")
    return {"export": details, "quantization": quantize.int8_dynamic(src, ctx.dst)}


@register("quantize", "int8-static", config=Int8StaticOptions, plan=_plan_static, version=3,
          summary="ONNX Runtime static int8 QDQ, calibrated")
def _build_int8_static(ctx: BuildContext) -> dict[str, Any]:
    from compress.stages import quantize

    src, details = fp32_onnx(ctx.reference_dir, ctx.reference, ctx.dst.parent, ctx.report)
    texts = calibration_texts(ctx.recipe)
    method = ctx.options.calibration_method
    ctx.report(f"quantizing: int8 static QDQ, {method} calibration on {len(texts)} samples")
    result = quantize.int8_static(src, ctx.dst, texts, method)
    return {"export": details, "quantization": result}


def _plan_int4(recipe: Recipe, variant: Any) -> tuple[str, str]:
    from compress.stages.int4 import ALGORITHMS

    options = variant.options
    if ALGORITHMS[options.algorithm].calibrated and recipe.data.calibration is None:
        raise VariantError(f"variant {variant.name}: algorithm {options.algorithm} needs "
                           "calibration data; add data.calibration: {path: FILE, samples: "
                           "32} to the recipe (representative texts)")
    if options.graph == "genai":
        _plan_genai(recipe, ExportVariant(name=variant.name, format="onnx-genai"))
        return "onnx-genai", "int4"
    return "onnx", variant.method


@register("quantize", "int4-weight-only", config=Int4Options, plan=_plan_int4, version=6,
          summary="MatMulNBits int4 (rtn, gptq, hqq, k_quant, k_quant_mixed)")
def _build_int4(ctx: BuildContext) -> dict[str, Any]:
    from compress.stages.quantize import int4_weight_only

    return int4_weight_only(ctx)


def _plan_bnb(recipe: Recipe, variant: Any) -> tuple[str, str]:
    return "torch", variant.method


def _build_bnb(ctx: BuildContext) -> dict[str, Any]:
    from compress.stages import quantize

    ctx.report(f"quantizing with bitsandbytes ({ctx.variant.method})")
    return quantize.bnb_quantize(ctx.reference_dir, ctx.dst, ctx.recipe.task,
                                 ctx.variant.method)


register("quantize", "nf4", config=NoOptions, plan=_plan_bnb,
         summary="bitsandbytes NF4 (torch)")(_build_bnb)
register("quantize", "int8-bnb", config=NoOptions, plan=_plan_bnb,
         summary="bitsandbytes LLM.int8 (torch)")(_build_bnb)
