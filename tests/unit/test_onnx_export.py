"""The ONNX exporter without optimum (compress/stages/onnx_export.py): classifiers and KV-cache
causal LMs of every architecture it takes, against torch on padded batches."""

from __future__ import annotations

import numpy as np
import pytest

from compress.stages.export import ExportError, check_classifier, export_onnx
from compress.tiny_archs import build_decoder

COMMON = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 64, "max_position_embeddings": 128}
# this exporter's decoders: 2 layers, windows of 4, the architectures' own tied embeddings,
# and transformers' defaults for what the torch path's models set (None)
ONNX_SHAPE = {"layers": 2, "window": 4, "tied": None}
ONNX_FIELDS = {
    "phi3": {"sliding_window": None},
    "smollm3": {"no_rope_layer_interval": None},
    "gemma3": {"query_pre_attn_scalar": None},
    # global layers of another head size (64) than the sliding ones (16), no KV sharing
    "gemma4": {"global_head_dim": 64, "layer_types": ["sliding_attention", "full_attention"],
               "vocab_size_per_layer_input": None, "hidden_size_per_layer_input": None,
               "num_kv_shared_layers": None},
    "qwen3_5": {"linear_key_head_dim": None, "linear_value_head_dim": None,
                "linear_num_key_heads": None, "linear_num_value_heads": None},
}


def _decoder(name: str, dst):
    """This module's tiny ``name`` decoder, saved in ``dst``."""
    return build_decoder(name, dst, **ONNX_SHAPE, fields=ONNX_FIELDS.get(name))


def _classifier(name: str, vocab: int):
    import transformers as tf

    cfg = {**COMMON, "vocab_size": vocab, "num_labels": 2, "pad_token_id": 0}
    builders = {
        "xlm-roberta": lambda: tf.XLMRobertaForSequenceClassification(
            tf.XLMRobertaConfig(**{**cfg, "max_position_embeddings": 130})),
        "roberta": lambda: tf.RobertaForSequenceClassification(
            tf.RobertaConfig(**{**cfg, "max_position_embeddings": 130})),
        "modernbert": lambda: tf.ModernBertForSequenceClassification(tf.ModernBertConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128, num_labels=2,
            pad_token_id=0, cls_token_id=2, sep_token_id=3, global_attn_every_n_layers=2,
            local_attention=8)),
        "distilbert": lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
            max_position_embeddings=128, num_labels=2, pad_token_id=0)),
    }
    return builders[name]


