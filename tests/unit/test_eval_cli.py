"""`modelpress eval` on tiny torch artifacts: numbers equal a plain forward pass, results
stored in the manifest (hashes still valid), bad data gives one clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compress.models import copy_model_folder
from serve.artifact import Manifest, load_artifact, write_manifest
from tests.conftest import run_cli


def run_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The real CLI entry point, in this process (saves the subprocess import time)."""
    from compress.cli import main

    monkeypatch.setattr("sys.argv", ["modelpress", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err

TEXTS = ["the movie was great", "a boring plot", "i really hate this film", "wonderful music",
         "the worst actor", "fun and funny", "dull , sad and bad", "brilliant story"]


@pytest.fixture(scope="module")
def artifacts(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    out = []
    for name, src in (("base", tiny["bert"]), ("other", tiny["bert"])):
        dst = root / name
        dst.mkdir()
        copy_model_folder(src, dst)
        if name == "other":  # a different model: perturbed classifier head
            from safetensors.torch import load_file, save_file

            weights = load_file(dst / "model.safetensors")
            weights["classifier.weight"] = weights["classifier.weight"].flip(0) * 3
            save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
        write_manifest(dst, Manifest(name=name, task="text-classification", format="torch",
                                     precision="fp32"))
        out.append(dst)
    return out


def _plain_argmax(folder, texts):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return np.array([int(model(**tok(t, return_tensors="pt")).logits.argmax()) for t in texts])


def test_eval_cli_scores_and_records(artifacts, tmp_path):
    base, other = artifacts
    gold = ["positive", "negative", "negative", "positive"] * 2
    data = tmp_path / "eval.csv"
    data.write_text("sentence,sentiment\n" + "".join(f"{t},{g}\n" for t, g in
                                                     zip(TEXTS, gold, strict=True)).replace(
        " , ", " ; "))
    proc = run_cli("eval", str(base), str(other), "--data", str(data), "--reference", str(base),
                   "--text", "sentence", "--label", "sentiment", "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    names = ["negative", "positive"]
    gold_ids = np.array([names.index(g) for g in gold])
    texts = [t.replace(" , ", " ; ") for t in TEXTS]
    base_pred, other_pred = _plain_argmax(base, texts), _plain_argmax(other, texts)
    r_base, r_other = results[str(base)], results[str(other)]
    assert r_base["n"] == 8 and r_base["metric"] == "accuracy"
    assert r_base["value"] == pytest.approx(np.mean(base_pred == gold_ids))
    assert r_other["value"] == pytest.approx(np.mean(other_pred == gold_ids))
    assert r_base["ci95"][0] <= r_base["value"] <= r_base["ci95"][1]
    assert r_base["reference"]["agreement"] == 1.0 and r_base["reference"]["kl"] == 0.0
    assert r_other["reference"]["agreement"] == pytest.approx(np.mean(base_pred == other_pred))
    assert r_other["reference"]["kl"] > 0
    assert r_other["reference"]["metric_drop"] == pytest.approx(
        r_base["value"] - r_other["value"])
    # stored in the manifest, file hashes still valid
    stored = load_artifact(other, verify=True).manifest.eval["eval.csv"]
    assert stored["value"] == r_other["value"] and stored["reference"] == r_other["reference"]
    assert stored["data_sha256"] and stored["reference_artifact"] == str(base.resolve())


def test_eval_cli_table_and_bad_data(artifacts, tmp_path, monkeypatch, capsys):
    base, _ = artifacts
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": "fun", "label": "positive"}) + "\n"
                    + json.dumps({"text": "meh", "label": "neutral"}) + "\n")
    code, _, err = run_in_process(monkeypatch, capsys, "eval", str(base), "--data", str(data))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "bad.jsonl:2: field 'label': unknown label 'neutral'" in lines[0]
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "fun", "label": "positive"}) + "\n")
    code, out, err = run_in_process(monkeypatch, capsys, "eval", str(base), "--data", str(good),
                                    "--no-save")
    assert code == 0, err
    acc = float(_plain_argmax(base, ["fun"])[0] == 1)
    assert "accuracy" in out and "good.jsonl" in out and f"{acc:.4f} [{acc:.4f}, {acc:.4f}]" in out
    assert "good.jsonl" not in load_artifact(base).manifest.eval


