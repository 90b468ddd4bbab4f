"""ONNX export of sequence classifiers and KV-cache causal LMs, without optimum.

The tracer is transformers' own ``transformers.exporters.OnnxExporter.export`` (one graph;
``torch.export`` then ``torch.onnx.export`` with onnxscript), not a bare
``torch.onnx.export``: it carries the patches tracing needs on transformers 5 (the cache
classes registered as pytree nodes, the vmap-free mask expansion of ``masking_utils``,
sliding-window cache layers traced as full ones, the SDPA math backend on the CPU) and
fixes the exported graph for ONNX Runtime. Its ``export_for_generation`` is not used: it
writes a prefill and a decode graph with its own I/O names, while the serving engine mixes
prefill chunks that continue a cache with decode steps in ONE forward
(:class:`serve.runtime.step_lm_onnx.OnnxStepLM`). So the causal LM is traced once from a sample
forward with a past (batch 2, left padding, 3 new tokens over 5 cached ones, every one of
those axes dynamic), and its inputs and outputs are renamed to the names optimum-onnx
used (``past_key_values.N.key`` ... ``present.N.value``), which the int4 / int8 / GGUF-import
quantizers and ``OnnxStepLM`` read. ONNX Runtime's fusions are left off: the quantizers
match plain ``MatMul`` nodes.
"""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXPORTER = "transformers.exporters.OnnxExporter"
#: Sequence classifiers exported and checked against torch (tests/unit/test_onnx_export.py).
CLASSIFIER_ARCHITECTURES = ("BertForSequenceClassification",
                            "RobertaForSequenceClassification",
                            "XLMRobertaForSequenceClassification",
                            "ModernBertForSequenceClassification",
                            "DistilBertForSequenceClassification")
#: Decoders whose cache is keys/values only (no recurrent state), exported and checked.
CAUSAL_LM_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "Phi3ForCausalLM", "Gemma3ForCausalLM",
                           "Gemma4ForCausalLM", "SmolLM3ForCausalLM")
#: Protobuf's limit: a bigger graph keeps its weights in ``model.onnx.data``.
MAX_SINGLE_FILE = 2 * 1024**3 - 64 * 1024**2
_CACHE_LEAF = re.compile(r"(?:^|\.)layers\.(\d+)\.(keys|values)$")


class UnsupportedArchitecture(ValueError):
    """The architecture is not one this exporter handles for the task."""


def check_exportable(config: dict[str, Any], task: str) -> str:
    """The model's architecture, when this exporter takes it for ``task``.

    Raises:
        UnsupportedArchitecture: one line naming the architecture and what it can use.
    """
    arch = (config.get("architectures") or ["?"])[0]
    known = (CLASSIFIER_ARCHITECTURES if task == "text-classification"
             else CAUSAL_LM_ARCHITECTURES)
    if arch in known:
        return arch
    if task != "text-classification" and "linear_attention" in (config.get("layer_types")
                                                                 or []):
        why = "its linear-attention layers keep a recurrent state, not a KV cache"
    else:
        why = "not one of " + ", ".join(known)
    other = ("torch formats (merge, nf4, int8-bnb)" if task == "text-classification"
             else "onnx-genai or the torch formats (merge, nf4, int8-bnb)")
    raise UnsupportedArchitecture(f"format onnx cannot export {arch} for {task} ({why}); "
                                  f"use {other}")


def _dynamic(*axes: int) -> dict[int, Any]:
    from torch.export import Dim

    return dict.fromkeys(axes, Dim.AUTO)


def export_classifier(model: Any) -> Any:
    """Trace a sequence classifier; ``onnx_ir.Model`` with dynamic batch and sequence axes.

    Inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model has
    token types), output ``logits``.
    """
    import torch
    from transformers.exporters import OnnxConfig, OnnxExporter

    vocab = model.config.vocab_size
    ids = torch.arange(10, dtype=torch.long).reshape(2, 5) % (vocab - 4) + 4
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    sample: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if (getattr(model.config, "type_vocab_size", 0) or 0) > 1 and \
            "token_type_ids" in inspect.signature(model.forward).parameters:
        sample["token_type_ids"] = torch.zeros_like(ids)
    shapes = {name: _dynamic(0, 1) for name in sample}
    exported = OnnxExporter().export(model, sample, OnnxConfig(dynamic=True,
                                                                dynamic_shapes=shapes))
    program = exported.program
    _rename(program, {}, {program.graph.outputs[0].name: "logits"})
    _name_axes(program)
    return program


