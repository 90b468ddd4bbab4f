"""int4 weight-only quantization of an fp32 ONNX graph into MatMulNBits: the algorithms.

Each algorithm is one registered entry (``@algorithm``) that returns the ONNX Runtime
``algo_config`` for ``MatMulNBitsQuantizer`` (onnxruntime 1.31, checked on the CPU EP):

* ``rtn`` — ORT's C++ round-to-nearest (``DefaultWeightOnlyQuantConfig``), symmetric or not.
* ``gptq`` — GPTQ calibrated on ``data.calibration`` (``gptq.py``; ORT's own GPTQ never
  propagates its errors and equals RTN): per-layer second-order error compensation on
  the activations the calibration texts produce. Asymmetric unless ``symmetric``.
* ``hqq`` — Half-Quadratic Quantization (no data): optimized scales and *float* zero
  points. The CPU kernel has no fast path for float zero points (a 576x1536 MatMulNBits
  measured 2.7 ms vs 42 µs with uint8 zero points), so it is accurate but slow on CPU.
* ``k_quant`` — llama.cpp's k-quant search of scale and minimum per block (asymmetric).
  ORT packs its zero points across rows: K / block_size must be even (checked).
* ``k_quant_mixed`` — ``k_quant`` plus int8 for the LM head and for llama.cpp's sensitive
  layers (first/last eighth and every third layer's v_proj/down_proj), as the
  onnxruntime-genai builder's option of the same name does.

Mixed precision beyond that is explicit: ``int8_lm_head`` puts the LM head at 8 bits (any
algorithm), ``embeddings: int4`` turns the embedding Gather into GatherBlockQuantized (ORT
quantizes Gather to 4 bits only).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: onnxruntime-genai builder ``int4_algo_config`` values (builder 0.11.4).
GENAI_ALGORITHMS = ("rtn", "rtn_last", "k_quant", "k_quant_mixed", "k_quant_last")
LM_HEAD_NODES = ("/lm_head/MatMul",)


@dataclass(frozen=True)
class Algorithm:
    """One int4 algorithm: ``run(model, options, reader, symmetric) -> model``."""

    name: str
    run: Callable[..., Any]
    calibrated: bool = False
    symmetric: bool = True
    summary: str = ""


ALGORITHMS: dict[str, Algorithm] = {}


def algorithm(name: str, *, calibrated: bool = False, symmetric: bool = True,
              summary: str = "") -> Callable:
    """Decorator registering an ONNX Runtime algorithm by its config factory.

    The decorated ``make(options, calibration_reader)`` returns the ``algo_config`` for
    ``MatMulNBitsQuantizer`` (None: its default C++ RTN). ``symmetric`` is the
    algorithm's default scheme (the variant's ``symmetric`` wins).
    """
    def wrap(make: Callable[[Any, Any], Any]):
        def run(model, options, reader, symmetric: bool):
            return _run_pass(model, bits=4, algo_config=make(options, reader),
                             **_common(options, symmetric, _protected(model)))

        ALGORITHMS[name] = Algorithm(name, run, calibrated, symmetric, summary)
        return make
    return wrap


def _common(options, symmetric: bool, exclude: list[str]) -> dict[str, Any]:
    return {"block_size": options.block_size, "is_symmetric": symmetric,
            "accuracy_level": options.accuracy_level, "op_types_to_quantize": ("MatMul",),
            "nodes_to_exclude": exclude}


def _protected(model) -> list[str]:
    """MatMuls no pass may touch: the GGUF import's exact offset corrections (Q4_1/K, Q5_1/K)."""
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and "_gguf" in n.name]


def _gptq(model, options, reader, symmetric: bool):
    from compress.stages.gptq import gptq_graph

    return gptq_graph(model, options, reader, symmetric, options.accuracy_level)


ALGORITHMS["gptq"] = Algorithm("gptq", _gptq, calibrated=True, symmetric=False,
                               summary="GPTQ (Frantar et al.) on data.calibration")


