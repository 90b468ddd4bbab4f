"""Exact import of GGUF k-quant (Q4_K, Q6_K) and Q5_0 blocks into MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress.stages.gguf_blocks import effective_weight, import_gguf_blocks
from compress.stages.gguf_rows import BLOCK_BYTES, IMPORTED_TYPES, _unpack_gguf
from compress.tiny import random_gguf_blocks

K = 512
# MatMul -> (GGUF tensor type, rows); "mixed" takes half its rows from each of two types
LAYERS = {"a": ("Q4_K", 24), "b": ("Q4_K", 8), "c": ("Q6_K", 16), "d": ("Q5_0", 16),
          "e": ("Q8_0", 8), "f": ("Q5_K", 16), "g": ("Q5_1", 8)}


@pytest.mark.parametrize("qtype", IMPORTED_TYPES)
def test_unpacked_blocks_are_the_gguf_dequantization_bit_for_bit(qtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = random_gguf_blocks(qtype, 5, 1024, seed=3)
    want = dequantize(raw, GGMLQuantizationType[qtype]).astype(np.float32)
    q, d, m = _unpack_gguf(raw.reshape(-1, BLOCK_BYTES[qtype]), qtype)
    if qtype in ("Q4_0", "Q4_1", "Q4_K", "Q5_1", "Q5_K"):
        assert q.max() <= (15 if qtype.startswith("Q4") else 31) and q.shape[1] == 32
        got = d[:, None] * q.astype(np.float32) + m[:, None]
    else:  # 8-bit storage around MatMulNBits' default zero point 128
        assert q.shape[1] == (16 if qtype == "Q6_K" else 32)
        got = d[:, None] * (q.astype(np.float32) - 128)
    assert np.array_equal(got.reshape(want.shape), want)


@pytest.fixture(scope="module")
def kquant_graph(tmp_path_factory):
    """An fp32 graph of MatMuls whose weights are k-quant GGUF rows, and that GGUF."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import dequantize

    root = tmp_path_factory.mktemp("kquants")
    writer = GGUFWriter(str(root / "k.gguf"), "llama")
    weights, nodes, outputs = {}, [], []
    for i, (name, (qtype, rows)) in enumerate(LAYERS.items()):
        raw = random_gguf_blocks(qtype, rows, K, seed=i)
        values = dequantize(raw, GGMLQuantizationType[qtype]).astype(np.float32)
        perm = np.random.default_rng(i).permutation(rows) if name == "a" else np.arange(rows)
        writer.add_tensor(f"blk.{i}.weight", raw[perm], raw_dtype=GGMLQuantizationType[qtype])
        weights[name] = values.T.copy()  # [K, N]
    weights["mixed"] = np.concatenate([weights["a"][:, :4], weights["c"][:, :4]], axis=1)
    for name, w in weights.items():
        nodes.append(helper.make_node("MatMul", ["x", f"W_{name}"], [f"y_{name}"], name=name))
        outputs.append(helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT,
                                                     [None, w.shape[1]]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    graph = helper.make_graph(
        nodes, "k", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
        outputs, [numpy_helper.from_array(w, f"W_{n}") for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=9)
    return model, root / "k.gguf", weights


def test_kquant_import_is_exact_and_runs(kquant_graph):
    model, gguf_path, weights = kquant_graph
    model = onnx.ModelProto.FromString(model.SerializeToString())
    details = import_gguf_blocks(model, gguf_path, accuracy_level=0)
    onnx.checker.check_model(model)
    assert details["types"] == ["Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]
    assert details["not_matched"] == ["mixed"]  # 4-bit and 8-bit rows: no single node
    # the two Q4_K on one input share a node; so do the two 5-bit ones (8-bit storage)
    assert details["fused"] == {"a_gguf_fused": ["a", "b"], "f_gguf_fused": ["f", "g"]}
    nodes = {n.name: {a.name: a.i for a in n.attribute} for n in model.graph.node
             if n.op_type == "MatMulNBits"}
    assert nodes["c_gguf"]["bits"] == 8 and nodes["c_gguf"]["block_size"] == 16  # Q6_K
    assert nodes["d_gguf"]["bits"] == 8 and nodes["d_gguf"]["block_size"] == 32  # Q5_0
    assert nodes["a_gguf_fused"]["bits"] == 4  # Q4_K
    assert nodes["f_gguf_fused"]["bits"] == 8  # Q5_K + Q5_1
    for name, values in weights.items():
        if name != "mixed":
            got = effective_weight(model, name + "_gguf", details["fused"])
            assert got.dtype == np.float32 and np.array_equal(got, values), name
    x = np.random.default_rng(9).standard_normal((3, K)).astype(np.float32)
    names = [o.name for o in model.graph.output]
    got = ort.InferenceSession(model.SerializeToString()).run(names, {"x": x})
    for name, y in zip(names, got, strict=True):
        want = x @ weights[name.removeprefix("y_")]
        assert np.abs(y - want).max() < 1e-4 * max(1.0, float(np.abs(want).max())), name


def test_types_left_out_go_to_the_algorithm(kquant_graph):
    model, gguf_path, _ = kquant_graph
    model = onnx.ModelProto.FromString(model.SerializeToString())
    details = import_gguf_blocks(model, gguf_path, types=("Q4_K",))
    assert details["types"] == ["Q4_K"]
    assert sorted(details["not_matched"]) == ["c", "d", "e", "f", "g", "mixed"]


def test_five_bit_offsets_not_exact_at_zero_point_16_keep_their_own(tmp_path):
    """Q5_1 blocks whose ``m + 16 d`` fp32 cannot hold take zero point 0 (112 stored)."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import dequantize

    raw = random_gguf_blocks("Q5_1", 8, 256, seed=4).reshape(8, -1, 24)
    raw[:, ::2, 0:2] = np.full((8, 4, 1), 1e-3, np.float16).view(np.uint8)  # d
    raw[:, ::2, 2:4] = np.full((8, 4, 1), 1000.0, np.float16).view(np.uint8)  # m
    raw = raw.reshape(8, -1)
    kind = GGMLQuantizationType.Q5_1
    weight = dequantize(raw, kind).astype(np.float32).T.copy()
    writer = GGUFWriter(str(tmp_path / "q51.gguf"), "llama")
    writer.add_tensor("w", raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="w")], "q51",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])],
        [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=9)
    import_gguf_blocks(model, tmp_path / "q51.gguf", accuracy_level=0)
    zero_points = next(numpy_helper.to_array(i) for i in model.graph.initializer
                       if i.name.endswith("_zero_points"))
    rows = zero_points[:8]  # then the node-sum channels' rows
    assert set(rows[:, ::2].ravel()) == {112} and set(rows[:, 1::2].ravel()) == {128}
    assert np.array_equal(effective_weight(model, "w_gguf"), weight)
    x = np.random.default_rng(1).standard_normal((2, 256)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString()).run(["y"], {"x": x})[0]
    assert np.abs(y - x @ weight).max() < 1e-4 * float(np.abs(x @ weight).max())
