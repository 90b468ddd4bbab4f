"""Quantized variants of the tiny BERT classifier: build, load, fidelity, gates, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from compress.data import load_examples
from compress.recipe import DataFile
from serve.artifact import load_artifact
from serve.runtime.loader import load_runtime
from tests.unit.variant_fixtures import run, write_texts

VARIANTS = ["onnx-fp32", "int8-dynamic", "int8-static", "int4", "nf4", "int8-bnb"]


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    write_texts(root / "eval.jsonl", 48, labels=True)
    write_texts(root / "calib.jsonl", 16, labels=False, seed=1)
    return run(f"""
name: q
task: text-classification
base: {{path: {tiny["bert"]}}}
adapters: [{{path: {tiny["bert-lora"]}}}]
data:
  eval: {{path: eval.jsonl}}
  calibration: {{path: calib.jsonl, label: null, samples: 12}}
gates: {{min_agreement: 0.5, max_metric_drop: 0.5}}
variants:
  - {{name: onnx-fp32, kind: export}}
  - {{name: int8-dynamic, kind: quantize, method: int8-dynamic}}
  - {{name: int8-static, kind: quantize, method: int8-static, calibration_method: percentile}}
  - {{name: int4, kind: quantize, method: int4-weight-only, block_size: 32}}
  - {{name: nf4, kind: quantize, method: nf4}}
  - {{name: int8-bnb, kind: quantize, method: int8-bnb}}
  - {{name: impossible, kind: quantize, method: int8-dynamic, gates: {{min_agreement: 1.01}}}}
""", root)


def test_every_variant_builds_loads_and_is_measured(built):
    out, records = built
    examples = load_examples(DataFile(path=out.parent / "eval.jsonl"))
    reference = load_runtime(out / "merge").class_probabilities([e.text for e in examples])
    for name in VARIANTS:
        assert records[name].status == "built", records[name].error
        manifest = load_artifact(out / name).manifest
        metrics = manifest.metrics
        assert metrics["n"] == 48 and metrics["metric"] == "accuracy"
        assert 0.0 <= metrics["agreement"] <= 1.0 and metrics["kl"] >= -1e-6  # fp rounding
        assert metrics["ci95"][0] <= metrics["value"] <= metrics["ci95"][1]
        assert manifest.gate["verdict"] == "passed", (name, manifest.gate)
        # agreement recomputed here from the served runtime against the torch reference
        probs = load_runtime(out / name).class_probabilities([e.text for e in examples])
        agreement = float((probs.argmax(1) == reference.argmax(1)).mean())
        assert agreement == pytest.approx(metrics["agreement"])


def test_quantized_onnx_files_are_smaller(built):
    out, _ = built
    fp32 = load_artifact(out / "onnx-fp32").manifest.metrics["weight_bytes"]
    for name in ("int8-dynamic", "int4"):
        assert load_artifact(out / name).manifest.metrics["weight_bytes"] < 0.8 * fp32, name
    nf4 = load_artifact(out / "nf4").manifest.metrics
    assert nf4["weight_bytes"] < nf4["reference_weight_bytes"]


def test_manifests_record_method_details(built):
    out, _ = built
    stage = load_artifact(out / "int8-static").manifest.lineage["stages"][-1]["details"]
    assert stage["quantization"]["calibration_samples"] == 12
    assert stage["quantization"]["calibration_method"] == "percentile"
    dyn = load_artifact(out / "int8-dynamic").manifest.lineage["stages"][-1]["details"]
    assert dyn["quantization"]["per_channel"] and "MatMul" in dyn["quantization"][
        "op_types_to_quantize"]
    nf4 = load_artifact(out / "nf4").manifest
    details = nf4.lineage["stages"][-1]["details"]
    assert "classifier" in details["skipped_for_cpu_kernel"]  # 2 outputs: not a multiple of 32
    assert details["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    check = nf4.metrics["linear4bit_check"]
    assert check["layers_checked"] > 0
    # Linear4bit on this CPU computes x @ nf4(W).T: much closer to it than to fp32.
    assert check["max_rel_err_vs_nf4_reference"] < 0.2 * check["max_rel_err_vs_fp32"]


def test_impossible_gate_fails_only_that_variant(built):
    out, records = built
    assert records["impossible"].status == "built" and records["impossible"].gate == "failed"
    gate = load_artifact(out / "impossible").manifest.gate
    assert gate["verdict"] == "failed" and "min_agreement" in gate["reasons"][0]
    assert all(records[name].gate == "passed" for name in VARIANTS)


def test_int8_dynamic_close_to_reference_probabilities(built):
    out, _ = built
    texts = ["the movie was great", "i really hate this film", "one two three"]
    ref = load_runtime(out / "merge").class_probabilities(texts)
    got = load_runtime(out / "int8-dynamic").class_probabilities(texts)
    assert np.abs(ref - got).max() < 0.05


def test_bad_inputs_name_the_variant(tiny, tmp_path):
    write_texts(tmp_path / "eval.jsonl", 8, labels=True)
    _, records = run(f"""
name: bad
task: text-classification
base: {{path: {tiny["bert"]}}}
data: {{eval: {{path: eval.jsonl}}}}
variants:
  - {{name: static-no-calib, kind: quantize, method: int8-static}}
  - {{name: genai-for-bert, kind: export, format: onnx-genai}}
  - {{name: onnx-int4-export, kind: export, precision: int4}}
""", tmp_path)
    assert "static-no-calib" in records["static-no-calib"].error
    assert "data.calibration" in records["static-no-calib"].error
    assert "onnx-genai is for text-generation" in records["genai-for-bert"].error
    assert "kind: quantize" in records["onnx-int4-export"].error
    assert not (tmp_path / "out" / "static-no-calib").exists()