@algorithm("rtn", summary="round to nearest, ORT C++ quantizer")
def _rtn(options, reader):
    return None


@algorithm("hqq", symmetric=False, summary="half-quadratic quantization, float zero points")
def _hqq(options, reader):
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

    return HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=4)


@algorithm("k_quant", symmetric=False, summary="llama.cpp k-quant scale/min search")
def _k_quant(options, reader):
    from onnxruntime.quantization.matmul_nbits_quantizer import KQuantWeightOnlyQuantConfig

    return KQuantWeightOnlyQuantConfig()


#: k_quant_mixed = k_quant for most MatMuls; ``quantize_graph`` puts the LM head and the
#: sensitive layers at 8 bits first (ORT's C++ quantizer), like the genai builder's option.
algorithm("k_quant_mixed", symmetric=False,
          summary="k_quant + int8 LM head and sensitive layers")(_k_quant)
MIXED_ALGORITHMS = ("k_quant_mixed",)
SENSITIVE_PARTS = ("v_proj", "qkv_proj", "down_proj")


def sensitive_layers(num_layers: int) -> list[int]:
    """llama.cpp's layers kept at higher precision (as onnxruntime-genai's k_quant_mixed)."""
    return [i for i in range(num_layers) if i < num_layers / 8 or i >= 7 * num_layers / 8
            or (i - round(num_layers / 8)) % 3 == 2]


def _sensitive_nodes(names: list[str]) -> list[str]:
    import re

    layer_of = {n: int(m.group(1)) for n in names if (m := re.search(r"layers\.(\d+)/", n))}
    keep = set(sensitive_layers(max(layer_of.values(), default=-1) + 1))
    return [n for n, i in layer_of.items()
            if i in keep and any(f"/{part}/" in n for part in SENSITIVE_PARTS)]


def untie_embeddings(model) -> bool:
    """Give a Gather that reads ``Transpose(initializer)`` its own transposed table.

    onnxruntime-genai's fp32 build of a tied-embedding model (SmolLM2) feeds the embedding
    Gather from a Transpose of the LM head's weight: quantizing the LM head would then keep
    the fp32 table alive for the Gather. Untied, each is quantized on its own.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {n.output[0]: n for n in model.graph.node if n.op_type == "Transpose"}
    done = False
    for node in model.graph.node:
        src = producers.get(node.input[0]) if node.op_type == "Gather" else None
        if src is not None and src.input[0] in inits:
            table = numpy_helper.to_array(inits[src.input[0]]).T.copy()
            model.graph.initializer.append(numpy_helper.from_array(table, node.name + ".table"))
            node.input[0] = node.name + ".table"
            done = True
    if done:
        used = {i for n in model.graph.node for i in n.input}
        keep = [n for n in model.graph.node if n.op_type != "Transpose"
                or any(o in used for o in n.output)]
        model.graph.ClearField("node")
        model.graph.node.extend(keep)
    return done


def _matmul_weights(model) -> dict[str, Any]:
    """MatMul node name -> its constant weight ([K, N] numpy) for MatMuls with one."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            array = numpy_helper.to_array(inits[node.input[1]])
            if array.ndim == 2:
                out[node.name] = array
    return out


def _check_k_quant(weights: dict[str, Any], block_size: int, skip: set[str]) -> None:
    from compress.errors import InputError

    for name, weight in weights.items():
        blocks = -(-weight.shape[0] // block_size)
        if name not in skip and blocks % 2:
            raise InputError(f"k_quant: MatMul {name} has K={weight.shape[0]}, an odd number "
                             f"of blocks of {block_size} (ORT's k-quant zero-point packing "
                             "needs an even count); use a smaller block_size or rtn/gptq")


def _set_accuracy_level(model, level: int) -> None:
    import onnx

    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level"
                                                     for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))


def _proto(quantizer) -> Any:
    model = quantizer.model
    return model.model if hasattr(model, "model") else model


def _run_pass(model, **kwargs) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, **kwargs)
    quantizer.process()
    return _proto(quantizer)