@pytest.mark.parametrize("task,model", [("text-classification", "bert"),
                                        ("text-generation", "llama")])
def test_torch_artifact_and_its_onnx_export_give_the_same_metric(tiny, tmp_path, task, model):
    pytest.importorskip("onnxruntime")
    from compress.data import Example
    from compress.evaluate import evaluate
    from compress.stages.export import export_onnx
    from serve.runtime.loader import load_runtime

    torch_dir, onnx_dir = tmp_path / "torch", tmp_path / "onnx"
    torch_dir.mkdir()
    onnx_dir.mkdir()
    copy_model_folder(tiny[model], torch_dir)
    write_manifest(torch_dir, Manifest(name="torch", task=task, format="torch", precision="fp32"))
    export_onnx(torch_dir, onnx_dir, task)
    write_manifest(onnx_dir, Manifest(name="onnx", task=task, format="onnx", precision="fp32"))
    if task == "text-classification":
        examples = [Example(text=t, label=["positive", "negative"][i % 2])
                    for i, t in enumerate(TEXTS)]
    else:  # perplexity data: one text longer than the context, so windows are used
        examples = [Example(text=" ".join(TEXTS * k)) for k in (1, 3, 40)]
    reference = load_runtime(torch_dir, device="cpu")
    onnx_rt = load_runtime(onnx_dir, device="cpu")
    torch_result = evaluate(reference, examples, progress=False)
    onnx_result = evaluate(onnx_rt, examples, reference_runtime=reference, progress=False)
    assert onnx_result["metric"] == torch_result["metric"]
    assert onnx_result["value"] == pytest.approx(torch_result["value"], rel=1e-4)
    assert onnx_result["reference"]["agreement"] == 1.0
    assert onnx_result["reference"]["kl"] < 1e-6
    assert abs(onnx_result["reference"]["metric_drop"]) < 1e-4


def test_answers_eval_of_a_generator_against_itself(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.data import Example
    from compress.evaluate import evaluate
    from serve.runtime.loader import load_runtime

    art = tmp_path / "llama"
    art.mkdir()
    copy_model_folder(tiny["llama"], art)
    write_manifest(art, Manifest(name="llama", task="text-generation", format="torch",
                                 precision="fp32"))
    model = AutoModelForCausalLM.from_pretrained(tiny["llama"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    prompts = TEXTS[:4]
    answers = []
    for i, prompt in enumerate(prompts):  # half the answers are a word the plain model says
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
        said = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).split()
        words = [w for w in said if w.isalpha()]
        answers.append(words[-1] if i % 2 == 0 and words else "zebra")
    expected = sum(a != "zebra" for a in answers) / 4
    assert expected > 0
    examples = [Example(text=p, answer=a) for p, a in zip(prompts, answers, strict=True)]
    runtime = load_runtime(art, device="cpu")
    result = evaluate(runtime, examples, reference_runtime=runtime, progress=False,
                      max_new_tokens=6)
    assert result["kind"] == "answers" and result["metric"] == "contains_answer"
    assert result["value"] == pytest.approx(expected)
    assert result["reference"]["agreement"] == 1.0 and result["reference"]["metric_drop"] == 0


def test_table_names_tell_same_named_artifacts_apart():
    from compress.commands.eval import short_names

    assert short_names(["/x/untuned/merge", "/x/tuned/merge", "/x/tuned/onnx-int8"]) == [
        "untuned/merge", "tuned/merge", "tuned/onnx-int8"]
    assert short_names(["/a/fp32", "/a/int8"]) == ["fp32", "int8"]
    assert short_names(["run/merge", "/abs/run/merge"]) == ["run/merge", "abs/run/merge"]
