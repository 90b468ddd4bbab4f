"""Encoder classifiers beyond BERT/MiniLM through the pipeline (issue 19): RoBERTa,
XLM-RoBERTa, ModernBERT and DistilBERT (tiny random checkpoints with the tiny BERT
tokenizer) + a LoRA adapter merged by ``run_recipe``, exported to ONNX fp32 and quantized
int8-dynamic; the torch merge runtime and the onnx-fp32 runtime classify alike. One
merge -> distill run on XLM-RoBERTa."""

from __future__ import annotations

import pytest

from compress.tiny import build_adapter
from serve.artifact import load_artifact
from serve.runtime.loader import load_runtime
from tests.unit.test_onnx_export import _classifier, _save
from tests.unit.variant_fixtures import run, write_texts

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

#: LoRA target modules and the model class, per architecture.
ARCHS = {
    "roberta": (["query", "value"], "RobertaForSequenceClassification"),
    "xlm-roberta": (["query", "value"], "XLMRobertaForSequenceClassification"),
    "modernbert": (["Wqkv", "Wo"], "ModernBertForSequenceClassification"),
    "distilbert": (["q_lin", "v_lin"], "DistilBertForSequenceClassification"),
}
VARIANTS = ["onnx-fp32", "int8"]
#: Unequal lengths (padding in a batch); some longer than ModernBERT's local window (8).
TEXTS = ["the movie was great", "i love it",
         "what is the capital of france ? the food was bad and the plot was worse",
         "bad", "the acting was fine but the ending was long and the music was loud too"]


def _recipe(arch: str, base, adapter, stages: str, variants: str, extra: str = "") -> str:
    return f"""
name: {arch}
task: text-classification
labels: [negative, positive]
base: {{path: {base}}}
adapters: [{{path: {adapter}}}]
data:
{extra}  eval: {{path: eval.jsonl}}
gates: {{max_metric_drop: 1.0, min_agreement: 0.0}}
stages: {stages}
variants: {variants}
"""


def _base_and_adapter(arch: str, tiny, root):
    base = _save(_classifier(arch, 82), tiny["bert"], root / "base")
    adapter = build_adapter(base, root / "lora", "text-classification",
                            target_modules=ARCHS[arch][0])
    write_texts(root / "eval.jsonl", 16, labels=True)
    return base, adapter


@pytest.fixture(scope="module", params=list(ARCHS))
def built(request, tiny, tmp_path_factory):
    """(architecture, artifacts folder, records by name) of merge + onnx-fp32 + int8."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"enc-{arch}")
    base, adapter = _base_and_adapter(arch, tiny, root)
    out, records = run(_recipe(
        arch, base, adapter, "[{kind: merge, tolerance: 1.0e-4}]",
        "[{name: onnx-fp32, kind: export}, "
        "{name: int8, kind: quantize, method: int8-dynamic}]"), root)
    return arch, out, records


def test_lora_merge_matches_base_plus_adapter(built):
    arch, out, records = built
    merge = records["merge"]
    assert merge.status == "built", (arch, merge.error)
    assert merge.metrics["max_abs_diff"] < 1e-4
    assert merge.metrics["top1_agreement"] == 1.0
    lineage = load_artifact(out / "merge").manifest.lineage
    assert lineage["stages"][0]["details"]["delta_vs_base_max_abs"] > 1e-3  # adapter did work
    runtime = load_runtime(out / "merge", device="cpu")
    assert type(runtime.model).__name__ == ARCHS[arch][1]


def test_every_variant_is_built(built):
    arch, out, records = built
    for name in VARIANTS:
        assert records[name].status == "built", (arch, name, records[name].error)
        assert (out / name / "model.onnx").is_file() or any((out / name).glob("*.onnx"))


def test_onnx_fp32_classifies_like_the_torch_merge(built):
    arch, out, _ = built
    torch_rt = load_runtime(out / "merge", device="cpu")
    onnx_rt = load_runtime(out / "onnx-fp32", device="cpu")
    expected, got = torch_rt.classify(TEXTS), onnx_rt.classify(TEXTS)
    assert [c.label for c in got] == [c.label for c in expected], arch
    for e, g in zip(expected, got, strict=True):
        assert g.score == pytest.approx(e.score, abs=1e-4), arch
        assert set(g.scores) == set(e.scores) == {"negative", "positive"}
        for label, p in e.scores.items():
            assert g.scores[label] == pytest.approx(p, abs=1e-4), (arch, label)


def test_xlm_roberta_distills_to_a_one_layer_student(tiny, tmp_path):
    pytest.importorskip("compress.evaluate")
    base, adapter = _base_and_adapter("xlm-roberta", tiny, tmp_path)
    write_texts(tmp_path / "train.jsonl", 40, labels=True, seed=1)
    _, records = run(_recipe(
        "xlm-roberta", base, adapter,
        "[{kind: merge}, {kind: distill, student_layers: 1, max_steps: 6, eval_every: 3, "
        "batch_size: 8, learning_rate: 0.002, speed_batch_size: 8}]", "[]",
        extra="  train: {path: train.jsonl}\n"), tmp_path)
    assert [(r.name, r.status) for r in records.values()] == [("merge", "built"),
                                                             ("distill", "built")], \
        [(r.name, r.error) for r in records.values()]
    out = tmp_path / "out"
    metrics = load_artifact(out / "distill").manifest.metrics
    assert metrics["student"]["layers"] == 1 and metrics["teacher"]["layers"] == 2
    runtime = load_runtime(out / "distill", device="cpu")
    assert type(runtime.model).__name__ == "XLMRobertaForSequenceClassification"
    assert all(c.label in ("negative", "positive") for c in runtime.classify(TEXTS))
