"""`modelpress compress` / `inspect` as a user runs them: caching, recovery, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve.artifact import ArtifactError, load_artifact
from tests.conftest import ROOT, run_cli

RECIPE = """name: cli
task: {task}
base: {{path: {base}}}
adapters: [{{path: {adapter}}}]
stages: [{{kind: merge}}]
"""


def _recipe(tmp_path, base, adapter, task="text-generation", name="r.yaml"):
    path = tmp_path / name
    path.write_text(RECIPE.format(task=task, base=base, adapter=adapter))
    return path


def test_rerun_reuses_cache_and_inspect_shows_fidelity(tmp_path, tiny):
    recipe = _recipe(tmp_path, tiny["llama"], tiny["llama-lora"])
    out = tmp_path / "out"
    first = run_cli("compress", str(recipe), "--out", str(out))
    assert first.returncode == 0, first.stderr
    weights = out / "merge" / "model.safetensors"
    mtime, manifest_before = weights.stat().st_mtime_ns, (out / "merge/manifest.json").read_text()
    second = run_cli("compress", str(recipe), "--out", str(out))
    assert second.returncode == 0, second.stderr
    assert "unchanged, reusing" in second.stdout
    run = json.loads((out / "run.json").read_text())
    assert [s["status"] for s in run["steps"]] == ["cached"]
    assert weights.stat().st_mtime_ns == mtime
    assert (out / "merge/manifest.json").read_text() == manifest_before

    shown = run_cli("inspect", str(out / "merge"), "--json")
    assert shown.returncode == 0
    manifest = json.loads(shown.stdout)
    assert manifest["metrics"]["max_abs_diff"] < 1e-5
    assert manifest["lineage"]["inputs"][1]["role"] == "adapter"
    # A changed recipe (new tolerance) is not a cache hit.
    third = run_cli("compress", str(recipe), "--out", str(out),
                    "--set", "stages[0].tolerance=0.01")
    assert third.returncode == 0
    assert json.loads((out / "run.json").read_text())["steps"][0]["status"] == "built"


def test_killed_run_leaves_nothing_complete_and_resumes(tmp_path, tiny):
    recipe = _recipe(tmp_path, tiny["llama"], tiny["llama-lora"])
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", "from compress.cli import main; main()",
                             "compress", str(recipe), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob(".tmp-merge-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, "run finished before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "merge").exists()
    with pytest.raises(ArtifactError):
        load_artifact(out / "merge")
    rerun = run_cli("compress", str(recipe), "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr
    assert not list(out.glob(".tmp-*"))
    assert load_artifact(out / "merge").manifest.metrics["max_abs_diff"] < 1e-5


def test_tampered_artifact_refused_by_inspect(tmp_path, tiny):
    recipe = _recipe(tmp_path, tiny["bert"], tiny["bert-lora"], task="text-classification")
    out = tmp_path / "out"
    assert run_cli("compress", str(recipe), "--out", str(out)).returncode == 0
    config = out / "merge" / "config.json"
    config.write_text(config.read_text().replace('"hidden_act"', '"hidden_act" ', 1))
    result = run_cli("inspect", str(out / "merge"))
    assert result.returncode == 2
    assert "config.json: sha256 does not match the manifest" in result.stderr
    assert "Traceback" not in result.stderr


def _other_llama_adapter(tmp_path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.tiny import build_adapter
    other = tmp_path / "other-llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=64)).save_pretrained(other)
    return build_adapter(other, tmp_path / "other-lora", "text-generation")


def _assert_one_line_error(result, expected: str, out: Path) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and expected in lines[-1], result.stderr
    assert not out.exists()


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, tiny):
    out = tmp_path / "out"
    missing = _recipe(tmp_path, tmp_path / "nope", tiny["llama-lora"], name="missing.yaml")
    _assert_one_line_error(run_cli("compress", str(missing), "--out", str(out)),
                           "base.path: no such directory", out)

    typo = tmp_path / "typo.yaml"
    typo.write_text(RECIPE.format(task="text-generation", base=tiny["llama"],
                                  adapter=tiny["llama-lora"]) + "stagse: []\n")
    _assert_one_line_error(run_cli("compress", str(typo), "--out", str(out)),
                           "stagse: unknown field", out)

    wrong_shape = _recipe(tmp_path, tiny["llama"], _other_llama_adapter(tmp_path),
                          name="shape.yaml")
    _assert_one_line_error(run_cli("compress", str(wrong_shape), "--out", str(out)),
                           "adapter does not fit this base model (size mismatch", out)

    wrong_modules = _recipe(tmp_path, tiny["bert"], tiny["llama-lora"],
                            task="text-classification", name="modules.yaml")
    _assert_one_line_error(run_cli("compress", str(wrong_modules), "--out", str(out)),
                           "adapter does not fit this base model", out)

    corrupt_base = tmp_path / "corrupt"
    shutil.copytree(tiny["llama"], corrupt_base)
    weights = corrupt_base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    corrupt = _recipe(tmp_path, corrupt_base, tiny["llama-lora"], name="corrupt.yaml")
    _assert_one_line_error(run_cli("compress", str(corrupt), "--out", str(out)),
                           f"{weights}: corrupt safetensors file", out)
