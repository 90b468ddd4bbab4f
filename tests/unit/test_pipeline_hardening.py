"""Pipeline hardening (issue 20 rows 8, 9 and the smaller artifact items; issue 19 item 5):
temp leftovers cleaned everywhere the pipeline writes, one stage per kind, a run whose
every variant failed exits 2, verify_files refuses symlinks leaving the artifact."""

from __future__ import annotations

import os

import pytest

from compress.cli import exit_code
from compress.errors import RecipeError
from compress.pipeline import StepRecord, run_recipe
from compress.recipe import load_recipe
from serve.artifact import ArtifactError, Manifest, load_artifact, save_manifest, write_manifest
from serve.errors import ModelpressError
from tests.conftest import run_cli

RECIPE = """name: hardening
task: {task}
base: {{path: {base}}}
adapters: [{{path: {adapter}}}]
stages: {stages}
variants: {variants}
"""


def _recipe(tmp_path, tiny, stages="[{kind: merge}]", variants="[]",
            task="text-classification", model="bert"):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(task=task, base=tiny[model], adapter=tiny[f"{model}-lora"],
                                  stages=stages, variants=variants))
    return path


def test_rerun_removes_temp_leftovers_in_cache_and_checkpoints(tmp_path, tiny):
    out = tmp_path / "out"
    killed_export = out / ".cache" / ".tmp-onnx-fp32-0123456789abcdef-1a2b3c4d"
    killed_export.mkdir(parents=True)
    (killed_export / "model.onnx").write_bytes(b"half an export")
    finished_export = out / ".cache" / "onnx-fp32-0123456789abcdef"
    finished_export.mkdir()
    (finished_export / "export.json").write_text("{}")
    checkpoint = out / ".distill-checkpoints" / "key"
    checkpoint.mkdir(parents=True)
    (checkpoint / ".tmp-last.pt").write_bytes(b"half a checkpoint")
    (checkpoint / "last.pt").write_bytes(b"a checkpoint")
    (out / ".tmp-merge-1a2b3c4d").mkdir()

    run_recipe(load_recipe(_recipe(tmp_path, tiny)), out)

    assert not killed_export.exists()
    assert not (checkpoint / ".tmp-last.pt").exists()
    assert not (out / ".tmp-merge-1a2b3c4d").exists()
    assert (finished_export / "export.json").is_file()
    assert (checkpoint / "last.pt").is_file()
    assert load_artifact(out / "merge").manifest.name == "merge"


def test_repeated_stage_kind_is_refused_in_one_line(tmp_path, tiny):
    recipe = _recipe(tmp_path, tiny, stages="[{kind: merge}, {kind: merge}]")
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    message = str(info.value)
    assert "kind 'merge' appears twice (stages[0] and stages[1])" in message
    assert "\n" not in message


def _record(name: str, status: str) -> StepRecord:
    return StepRecord(name, name, f"out/{name}", status,
                      error="variant x: broken" if status == "failed" else None)


def test_exit_code_of_a_run():
    merge = _record("merge", "built")
    assert exit_code([merge, _record("a", "built"), _record("b", "cached")], 1) == 0
    assert exit_code([merge], 1) == 0
    assert exit_code([merge, _record("a", "built"), _record("b", "failed")], 1) == 1
    with pytest.raises(ModelpressError, match=r"every variant failed \(2 of 2; first: "
                                              r"variant x: broken\); nothing deployable"):
        exit_code([merge, _record("a", "failed"), _record("b", "failed")], 1)


def test_compress_whose_every_variant_failed_exits_2_with_one_error_line(tmp_path, tiny):
    # onnx-genai is for text-generation: planning this classifier's variant fails.
    recipe = _recipe(tmp_path, tiny, variants="[{name: genai, kind: export, "
                                              "format: onnx-genai, precision: int4}]")
    result = run_cli("compress", str(recipe), "--out", str(tmp_path / "out"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and "every variant failed (1 of 1" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def _artifact(folder):
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"weights")
    return write_manifest(folder, Manifest(name="x", task="text-classification",
                                           format="onnx", precision="fp32"))


def test_symlink_leaving_the_artifact_is_refused(tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"weights")
    folder = tmp_path / "a"
    manifest = _artifact(folder)
    (folder / "model.bin").unlink()
    os.symlink(outside, folder / "model.bin")  # same bytes: the hash check alone passes
    with pytest.raises(ArtifactError, match=r"model\.bin: symlink to .*secret\.bin, outside"):
        load_artifact(folder)

    (folder / "model.bin").unlink()
    (folder / "model.bin").write_bytes(b"weights")
    os.symlink(tmp_path, folder / "up")
    with pytest.raises(ArtifactError, match=r"up: symlink to .*, outside the artifact"):
        load_artifact(folder)
    (folder / "up").unlink()
    os.symlink(folder / "model.bin", folder / "alias.bin")  # inside: an ordinary file
    write_manifest(folder, manifest)
    assert {f.path for f in load_artifact(folder).manifest.files} == {"model.bin", "alias.bin"}


def test_manifest_paths_are_normalised(tmp_path):
    folder = tmp_path / "a"
    manifest = _artifact(folder)
    manifest.files[0].path = "./model.bin"
    save_manifest(folder, manifest)
    assert load_artifact(folder).manifest.files[0].path == "./model.bin"
    manifest.files[0].path = "../a/model.bin"
    save_manifest(folder, manifest)
    with pytest.raises(ArtifactError, match=r"manifest entry '\.\./a/model\.bin' is outside"):
        load_artifact(folder)