def _causal_sample(model: Any) -> dict[str, Any]:
    """A forward with a past: batch 2 (row 1 left-padded by 2), 5 cached + 3 new tokens."""
    import torch
    from transformers import DynamicCache

    past, new = 5, 3
    vocab = model.config.vocab_size
    ids = torch.arange(2 * (past + new), dtype=torch.long).reshape(2, past + new)
    ids = ids % (vocab - 4) + 4
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # transformers 5.25 renames ``past_key_values`` to ``cache`` (the old name is deprecated)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"
    with torch.no_grad():
        # full layers only: a sliding-window layer would cut the sample's cache (the graph
        # keeps every key; the sliding mask applies the window)
        out = model(input_ids=ids[:, :past], attention_mask=mask[:, :past],
                    position_ids=positions[:, :past], use_cache=True,
                    **{key: DynamicCache()})
    cache = out.past_key_values if key == "past_key_values" else out.cache
    return {"input_ids": ids[:, past:], "attention_mask": mask,
            "position_ids": positions[:, past:], key: cache, "use_cache": True}


def export_causal_lm(model: Any) -> Any:
    """Trace a causal LM with its KV cache as one graph, optimum's I/O names.

    Inputs ``input_ids`` / ``position_ids`` ``[batch, sequence]``, ``attention_mask``
    ``[batch, past + sequence]``, ``past_key_values.N.key/value`` ``[batch, kv_heads,
    past, head_dim]`` (``past`` may be 0); outputs ``logits`` ``[batch, sequence, vocab]``
    and ``present.N.key/value`` (past + sequence).
    """
    from transformers.exporters import OnnxConfig, OnnxExporter
    from transformers.exporters.exporter_dynamo import (
        get_auto_dynamic_shapes,
        register_cache_pytrees_for_model,
    )

    sample = _causal_sample(model)
    key = "cache" if "cache" in sample else "past_key_values"
    register_cache_pytrees_for_model(model)
    cache_leaves = get_auto_dynamic_shapes(sample[key])
    shapes = {"input_ids": _dynamic(0, 1),
              "attention_mask": _dynamic(0, 1),
              "position_ids": _dynamic(0, 1),
              key: [_dynamic(0, 2) if spec and len(spec) == 4
                                  else None for spec in cache_leaves]}
    exported = OnnxExporter().export(model, sample, OnnxConfig(dynamic=True,
                                                                dynamic_shapes=shapes))
    program = exported.program
    inputs, outputs = {}, {}
    for value in program.graph.inputs:
        match = _CACHE_LEAF.search(value.name)
        if match:
            inputs[value.name] = f"past_key_values.{match[1]}.{match[2][:-1]}"
    for index, value in enumerate(program.graph.outputs):
        match = _CACHE_LEAF.search(value.name)
        if match:
            outputs[value.name] = f"present.{match[1]}.{match[2][:-1]}"
        elif index == 0:
            outputs[value.name] = "logits"
    if len(inputs) != 2 * model.config.num_hidden_layers or len(outputs) != len(inputs) + 1:
        raise UnsupportedArchitecture(
            f"format onnx cannot export {type(model).__name__} for text-generation (its "
            f"cache is not one key and one value per layer: inputs "
            f"{[v.name for v in program.graph.inputs]}); use onnx-genai or the torch formats")
    _rename(program, inputs, outputs)
    _name_axes(program)
    return program


def _rename(program: Any, inputs: dict[str, str], outputs: dict[str, str]) -> None:
    for value in program.graph.inputs:
        value.name = inputs.get(value.name, value.name)
    for value in program.graph.outputs:
        value.name = outputs.get(value.name, value.name)


def _name_axes(program: Any) -> None:
    """Readable dynamic axis names (batch_size, sequence_length, ...) on the graph I/O."""
    import onnx_ir as ir

    ids = {v.name: v.shape for v in program.graph.inputs}
    names = {str(ids["input_ids"][0]): "batch_size",
             str(ids["input_ids"][1]): "sequence_length",
             str(ids["attention_mask"][0]): "batch_size"}
    if "past_key_values.0.key" in ids:  # a causal LM: the mask spans past + new tokens
        names[str(ids["attention_mask"][1])] = "total_sequence_length"
        names[str(ids["past_key_values.0.key"][2])] = "past_sequence_length"
    else:
        names[str(ids["attention_mask"][1])] = "sequence_length"
    for value in [*program.graph.inputs, *program.graph.outputs]:
        if value.shape is None:
            continue
        total = {2: "total_sequence_length"} if value.name.startswith("present.") else {}
        dims = [ir.SymbolicDim(total.get(i) or names.get(str(d), str(d)))
                if isinstance(d, ir.SymbolicDim) else d for i, d in enumerate(value.shape)]
        value.shape = ir.Shape(dims)