def _save(build, tokenizer_dir, dst):
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    build().eval().save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def _ort_vs_torch(folder, onnx_dir) -> float:
    """Worst logit difference on left-padded batches: batch 2 with past 5 + 3 new tokens,
    batch 2 with no past, batch 3 decoding one token over pasts of unequal length."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    layers = model.config.num_hidden_layers
    worst = 0.0
    for rows, past, new, pads in [(2, 5, 3, [0, 2]), (2, 0, 6, [3, 0]), (3, 7, 1, [0, 4, 6])]:
        gen = torch.Generator().manual_seed(rows + past + new)
        ids = torch.randint(4, model.config.vocab_size, (rows, past + new), generator=gen)
        mask = torch.ones_like(ids)
        for row, pad in enumerate(pads):
            mask[row, :pad] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        feed = {"input_ids": ids[:, past:].numpy(), "attention_mask": mask.numpy(),
                "position_ids": positions[:, past:].numpy()}
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            cache = model(input_ids=ids[:, :past], attention_mask=mask[:, :past],
                          position_ids=positions[:, :past], cache=DynamicCache(),
                          use_cache=True).cache if past else None
        for n in range(layers):
            for kind, attr in (("key", "keys"), ("value", "values")):
                shape = shapes[f"past_key_values.{n}.{kind}"]
                feed[f"past_key_values.{n}.{kind}"] = (
                    getattr(cache.layers[n], attr).numpy() if past else
                    np.zeros((rows, shape[1], 0, shape[3]), dtype=np.float32))
        logits, *present = session.run(None, feed)
        assert present[0].shape[2] == past + new
        real = mask[:, past:].numpy() == 1
        worst = max(worst, float(np.abs(logits - ref[:, past:].numpy())[real].max()))
    return worst


@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen2", "mistral", "phi3", "smollm3",
                                  "gemma3", "gemma4"])
def test_causal_lm_padded_batch_with_past_matches_torch(name, tiny, tmp_path):
    folder = tiny["llama"] if name == "llama" else _decoder(name, tmp_path / name)
    details = export_onnx(folder, tmp_path / "onnx", "text-generation")
    assert details["exporter"] == "transformers.exporters.OnnxExporter"
    assert details["opset"] >= 18
    assert (tmp_path / "onnx" / "tokenizer.json").is_file()
    assert _ort_vs_torch(folder, tmp_path / "onnx") < 1e-4


@pytest.mark.parametrize("name", ["xlm-roberta", "roberta", "modernbert", "distilbert"])
def test_classifier_exports_match_torch(name, tiny, tmp_path):
    folder = _save(_classifier(name, 82), tiny["bert"], tmp_path / name)
    export_onnx(folder, tmp_path / "onnx", "text-classification")
    check = check_classifier(folder, tmp_path / "onnx", 1e-4, n=8)
    assert check["max_abs_diff"] <= check["allowed_abs_diff"]
    assert check["top1_agreement"] == 1.0


@pytest.mark.parametrize("task", ["text-classification", "text-generation"])
def test_models_are_traced_through_eager_attention(task, tiny, tmp_path):
    """The SDPA path's graph adds a Where per layer (fully masked rows) and ran slower in
    ONNX Runtime (MiniLM ~8% at batch 16, SmolLM2 decode 1.07-1.49x); the eager one builds
    its mask once (docs/benchmarks.md)."""
    import json

    import onnx

    folder = tiny["bert" if task == "text-classification" else "llama"]
    details = export_onnx(folder, tmp_path / "onnx", task)
    assert details["attention"] == "eager"
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    assert layers >= 2
    assert sum(node.op_type == "Where" for node in graph.node) < layers
    if task == "text-generation":
        assert _ort_vs_torch(folder, tmp_path / "onnx") < 1e-4
        return
    check = check_classifier(folder, tmp_path / "onnx", 1e-4, n=8)
    assert check["max_abs_diff"] <= check["allowed_abs_diff"]
    assert check["top1_agreement"] == 1.0


def test_hybrid_decoder_is_refused_in_one_line(tmp_path):
    folder = _decoder("qwen3_5", tmp_path / "qwen3_5")
    with pytest.raises(ExportError) as info:
        export_onnx(folder, tmp_path / "onnx", "text-generation")
    message = str(info.value)
    assert "\n" not in message
    assert "Qwen3_5ForCausalLM" in message and "onnx-genai" in message
    assert not (tmp_path / "onnx" / "model.onnx").exists()


def test_onnx_runtime_generates_like_torch(tiny, tmp_path):
    """The ONNX LM runtime (no optimum): batched greedy = alone = torch runtime, streamed =
    generated, stop sequences cut as torch's, seeded sampling reproducible, log-probs."""
    from serve.runtime.loader import load_runtime
    from serve.runtime.protocol import GenerationParams
    from tests.unit.test_step_lm import artifact

    onnx_rt = load_runtime(artifact(tiny["llama"], tmp_path / "onnx", "onnx"))
    torch_rt = load_runtime(artifact(tiny["llama"], tmp_path / "torch", "torch"))
    prompts = ["the movie was", "what is the capital of france ?", "i love it"]
    greedy = GenerationParams(max_new_tokens=12)
    batch = onnx_rt.generate(prompts, greedy)
    assert [g.text for g in batch] == [g.text for g in torch_rt.generate(prompts, greedy)]
    assert [g.text for g in batch] == [onnx_rt.generate([p], greedy)[0].text for p in prompts]
    words = batch[1].text.split()
    assert len(words) > 2
    stop = GenerationParams(max_new_tokens=12, stop=[" " + words[2]])
    cut = onnx_rt.generate([prompts[1]], stop)[0]
    assert cut.finish_reason == "stop" and cut.completion_tokens < 12
    assert cut.text == torch_rt.generate([prompts[1]], stop)[0].text
    sampled = GenerationParams(max_new_tokens=12, temperature=1.0, seed=7)
    assert onnx_rt.generate(prompts, sampled) == onnx_rt.generate(prompts, sampled)
    for (ids_t, lp_t), (ids_o, lp_o) in zip(torch_rt.next_token_logprobs(prompts),
                                            onnx_rt.next_token_logprobs(prompts), strict=True):
        assert np.array_equal(ids_t, ids_o) and np.abs(lp_t - lp_o).max() < 1e-4
    assert onnx_rt.eos_ids == torch_rt.eos_ids and onnx_rt.max_length == torch_rt.max_length


def test_old_recipes_graph_optimum_means_the_onnx_export():
    from compress.stages.methods import Int4Options

    assert Int4Options(graph="optimum").graph == "onnx"
    assert Int4Options().graph == "onnx" and Int4Options(graph="genai").graph == "genai"


def test_export_check_masks_eos_as_the_torch_reference_does(tiny, tmp_path):
    """The torch reference decodes with min_new_tokens (EOS masked): the ONNX greedy check
    must mask it too. Here EOS is the model's own first greedy token for every prompt, so an
    unmasked check would stop agreeing at once (the real SmolLM2 demo hit this)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from compress.models import sample_texts
    from compress.stages.export import check_causal_lm, copy_side_files

    folder = tmp_path / "eos-first"
    shutil.copytree(tiny["llama"], folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        firsts = {int(model(**tok(p, return_tensors="pt")).logits[0, -1].argmax())
                  for p in sample_texts(4)}
    config = GenerationConfig.from_pretrained(folder)
    config.eos_token_id = sorted(firsts)
    config.save_pretrained(folder)
    export_onnx(folder, tmp_path / "onnx", "text-generation")
    copy_side_files(folder, tmp_path / "onnx")
    check = check_causal_lm(folder, tmp_path / "onnx", 1e-4)
    assert check["greedy_identical"] == 1.0