def quantize_graph(model, options, reader=None) -> tuple[Any, dict[str, Any]]:
    """Quantize the MatMuls (and optionally the embedding Gather) of an fp32 ONNX model.

    Args:
        model: The ONNX ModelProto (weights loaded); MatMuls already replaced by
            MatMulNBits (e.g. GGUF blocks) are left alone.
        options: ``Int4Options`` (algorithm, block_size, symmetric, accuracy_level,
            int8_lm_head, embeddings, percdamp, actorder).
        reader: Calibration data reader (algorithms with ``calibrated=True``).

    Returns:
        The quantized ModelProto and details for the manifest.
    """
    algo = ALGORITHMS[options.algorithm]
    symmetric = algo.symmetric if options.symmetric is None else options.symmetric
    untied = untie_embeddings(model)
    weights = _matmul_weights(model)
    mixed = options.algorithm in MIXED_ALGORITHMS
    int8_nodes = [n for n in weights if (options.int8_lm_head or mixed) and n in LM_HEAD_NODES]
    if mixed:
        int8_nodes += _sensitive_nodes(list(weights))
    if int8_nodes:  # ORT's C++ quantizer at 8 bits, only on these nodes
        others = [n for n in weights if n not in int8_nodes] + _protected(model)
        model = _run_pass(model, bits=8, **_common(options, symmetric, others))
    if options.algorithm.startswith("k_quant"):
        _check_k_quant(weights, options.block_size, set(int8_nodes))
    model = algo.run(model, options, reader, symmetric)
    _set_accuracy_level(model, options.accuracy_level)
    details: dict[str, Any] = {"algorithm": options.algorithm, "summary": algo.summary,
                               "symmetric": symmetric, "untied_embeddings": untied,
                               "int8_nodes": int8_nodes}
    if options.embeddings == "int4":
        model = _run_pass(model, bits=4, block_size=options.block_size,
                          is_symmetric=symmetric, op_types_to_quantize=("Gather",),
                          quant_axes=(("Gather", 1),), nodes_to_exclude=_protected(model))
        details["embeddings"] = "int4 GatherBlockQuantized"
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "MatMulNBits", "Gather", "GatherBlockQuantized"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    details["operators"] = counts
    return model, details


class LMCalibrationReader:
    """Feeds tokenized calibration texts to an LM graph (prefill, empty KV cache).

    Works for the ``format: onnx`` and onnxruntime-genai decoder graphs: ``input_ids``,
    ``attention_mask``, optional ``position_ids`` and ``past_key_values.*`` inputs (given
    with a past length of 0).
    """

    def __init__(self, onnx_path: Path, tokenizer_dir: Path, texts: list[str],
                 max_length: int = 128):
        import numpy as np
        import onnxruntime as ort
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        genai_config = Path(onnx_path).parent / "genai_config.json"
        # onnxruntime-genai 0.18 leaves the head size symbolic (``kv_cache_dim``)
        head_size = (json.loads(genai_config.read_text())["model"]["decoder"]["head_size"]
                     if genai_config.is_file() else 0)
        self._feeds = []
        for text in texts:
            ids = tok(text, truncation=True, max_length=max_length,
                      return_tensors="np")["input_ids"].astype(np.int64)
            feed: dict[str, Any] = {}
            for inp in session.get_inputs():
                if inp.name == "input_ids":
                    feed[inp.name] = ids
                elif inp.name == "attention_mask":
                    feed[inp.name] = np.ones_like(ids)
                elif inp.name == "position_ids":
                    feed[inp.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
                elif inp.name.startswith("past_key_values"):
                    shape = [d if isinstance(d, int) else 0 for d in inp.shape]
                    shape[0] = 1
                    shape[3] = shape[3] or head_size
                    dtype = np.float16 if "float16" in inp.type else np.float32
                    feed[inp.name] = np.zeros(shape, dtype)
            self._feeds.append(feed)
        self._iter = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def __iter__(self):
        return iter(self._feeds)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self):
        self._iter = iter(self._feeds)
