"""Exact GGUF Q4_0/Q4_1 block import into MatMulNBits, on a tiny GGUF written here."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from compress.stages.gguf_blocks import effective_weight, import_gguf_blocks


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    """The tiny Llama's fp32 ONNX graph with weights replaced by Q4_0/Q4_1 round trips.

    Returns (model path, GGUF path, {MatMul node: dequantized [K, N]}, untouched node).
    """
    import gguf
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import dequantize, quantize

    from compress.stages.export import export_onnx

    root = tmp_path_factory.mktemp("gguf")
    export_onnx(tiny["llama"], root, "text-generation")
    model = onnx.load(root / "model.onnx")
    inits = {i.name: i for i in model.graph.initializer}
    matmuls = [n for n in model.graph.node
               if n.op_type == "MatMul" and n.input[1] in inits]
    writer = GGUFWriter(str(root / "tiny.gguf"), "llama")
    expected, rng = {}, np.random.default_rng(0)
    untouched = matmuls[0].name  # stays fp32: must not match
    for i, node in enumerate(matmuls[1:]):
        weight_t = numpy_helper.to_array(inits[node.input[1]]).T.copy()  # [N, K]
        qtype = GGMLQuantizationType.Q4_0 if i % 2 else GGMLQuantizationType.Q4_1
        if node.name == "/lm_head/MatMul":
            qtype = GGMLQuantizationType.Q8_0
        raw = quantize(weight_t, qtype)
        values = dequantize(raw, qtype).astype(np.float32)
        # the graph holds the dequantized GGUF weights (what transformers loads) ...
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(values.T.copy(), node.input[1]))
        expected[node.name] = values.T
        # ... and the GGUF stores some tensors with rows permuted (as llama q/k are)
        perm = rng.permutation(len(raw)) if i % 3 == 0 else np.arange(len(raw))
        writer.add_tensor(f"blk.{i}.weight", raw[perm], raw_dtype=qtype)
    embed = next(n for n in model.graph.node if n.op_type == "Gather"
                 and n.input[0] in inits)  # the embedding table [vocab, hidden], as Q8_0
    raw = quantize(numpy_helper.to_array(inits[embed.input[0]]), GGMLQuantizationType.Q8_0)
    table = dequantize(raw, GGMLQuantizationType.Q8_0).astype(np.float32)
    inits[embed.input[0]].CopyFrom(numpy_helper.from_array(table, embed.input[0]))
    expected[embed.name] = table
    writer.add_tensor("token_embd.weight", raw, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    onnx.save(model, root / "fp32.onnx")
    assert gguf.GGUFReader(root / "tiny.gguf").tensors  # a readable GGUF
    return root / "fp32.onnx", root / "tiny.gguf", expected, untouched


def test_imported_weights_equal_gguf_dequantization_exactly(tiny_gguf):
    path, gguf_path, expected, untouched = tiny_gguf
    model = onnx.load(path)
    details = import_gguf_blocks(model, gguf_path, accuracy_level=0)
    assert details["exact"] and details["types"] == ["Q4_0", "Q4_1", "Q8_0"]
    assert details["not_matched"] == [untouched]
    assert len(details["imported"]) == len(expected)
    assert details["fused"]  # q/k/v and gate/up share their inputs
    ops = {n.name: n.op_type for n in model.graph.node}
    assert ops["/lm_head/MatMul_gguf"] == "MatMulNBits"
    for name, values in expected.items():
        if ops.get(name + "_gguf") == "GatherBlockQuantized":
            inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
            node = next(n for n in model.graph.node if n.name == name + "_gguf")
            data, scales = inits[node.input[0]], inits[node.input[2]]
            got = ((data.astype(np.float32) - 128).reshape(len(data), -1, 32)
                   * scales[..., None]).reshape(data.shape)
        else:
            got = effective_weight(model, name + "_gguf", details["fused"])
        assert got.dtype == np.float32 and np.array_equal(got, values), name


def test_imported_graph_runs_like_the_fp32_graph(tiny_gguf):
    from compress.stages.int4 import LMCalibrationReader

    path, gguf_path, _, _ = tiny_gguf
    model = onnx.load(path)
    import_gguf_blocks(model, gguf_path, accuracy_level=0)
    onnx.checker.check_model(model)
    feed = next(iter(LMCalibrationReader(path, path.parent, ["the movie was great"])))
    ref = ort.InferenceSession(str(path)).run(["logits"], feed)[0]
    got = ort.InferenceSession(model.SerializeToString()).run(["logits"], feed)[0]
    assert np.abs(ref - got).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_algorithm_pass_leaves_imported_blocks_alone(tiny_gguf):
    from compress.stages.int4 import quantize_graph
    from compress.stages.methods import Int4Options

    path, gguf_path, expected, untouched = tiny_gguf
    model = onnx.load(path)
    fused = import_gguf_blocks(model, gguf_path)["fused"]
    model, details = quantize_graph(model, Int4Options(algorithm="rtn", block_size=16,
                                                       embeddings="int4"))
    assert details["operators"].get("MatMul", 0) >= 1  # the block-sum corrections
    names = {n.name for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert untouched + "_Q4" in names  # the unmatched one went to the algorithm
    assert details["operators"]["GatherBlockQuantized"] == 1  # the imported 8-bit one
    corrections = [n for n in model.graph.node if n.name.endswith("_gguf_m")]
    assert corrections and all(n.op_type == "MatMul" for n in corrections)  # not quantized
    for name, values in expected.items():
        if "Gather" not in name:
            assert np.array_equal(effective_weight(model, name + "_gguf", fused), values), name


def test_fused_import_computes_the_unfused_graph_with_fewer_nodes(tiny_gguf):
    from compress.stages.int4 import LMCalibrationReader

    path, gguf_path, _, _ = tiny_gguf
    feed = next(iter(LMCalibrationReader(path, path.parent, ["the movie was great"])))
    logits, counts = {}, {}
    for fuse in (False, True):
        model = onnx.load(path)
        details = import_gguf_blocks(model, gguf_path, accuracy_level=0, fuse=fuse)
        onnx.checker.check_model(model)
        assert bool(details["fused"]) is fuse
        counts[fuse] = len(model.graph.node)
        logits[fuse] = ort.InferenceSession(model.SerializeToString()).run(["logits"], feed)[0]
    groups = details["fused"].values()
    # each group of n MatMuls loses n - 1 MatMulNBits, corrections and Adds, gains a Split
    assert counts[True] < counts[False]
    assert sum(len(g) for g in groups) > len(groups)
    scale = max(1.0, float(np.abs(logits[False]).max()))
    assert np.abs(logits[True] - logits[False]).max() < 1e-5 * scale


def test_q4_1_offsets_are_exact_and_small_with_zero_point_8():
    from compress.stages.gguf_nodes import q4_offsets

    rng = np.random.default_rng(0)
    d = rng.uniform(1e-3, 5e-2, (64, 8)).astype(np.float16).astype(np.float32)
    m = (-d * rng.uniform(6, 9, d.shape)).astype(np.float16).astype(np.float32)
    zp, offsets = q4_offsets(m, d)
    assert zp is None  # every block takes the default zero point 8: no zero-point input
    q = rng.integers(0, 16, (64, 8)).astype(np.float32)
    assert np.array_equal(d * (q - 8) + offsets, d * q + m)  # the GGUF's weight, bit for bit
    assert np.abs(offsets).mean() < np.abs(m).mean() / 4  # what int8 activations scale
    q4_0 = q4_offsets(-8 * d, d)
    assert q4_0 == (None, None)  # Q4_0 blocks: no correction at all


def test_node_sums_keep_the_weights_and_the_outputs(tiny_gguf):
    from compress.stages.int4 import LMCalibrationReader

    path, gguf_path, expected, _ = tiny_gguf
    model = onnx.load(path)
    details = import_gguf_blocks(model, gguf_path, accuracy_level=0)  # node sums: default
    onnx.checker.check_model(model)
    sums = [n for n in model.graph.node if n.name.endswith("_sums")]
    assert sums and not any(n.name.endswith("_blocksum") for n in model.graph.node)
    fp32_sums = onnx.load(path)
    import_gguf_blocks(fp32_sums, gguf_path, accuracy_level=0, node_sums=False)
    assert any(n.name.endswith("_blocksum") for n in fp32_sums.graph.node)
    for name, values in expected.items():
        if "Gather" not in name:
            assert np.array_equal(effective_weight(model, name + "_gguf", details["fused"]),
                                  values), name
    feed = next(iter(LMCalibrationReader(path, path.parent, ["the movie was great"])))
    ref = ort.InferenceSession(str(path)).run(["logits"], feed)[0]
    got = ort.InferenceSession(model.SerializeToString()).run(["logits"], feed)[0]
    assert np.abs(ref - got).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))
