"""Quantize: ONNX Runtime int8 (dynamic, static QDQ) and int4 weight-only, bitsandbytes NF4/int8.

ONNX methods start from the fp32 ONNX export of the reference; bitsandbytes methods start
from the reference torch folder and save it with its ``quantization_config``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from compress.stages.export import copy_side_files

log = logging.getLogger(__name__)

#: Operators quantized by the int8 methods. Gather covers the embedding table, which is
#: about half of MiniLM's weights; leaving it fp32 would cap the size gain near 2x.
INT8_OPS = ["MatMul", "Gemm", "Gather"]
#: The bitsandbytes 0.50 CPU 4-bit kernel needs out_features divisible by 32 ("N must be
#: divisible by block_n") and in_features divisible by its block size of 64.
BNB_CPU_OUT_MULTIPLE = 32
BNB_CPU_IN_MULTIPLE = 64


def _onnx_paths(src_dir: Path, dst_dir: Path) -> tuple[Path, Path]:
    copy_side_files(src_dir, dst_dir)
    return src_dir / "model.onnx", dst_dir / "model.onnx"


def int8_dynamic(src_dir: Path, dst_dir: Path) -> dict[str, Any]:
    """Dynamic int8 quantization, per-channel int8 weights, activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = _onnx_paths(src_dir, dst_dir)
    quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=INT8_OPS)
    return {"tool": "onnxruntime.quantization.quantize_dynamic", "per_channel": True,
            "weight_type": "QInt8", "op_types_to_quantize": INT8_OPS,
            "operators": "MatMulInteger + DynamicQuantizeLinear (MatMul/Gemm), "
                         "int8 Gather + DequantizeLinear (embeddings)"}


class _TextReader:
    """Feeds tokenized calibration texts one at a time to the ORT calibrator."""

    def __init__(self, tokenizer, texts: list[str], input_names: set[str]):
        import numpy as np

        # One padded length for all: the histogram calibrators stack activations.
        enc = tokenizer(texts, truncation=True, max_length=128, padding=True,
                        return_tensors="np")
        batch = {k: v.astype(np.int64) for k, v in enc.items() if k in input_names}
        if "token_type_ids" in input_names and "token_type_ids" not in batch:
            batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
        self._feeds = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(len(texts))]
        self._iter = iter(self._feeds)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self):
        self._iter = iter(self._feeds)


