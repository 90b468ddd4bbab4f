"""Every LM runtime (torch, ONNX, onnxruntime-genai) keeps the whole ``LMRuntime`` contract
the engine, the token limits and the OpenAI routes read, with the same values."""

from __future__ import annotations

import numpy as np
import pytest

from serve.artifact import Manifest, write_manifest
from serve.errors import ArtifactError
from serve.runtime.loader import RUNTIMES, load_runtime
from serve.runtime.protocol import ContextLengthExceeded, GenerationParams, LMRuntime
from tests.conftest import run_cli
from tests.unit.variant_fixtures import build_lm_variants

FORMATS = ["merge", "onnx-fp32", "genai-fp32"]


@pytest.fixture(scope="module")
def runtimes(tiny, tmp_path_factory):
    out = build_lm_variants(tiny, tmp_path_factory.mktemp("contract"), [
        "{name: onnx-fp32, kind: export}",
        "{name: genai-fp32, kind: export, format: onnx-genai, precision: fp32}"])
    return {name: load_runtime(out / name, device="cpu") for name in FORMATS}


def test_every_lm_runtime_keeps_the_contract(runtimes):
    ids = list(runtimes["merge"].tokenizer("the movie is good")["input_ids"])
    reference = runtimes["merge"].prompt_logits(ids)
    for name, runtime in runtimes.items():
        for attribute in LMRuntime.__annotations__:
            assert hasattr(runtime, attribute), (name, attribute)
        assert isinstance(runtime.max_length, int) and runtime.max_length > len(ids), name
        assert isinstance(runtime.eos_ids, frozenset), name
        assert runtime.eos_ids == runtimes["merge"].eos_ids, name
        logits = runtime.prompt_logits(ids)
        assert logits.shape == reference.shape, name
        assert np.abs(logits - reference).max() < 1e-3, name
        step = runtime.step_lm()
        assert step.max_length <= runtime.max_length, name


def test_every_lm_runtime_refuses_a_prompt_too_long_instead_of_cutting_it(runtimes):
    for name, runtime in runtimes.items():
        words = " ".join(["movie"] * (runtime.max_length + 8))
        with pytest.raises(ContextLengthExceeded) as info:
            runtime.generate(["short", words], GenerationParams(max_new_tokens=4))
        assert info.value.index == 1, name
        assert info.value.prompt_tokens > runtime.max_length, name


def test_a_manifest_whose_format_no_runtime_serves_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "model.tflite").write_bytes(b"weights")
    write_manifest(folder, Manifest(name="art", task="text-generation", format="tflite",
                                    precision="fp32"))
    want = "unknown artifact format 'tflite'; known formats: onnx, onnx-genai, torch"
    with pytest.raises(ArtifactError) as info:
        load_runtime(folder, device="cpu")
    assert str(info.value) == f"{folder}: {want}"
    assert sorted(RUNTIMES) == ["onnx", "onnx-genai", "torch"]
    # modelpress serve refuses it before it starts a server
    result = run_cli("serve", str(folder), "--port", "1")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and want in errors[0], result.stderr
