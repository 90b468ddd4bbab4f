from pathlib import Path

import pytest

from compress.errors import RecipeError
from compress.recipe import load_recipe
from compress.recipe_sections import DistillConfig


def _write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "base").mkdir(exist_ok=True)
    path = tmp_path / "r.yaml"
    path.write_text(body)
    return path


GOOD = """
name: demo
task: text-classification
base: {path: base}
stages: [{kind: merge}, {kind: distill, student_layers: 3}]
variants:
  - {name: onnx-fp32, kind: export}
  - {name: int8, kind: quantize, method: int8-dynamic}
"""


def test_valid_recipe_resolves_paths_relative_to_file(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD))
    assert recipe.base.path == (tmp_path / "base").resolve()
    assert isinstance(recipe.stages[1], DistillConfig)
    assert recipe.stages[1].student_layers == 3
    assert [v.name for v in recipe.variants] == ["onnx-fp32", "int8"]
    assert recipe.gates.min_agreement == 0.98


def test_set_override_changes_nested_list_item(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD), ["stages[1].student_layers=2",
                                                  "gates.max_metric_drop=0.05"])
    assert recipe.stages[1].student_layers == 2
    assert recipe.gates.max_metric_drop == 0.05


def test_all_errors_reported_with_locations(tmp_path):
    body = GOOD.replace("student_layers: 3", "student_layers: 0").replace(
        "task: text-classification", "task: text-classification\nbse: {}")
    with pytest.raises(RecipeError) as exc:
        load_recipe(_write(tmp_path, body))
    message = str(exc.value)
    assert "stages[1].student_layers: must be > 0" in message
    assert "bse: unknown field" in message


def test_missing_base_directory_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD.replace("path: base", "path: nowhere"))
    with pytest.raises(RecipeError, match=r"base\.path: no such directory"):
        load_recipe(path)


def test_unknown_method_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match=r"variants\[1\]\.method"):
        load_recipe(_write(tmp_path, GOOD.replace("int8-dynamic", "int3")))
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "name: [unclosed\n"))


def test_set_unknown_path_rejected(tmp_path):
    with pytest.raises(RecipeError, match=r"stages\[7\] does not exist"):
        load_recipe(_write(tmp_path, GOOD), ["stages[7].student_layers=2"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(_write(tmp_path, GOOD), ["gates"])


def test_duplicate_variant_names_rejected(tmp_path):
    body = GOOD.replace("name: int8,", "name: onnx-fp32,")
    with pytest.raises(RecipeError, match="used twice"):
        load_recipe(_write(tmp_path, body))