def int8_static(src_dir: Path, dst_dir: Path, texts: list[str], method: str) -> dict[str, Any]:
    """Static int8 QDQ quantization calibrated on ``texts`` with ``method``.

    Args:
        src_dir: fp32 ONNX folder.
        dst_dir: Output folder.
        texts: Calibration inputs.
        method: ``minmax``, ``entropy`` or ``percentile``.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from transformers import AutoTokenizer

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    src, dst = _onnx_paths(src_dir, dst_dir)
    names = {i.name for i in ort.InferenceSession(
        str(src), providers=["CPUExecutionProvider"]).get_inputs()}
    reader = _TextReader(AutoTokenizer.from_pretrained(src_dir), texts, names)
    ops = ["MatMul", "Gemm"]
    quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=ops, calibrate_method=methods[method],
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    for leftover in dst_dir.glob("*augmented*"):
        leftover.unlink()
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "per_channel": True, "activation_type": "QUInt8", "weight_type": "QInt8",
            "op_types_to_quantize": ops, "calibration_method": method,
            "calibration_samples": len(texts)}


def int4_weight_only(ctx) -> dict[str, Any]:
    """4-bit weight-only quantization into MatMulNBits with the variant's int4 algorithm.

    Starts from the fp32 ONNX export (``graph: onnx``) or the onnxruntime-genai fp32
    build (``graph: genai``); when the base is a GGUF and ``gguf_blocks`` is on, MatMuls
    whose weights its Q4_0/Q4_1 blocks reproduce exactly take those blocks first.

    Args:
        ctx: The registry's ``BuildContext`` (options: ``Int4Options``).

    Returns:
        Details for the manifest: algorithm and its options, calibration samples, GGUF
        import, operator counts.
    """
    import onnx

    from compress.stages import int4
    from compress.stages.variant_inputs import calibration_texts, fp32_onnx, genai_fp32

    options = ctx.options
    base: dict[str, Any] = {}
    if options.graph == "genai":
        src = genai_fp32(ctx)
        base["genai_fp32"] = str(src)
        for path in src.iterdir():
            if path.is_file() and not path.name.startswith("model.onnx"):
                shutil.copy2(path, ctx.dst / path.name)
    else:
        src, base["export"] = fp32_onnx(ctx.reference_dir, ctx.reference, ctx.dst.parent,
                                        ctx.report)
        copy_side_files(src, ctx.dst)
        (ctx.dst / "export.json").unlink(missing_ok=True)
    model = onnx.load(src / "model.onnx")
    details: dict[str, Any] = {"tool": "onnxruntime.quantization.matmul_nbits_quantizer",
                               "bits": 4, "block_size": options.block_size,
                               "accuracy_level": options.accuracy_level,
                               "graph": options.graph, "options": options.model_dump()}
    base_spec = ctx.recipe.base
    gguf = options.gguf_file or (base_spec.path / base_spec.gguf_file
                                 if base_spec.gguf_file else None)
    if options.gguf_blocks and gguf is not None:
        from compress.stages.gguf_blocks import import_gguf_blocks

        ctx.report(f"writing the Q4/Q8 blocks of {gguf.name} into MatMulNBits")
        untied = int4.untie_embeddings(model)  # the embedding Gather gets its own rows
        details["gguf_blocks"] = import_gguf_blocks(model, gguf, options.accuracy_level,
                                                    tuple(options.gguf_types),
                                                    options.gguf_fuse,
                                                    options.gguf_node_sums)
        details["gguf_blocks"]["untied_embeddings"] = untied
    reader = None
    if int4.ALGORITHMS[options.algorithm].calibrated:
        texts = calibration_texts(ctx.recipe, default=32)
        reader = int4.LMCalibrationReader(src / "model.onnx", ctx.reference_dir, texts,
                                          options.calibration_max_length)
        details["calibration_samples"] = len(texts)
        details["calibration_file"] = str(ctx.recipe.data.calibration.path)
    ctx.report(f"quantizing: int4 weight-only, {options.algorithm}, block "
               f"{options.block_size}" + (f", {len(reader)} calibration texts" if reader else ""))
    model, info = int4.quantize_graph(model, options, reader)
    details.update(info)
    onnx.save(model, ctx.dst / "model.onnx")
    base["quantization"] = details
    return base


def _bnb_skip_modules(model) -> tuple[list[str], list[str]]:
    """Modules to keep in full precision: the usual ones plus layers the CPU kernel rejects."""
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert

    default = list(get_keys_to_not_convert(model))
    odd = [name for name, module in model.named_modules()
           if isinstance(module, torch.nn.Linear)
           and (module.out_features % BNB_CPU_OUT_MULTIPLE
                or module.in_features % BNB_CPU_IN_MULTIPLE)]
    return sorted(set(default + odd)), odd


def check_linear4bit(reference, quantized, block_size: int = 64) -> dict[str, Any]:
    """Compare bitsandbytes Linear4bit outputs with a correct NF4 round trip in torch.

    bitsandbytes 0.50's CPU quantize/dequantize round trip was measured wrong here, so
    this checks whether the layers it produced compute ``x @ nf4(W).T`` or something else.
    """
    import bitsandbytes as bnb
    import torch

    from compress.stages.merge import fake_quantize_4bit

    ref_modules = dict(reference.named_modules())
    err_nf4 = err_fp32 = 0.0
    layers = 0
    torch.manual_seed(0)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if not isinstance(module, bnb.nn.Linear4bit) or name not in ref_modules:
                continue
            weight = ref_modules[name].weight.float()
            x = torch.randn(4, weight.shape[1])
            got = module(x).float() - (module.bias.float() if module.bias is not None else 0)
            nf4 = x @ fake_quantize_4bit(weight, "nf4", block_size).T
            fp32 = x @ weight.T
            scale = fp32.abs().mean().clamp_min(1e-12)
            err_nf4 = max(err_nf4, float((got - nf4).abs().mean() / scale))
            err_fp32 = max(err_fp32, float((got - fp32).abs().mean() / scale))
            layers += 1
    return {"layers_checked": layers, "max_rel_err_vs_nf4_reference": err_nf4,
            "max_rel_err_vs_fp32": err_fp32,
            "matches_nf4_reference": layers > 0 and err_nf4 < 0.5 * max(err_fp32, 1e-9)}


def bnb_quantize(src_dir: Path, dst_dir: Path, task: str, method: str) -> dict[str, Any]:
    """Load the reference with a bitsandbytes config (nf4 or int8) and save it.

    Returns:
        Details: quantization config, skipped modules and the Linear4bit check (nf4).
    """
    import torch
    from transformers import AutoTokenizer, BitsAndBytesConfig

    from compress.models import model_class

    cls = model_class(task)
    reference = cls.from_pretrained(src_dir, dtype=torch.float32).eval()
    skip, odd = _bnb_skip_modules(reference)
    if method == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.float32,
                                    llm_int8_skip_modules=skip)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    model = cls.from_pretrained(src_dir, dtype=torch.float32, quantization_config=config,
                                device_map="cpu").eval()
    model.save_pretrained(dst_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(src_dir).save_pretrained(dst_dir)
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (src_dir / extra).is_file() and not (dst_dir / extra).exists():
            shutil.copy2(src_dir / extra, dst_dir / extra)
    details: dict[str, Any] = {
        "tool": "bitsandbytes", "quantization_config": config.to_dict(),
        "skipped_modules": skip,
        "skipped_for_cpu_kernel": odd,
        "skip_reason": f"bitsandbytes CPU kernel needs out_features % "
                       f"{BNB_CPU_OUT_MULTIPLE} == 0 and in_features % {BNB_CPU_IN_MULTIPLE}"
                       " == 0; lm_head/tied/output layers stay fp32"}
    if method == "nf4":
        details["linear4bit_check"] = check_linear4bit(reference, model)
        log.info("Linear4bit check: %s", details["linear4bit_check"])
    return details