def _module_path(node: Any) -> str | None:
    """The torch module a linear or embedding node came from, as optimum-onnx (TorchScript)
    named its nodes: ``/model/layers.0/self_attn/q_proj``; None for other nodes."""
    import ast

    props = {p.key: p.value for p in node.metadata_props}
    scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))
    if len(scopes) < 2 or not scopes[-1].startswith(("linear", "embedding")) \
            or not scopes[-2]:
        return None
    parts: list[str] = []
    for part in scopes[-2].split("."):
        if part.isdigit() and parts:
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return "/" + "/".join(parts)


def _plain_matmuls(model: Any) -> None:
    """Rewrite, in an ``onnx.ModelProto``, what the quantizers cannot read as a weight.

    Linear layers' nodes are named as optimum-onnx named them (``/lm_head/MatMul``: the
    int4 stage puts that node at 8 bits for ``int8_lm_head``).

    ``Gemm(x, W, transB=1)`` (a 2-D linear layer: a classifier head) becomes
    ``MatMul(x, W^T) + bias``: ONNX Runtime's per-channel dynamic quantizer mis-shapes a
    transposed Gemm weight. A ``MatMul`` fed by ``Transpose`` of a weight (the LM head of a
    model with tied embeddings) reads the transposed weight as an initializer, so
    MatMulNBits can quantize it, and the embedding ``Gather`` reads its ``Transpose``.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    nodes = []
    tied: dict[str, Any] = {}  # weight read as Transpose(weight) by a MatMul -> that MatMul
    taken = {n.name for n in graph.node}
    for node in graph.node:
        module = _module_path(node) if node.op_type in ("MatMul", "Gemm", "Gather") else None
        op = "Gather" if node.op_type == "Gather" else "MatMul"
        if module and f"{module}/{op}" not in taken:
            taken.add(f"{module}/{op}")
            node.name = f"{module}/{op}"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type == "Gemm" and node.input[1] in inits and attrs.get("transA", 0) == 0
                and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0):
            weight = numpy_helper.to_array(inits[node.input[1]])
            name = f"{node.input[1]}.matmul"
            graph.initializer.append(numpy_helper.from_array(
                weight.T.copy() if attrs.get("transB", 0) else weight, name))
            out = node.output[0]
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            nodes.append(helper.make_node("MatMul", [node.input[0], name],
                                          [f"{out}.matmul" if bias else out],
                                          name=node.name.removesuffix("/MatMul") + "/MatMul"))
            if bias:
                nodes.append(helper.make_node("Add", [f"{out}.matmul", bias], [out],
                                              name=node.name.removesuffix("/MatMul") + "/Add"))
            continue
        source = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if (source is not None and source.op_type == "Transpose"
                and source.input[0] in inits and len(inits[source.input[0]].dims) == 2):
            tied[source.input[0]] = node
        nodes.append(node)
    for weight, matmul in tied.items():
        # the MatMul reads W^T stored as such; the embedding Gather reads Transpose(W^T), as
        # in optimum's graphs (one copy of a tied table in the file)
        name = f"{weight}.transposed"
        graph.initializer.append(numpy_helper.from_array(
            numpy_helper.to_array(inits[weight]).T.copy(), name))
        matmul.input[1] = name
        back = f"{weight}.untransposed"
        nodes.insert(0, helper.make_node("Transpose", [name], [back], perm=[1, 0],
                                         name=f"{weight}/Transpose"))
        for node in nodes[1:]:
            for i, value in enumerate(node.input):
                if value == weight and node.op_type != "Transpose":
                    node.input[i] = back
    graph.ClearField("node")
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [n for n in graph.node if n.op_type != "Transpose" or n.output[0] in used]
    graph.ClearField("node")
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [i for i in graph.initializer if i.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    del graph.value_info[:]  # shapes of rewritten values; ONNX Runtime infers its own


def save(program: Any, dst: Path) -> Path:
    """Write ``dst/model.onnx``; weights past protobuf's 2 GB go to ``model.onnx.data``."""
    import onnx
    import onnx_ir as ir

    dst.mkdir(parents=True, exist_ok=True)
    path = dst / "model.onnx"
    model = ir.to_proto(program)
    _plain_matmuls(model)
    size = sum(len(i.raw_data) for i in model.graph.initializer)
    onnx.save_model(model, path, save_as_external_data=size > MAX_SINGLE_FILE,
                    all_tensors_to_one_file=True, location="model.onnx.data")
    return path


def opset(program: Any) -> int | None:
    """The default-domain opset of an exported graph."""
    return program.opset_imports.get("")
