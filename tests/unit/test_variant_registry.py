"""The variant method registry, VariantFailed, and the merge stage's head check."""

from __future__ import annotations

import pytest

from compress.errors import InputError, RecipeError, VariantFailed
from compress.recipe import load_recipe
from compress.stages import registry
from compress.stages.methods import NoOptions
from serve.runtime.protocol import ContextLengthExceeded
from tests.unit.variant_fixtures import run, write_texts


def _explode(ctx):
    # an exception whose constructor does not take a message
    raise ContextLengthExceeded(0, 500, 64, 128)


if ("quantize", "test-explode") not in registry._METHODS:
    registry.register("quantize", "test-explode", config=NoOptions,
                      plan=lambda recipe, variant: ("onnx", "fp32"))(_explode)


def test_builtin_methods_are_registered_with_configs():
    assert {"int8-dynamic", "int8-static", "int4-weight-only", "nf4", "int8-bnb"} <= set(
        registry.names("quantize"))
    assert registry.names("export") == ["onnx", "onnx-genai"]
    int4 = registry.get("quantize", "int4-weight-only")
    assert int4.version >= 2 and "algorithm" in int4.config.model_fields
    with pytest.raises(KeyError, match=r"registered: .*int8-dynamic"):
        registry.get("quantize", "int3")


def _recipe(tmp_path, variant: str):
    (tmp_path / "base").mkdir(exist_ok=True)
    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\ntask: text-generation\nbase: {{path: base}}\n"
                    f"variants:\n  - {variant}\n")
    return load_recipe(path)


def test_recipe_validates_method_options_through_the_registry(tmp_path):
    recipe = _recipe(tmp_path, "{name: q, kind: quantize, method: int4-weight-only, "
                               "algorithm: gptq, block_size: 64}")
    options = recipe.variants[0].options
    assert type(options).__name__ == "Int4Options" and options.algorithm == "gptq"
    assert recipe.variants[0].model_dump()["options"]["block_size"] == 64
    bad = {"algorithm: gptqq": "unknown int4 algorithm 'gptqq'",
           "block_size: 48": "not a power of two",
           "calibration_method: entropy": "calibration_method: unknown field"}
    for option, message in bad.items():
        with pytest.raises(RecipeError, match=r"variants\[0\]: .*" + message):
            _recipe(tmp_path, f"{{name: q, kind: quantize, method: int4-weight-only, "
                              f"{option}}}")
    with pytest.raises(RecipeError, match=r"variants\[0\]\.method: unknown method 'int3'"):
        _recipe(tmp_path, "{name: q, kind: quantize, method: int3}")
    with pytest.raises(RecipeError, match=r"variants\[0\]\.algorithm: unknown onnx-genai"):
        _recipe(tmp_path, "{name: g, kind: export, format: onnx-genai, precision: int4, "
                          "algorithm: gptq}")


def test_failing_variant_is_reported_while_the_others_build(tiny, tmp_path):
    write_texts(tmp_path / "eval.jsonl", 8, labels=True)
    out, records = run(f"""
name: fail
task: text-classification
base: {{path: {tiny["bert"]}}}
data: {{eval: {{path: eval.jsonl}}}}
gates: {{min_agreement: 0.0, max_metric_drop: 1.0}}
variants:
  - {{name: boom, kind: quantize, method: test-explode}}
  - {{name: int8, kind: quantize, method: int8-dynamic}}
""", tmp_path)
    assert records["boom"].status == "failed"
    assert records["boom"].error.startswith("variant boom: max_new_tokens: 64 plus the 500")
    assert records["int8"].status == "built" and (out / "int8" / "manifest.json").is_file()
    assert not (out / "boom").exists()
    # built alone, the failure is one VariantFailed chained to the original exception
    from compress.stages.variants import build_variant

    recipe = load_recipe(tmp_path / "recipe.yaml")
    with pytest.raises(VariantFailed) as exc:
        build_variant(recipe, recipe.variants[0], out / "merge", out / "boom")
    assert isinstance(exc.value.__cause__, ContextLengthExceeded)
    assert exc.value.cause is exc.value.__cause__ and exc.value.variant == "boom"


def test_merge_refuses_classifier_without_head_weights(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    encoder = tmp_path / "encoder"
    model = AutoModelForSequenceClassification.from_pretrained(tiny["bert"])
    model.bert.save_pretrained(encoder, safe_serialization=True)  # no classifier.*
    AutoTokenizer.from_pretrained(tiny["bert"]).save_pretrained(encoder)
    write_texts(tmp_path / "eval.jsonl", 8, labels=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\ntask: text-classification\nbase: {{path: {encoder}}}\n"
                      "labels: [negative, positive]\n")
    from compress.pipeline import run_recipe

    with pytest.raises(InputError, match=r"base\.path: .* has no classifier head weights "
                                         r"\(none of classifier\.weight"):
        run_recipe(load_recipe(recipe), tmp_path / "out")
