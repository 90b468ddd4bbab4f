"""TorchRuntime answers equal a plain transformers forward / generate on the tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compress.models import copy_model_folder
from serve.artifact import Manifest, write_manifest
from serve.runtime.loader import load_runtime
from serve.runtime.protocol import GenerationParams, UnsupportedRequest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

TEXTS = ["the movie was great and the music was wonderful", "bad",
         "what is the capital of france ?", "i really hate this film , it was so dull"]


def torch_artifact(src: Path, dst: Path, task: str, precision: str = "fp32") -> Path:
    """Copy a model folder into an artifact with a manifest."""
    dst.mkdir(parents=True)
    copy_model_folder(src, dst)
    write_manifest(dst, Manifest(name=dst.name, task=task, format="torch", precision=precision))
    return dst


@pytest.fixture(scope="module")
def bert_rt(tiny, tmp_path_factory):
    path = torch_artifact(tiny["bert"], tmp_path_factory.mktemp("rt") / "bert",
                          "text-classification")
    return load_runtime(path, device="cpu")


@pytest.fixture(scope="module")
def llama_rt(tiny, tmp_path_factory):
    path = torch_artifact(tiny["llama"], tmp_path_factory.mktemp("rt") / "llama",
                          "text-generation")
    return load_runtime(path, device="cpu")


@pytest.fixture(scope="module")
def plain_llama(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(tiny["llama"]).eval(),
            AutoTokenizer.from_pretrained(tiny["llama"]))


def test_classification_matches_plain_forward(bert_rt, tiny):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny["bert"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny["bert"])
    with torch.no_grad():
        expected = [torch.softmax(model(**tok(t, return_tensors="pt")).logits, -1)[0].numpy()
                    for t in TEXTS]  # one at a time: no padding involved
    probs = bert_rt.class_probabilities(TEXTS)
    assert probs.shape == (4, 2)
    np.testing.assert_allclose(probs, np.stack(expected), atol=1e-5)
    results = bert_rt.classify(TEXTS)
    assert bert_rt.labels == ["negative", "positive"]
    for res, row in zip(results, expected, strict=True):
        assert res.label == bert_rt.labels[int(row.argmax())]
        assert res.score == pytest.approx(float(row.max()), abs=1e-5)
        assert sum(res.scores.values()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UnsupportedRequest):
        bert_rt.generate(["x"], GenerationParams())


def test_greedy_generation_matches_plain_generate(llama_rt, plain_llama):
    model, tok = plain_llama
    params = GenerationParams(max_new_tokens=6)
    got = llama_rt.generate(TEXTS[:3], params)
    for prompt, gen in zip(TEXTS[:3], got, strict=True):
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        if 3 in new:  # EOS ends the completion
            new = new[:new.index(3)]
        assert gen.text == tok.decode(new, skip_special_tokens=True)
        assert gen.prompt_tokens == enc["input_ids"].shape[1]
        assert gen.completion_tokens == len(new)
        assert gen.finish_reason == ("length" if len(new) == 6 else "stop")


def test_sampling_is_seeded_and_matches_plain_generate(llama_rt, plain_llama):
    model, tok = plain_llama
    params = GenerationParams(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7)
    first = llama_rt.generate(["the movie was"], params)[0]
    assert llama_rt.generate(["the movie was"], params)[0] == first
    torch.manual_seed(7)
    enc = tok("the movie was", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=True, temperature=1.5,
                             top_p=0.9, top_k=0, pad_token_id=0)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    new = new[:new.index(3)] if 3 in new else new
    assert first.text == tok.decode(new, skip_special_tokens=True)


def test_stop_sequence(llama_rt):
    params = GenerationParams(max_new_tokens=8)
    full = llama_rt.generate(["who was the actor in that scene ?"], params)[0]
    words = full.text.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = llama_rt.generate(["who was the actor in that scene ?"],
                            GenerationParams(max_new_tokens=8, stop=[stop]))[0]
    assert cut.text == full.text[:full.text.find(stop)]
    assert cut.finish_reason == "stop"
    assert cut.completion_tokens <= full.completion_tokens


def test_next_token_logprobs_match_plain_forward(llama_rt, plain_llama):
    model, tok = plain_llama
    got = llama_rt.next_token_logprobs(TEXTS[:2])
    for text, (ids, lp) in zip(TEXTS[:2], got, strict=True):
        enc = tok(text, return_tensors="pt")
        assert ids.tolist() == enc["input_ids"][0].tolist()
        assert ids[0] == tok.bos_token_id
        with torch.no_grad():
            expected = torch.log_softmax(model(**enc).logits[0, :-1], -1).numpy()
        assert lp.shape == (len(ids) - 1, len(tok))
        np.testing.assert_allclose(lp, expected, atol=1e-4)
    assert llama_rt.count_tokens(TEXTS[0]) == len(tok(TEXTS[0])["input_ids"])


def test_bf16_precision_agrees_with_fp32(tiny, tmp_path, bert_rt):
    path = torch_artifact(tiny["bert"], tmp_path / "bf16", "text-classification", "bf16")
    rt = load_runtime(path, device="cpu")
    assert rt.model.dtype == torch.bfloat16
    np.testing.assert_allclose(rt.class_probabilities(TEXTS), bert_rt.class_probabilities(TEXTS),
                               atol=2e-2)


def test_bitsandbytes_nf4_artifact_loads_through_its_config(tiny, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BitsAndBytesConfig,
    )

    # bitsandbytes' CPU 4-bit kernels need in_features >= 64: a wider BERT than the tiny one
    tok = AutoTokenizer.from_pretrained(tiny["bert"])
    torch.manual_seed(0)
    wide = AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64, num_labels=2, pad_token_id=0,
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}))
    src = tmp_path / "wide"
    wide.save_pretrained(src, safe_serialization=True)
    tok.save_pretrained(src)
    reference = load_runtime(torch_artifact(src, tmp_path / "fp32", "text-classification"),
                             device="cpu")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=["classifier"])
    model = AutoModelForSequenceClassification.from_pretrained(
        src, quantization_config=config, device_map={"": "cpu"})
    dst = tmp_path / "nf4"
    model.save_pretrained(dst, safe_serialization=True)
    tok.save_pretrained(dst)
    write_manifest(dst, Manifest(name="nf4", task="text-classification", format="torch",
                                 precision="nf4"))
    rt = load_runtime(dst, device="cpu")
    assert type(rt.model.bert.encoder.layer[0].attention.self.query).__name__ == "Linear4bit"
    probs = rt.class_probabilities(TEXTS)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, reference.class_probabilities(TEXTS), atol=0.1)


def test_prompt_that_does_not_fit_the_context_is_refused_not_cut(llama_rt, plain_llama):
    from serve.errors import ModelpressError
    from serve.runtime.protocol import ContextLengthExceeded

    _, tok = plain_llama
    context = llama_rt.model.config.max_position_embeddings
    assert context == 128  # the tiny Llama
    prompt = "what is the capital of france ?"
    n = len(tok(prompt)["input_ids"])
    # the whole room is usable: prompt + max_new_tokens == context, prompt kept whole
    fits = llama_rt.generate(["i love", prompt], GenerationParams(max_new_tokens=context - n))
    assert fits[1].prompt_tokens == n
    assert fits[1].completion_tokens <= context - n
    short = len(tok("i love")["input_ids"])
    # one token too many: only the long prompt overflows; from `context` on, both do
    for max_new, first in ((context - n + 1, (1, n)), (context, (0, short)),
                           (2 * context, (0, short))):
        with pytest.raises(ContextLengthExceeded) as info:
            llama_rt.generate(["i love", prompt], GenerationParams(max_new_tokens=max_new))
        assert isinstance(info.value, ModelpressError)
        assert (info.value.index, info.value.prompt_tokens) == first
        assert str(info.value).startswith(f"max_new_tokens: {max_new} ")
        assert f"context of {context} tokens" in str(info.value)
    assert not llama_rt._lock.locked()
    assert llama_rt.generate([prompt], GenerationParams(max_new_tokens=4))[0].prompt_tokens == n
