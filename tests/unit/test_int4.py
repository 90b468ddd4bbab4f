"""int4 weight-only algorithms on the tiny Llama: build, load, fidelity, calibration."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from compress.stages.gguf_blocks import effective_weight
from compress.stages.int4 import LMCalibrationReader
from serve.artifact import load_artifact
from serve.runtime.loader import load_runtime
from serve.runtime.protocol import GenerationParams
from tests.unit.variant_fixtures import run, write_texts

ALGORITHMS = {"int4-rtn": "rtn", "int4-gptq": "gptq", "int4-hqq": "hqq",
              "int4-kquant": "k_quant", "int4-kquant-mixed": "k_quant_mixed"}
BUILT = [*ALGORITHMS, "int4-rtn-asym", "int4-rtn-coarse", "genai-graph-gptq", "genai-kquant"]


@pytest.fixture(scope="module")
def lm(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("int4")
    write_texts(root / "eval.jsonl", 16, labels=False)
    write_texts(root / "calib.jsonl", 12, labels=False, seed=1)
    return run(f"""
name: int4
task: text-generation
base: {{path: {tiny["llama"]}}}
data:
  eval: {{path: eval.jsonl, label: null}}
  calibration: {{path: calib.jsonl, label: null, samples: 8}}
gates: {{min_agreement: 0.0, max_metric_drop: 100}}
variants:
  - {{name: int4-rtn, kind: quantize, method: int4-weight-only, block_size: 16}}
  - {{name: int4-gptq, kind: quantize, method: int4-weight-only, algorithm: gptq,
      block_size: 16}}
  - {{name: int4-hqq, kind: quantize, method: int4-weight-only, algorithm: hqq,
      block_size: 16}}
  - {{name: int4-kquant, kind: quantize, method: int4-weight-only, algorithm: k_quant,
      block_size: 16}}
  - {{name: int4-kquant-mixed, kind: quantize, method: int4-weight-only,
      algorithm: k_quant_mixed, block_size: 16, embeddings: int4}}
  - {{name: int4-rtn-asym, kind: quantize, method: int4-weight-only, block_size: 16,
      symmetric: false}}
  - {{name: int4-rtn-coarse, kind: quantize, method: int4-weight-only, block_size: 64}}
  - {{name: genai-graph-gptq, kind: quantize, method: int4-weight-only, algorithm: gptq,
      graph: genai, block_size: 16, int8_lm_head: true, embeddings: int4}}
  - {{name: genai-kquant, kind: export, format: onnx-genai, precision: int4,
      algorithm: k_quant, block_size: 16}}
  - {{name: kquant-odd-blocks, kind: quantize, method: int4-weight-only,
      algorithm: k_quant, block_size: 32}}
""", root)


def test_every_algorithm_builds_loads_and_generates(lm):
    out, records = lm
    params = GenerationParams(max_new_tokens=6)
    for name in BUILT:
        assert records[name].status == "built", (name, records[name].error)
        runtime = load_runtime(out / name)
        result = runtime.generate(["the movie was"], params)[0]
        assert result.completion_tokens > 0, name
        manifest = load_artifact(out / name).manifest
        assert 0.0 <= manifest.metrics["agreement"] <= 1.0, name
    for name, algo in ALGORITHMS.items():
        details = load_artifact(out / name).manifest.lineage["stages"][-1]["details"]
        assert details["quantization"]["algorithm"] == algo
        assert details["quantization"]["options"]["block_size"] == 16
        assert details["quantization"]["operators"]["MatMulNBits"] >= 15, name


def test_manifest_records_calibration_and_mixed_precision(lm):
    out, _ = lm
    gptq = load_artifact(out / "int4-gptq").manifest.lineage["stages"][-1]["details"]
    assert gptq["quantization"]["calibration_samples"] == 8
    assert gptq["quantization"]["calibration_file"].endswith("calib.jsonl")
    mixed = load_artifact(out / "int4-kquant-mixed").manifest.lineage["stages"][-1]
    assert "/lm_head/MatMul" in mixed["details"]["quantization"]["int8_nodes"]
    assert mixed["details"]["quantization"]["operators"].get("GatherBlockQuantized") == 1
    genai = load_artifact(out / "genai-graph-gptq").manifest
    assert genai.format == "onnx-genai"
    assert genai.lineage["stages"][-1]["details"]["quantization"]["int8_nodes"] == [
        "/lm_head/MatMul"]
    builder = load_artifact(out / "genai-kquant").manifest.lineage["stages"][-1]["details"]
    assert builder["options"]["algo_config"] == "k_quant"  # 0.18 name (int4_ prefix deprecated)


def test_k_quant_with_odd_block_count_is_refused_by_name(lm):
    _, records = lm
    error = records["kquant-odd-blocks"].error
    assert records["kquant-odd-blocks"].status == "failed"
    assert "kquant-odd-blocks" in error and "odd number of blocks" in error


def _activations(fp32_path, tokenizer_dir, calib_texts):
    """fp32 inputs of every weight MatMul on the calibration texts: {node name: X [T, K]}."""
    import onnxruntime as ort

    model = onnx.load(fp32_path)
    inits = {i.name for i in model.graph.initializer}
    nodes = {n.name: n.input[0] for n in model.graph.node
             if n.op_type == "MatMul" and n.input[1] in inits}
    known = {o.name for o in model.graph.output}
    for act in set(nodes.values()) - known:
        model.graph.output.append(onnx.helper.make_tensor_value_info(act, 1, None))
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    reader = LMCalibrationReader(fp32_path, tokenizer_dir, calib_texts)
    acts: dict[str, list] = {}
    for feed in reader:
        for name, value in zip(names, session.run(None, feed), strict=True):
            acts.setdefault(name, []).append(value.reshape(-1, value.shape[-1]))
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    fp32_weights = {n.name: weights[n.input[1]] for n in model.graph.node if n.name in nodes}
    return ({name: np.concatenate(acts[act]) for name, act in nodes.items()}, fp32_weights)


def _layer_error(artifact, acts, fp32_weights) -> float:
    """Sum over layers of ||X W - X W_q||^2 (MatMulNBits nodes matched by name)."""
    model = onnx.load(artifact / "model.onnx")
    total = 0.0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        base = node.name[: node.name.index("MatMul") + len("MatMul")]
        x = acts[base]
        total += float(((x @ fp32_weights[base] - x @ effective_weight(model, node.name))
                        ** 2).sum())
    return total


def test_gptq_reconstructs_layers_better_than_rtn(lm):
    from compress.data import load_examples
    from compress.recipe import DataFile

    out, _ = lm
    fp32 = next((out / ".cache").glob("onnx-fp32-*")) / "model.onnx"
    texts = [e.text for e in load_examples(DataFile(path=out.parent / "calib.jsonl",
                                                    label=None), limit=8)]
    acts, weights = _activations(fp32, out / "merge", texts)
    errors = {name: _layer_error(out / name, acts, weights)
              for name in ["int4-rtn", "int4-rtn-asym", "int4-gptq", "int4-hqq",
                           "int4-kquant", "int4-rtn-coarse"]}
    # same asymmetric scheme and block size: GPTQ's error compensation must pay off
    assert errors["int4-gptq"] < 0.9 * errors["int4-rtn-asym"], errors
    for name in ("int4-rtn", "int4-gptq", "int4-hqq", "int4-kquant"):
        assert errors[name] < errors["int4-rtn-coarse"], errors
