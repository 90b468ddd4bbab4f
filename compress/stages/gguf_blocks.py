"""Exact import of a GGUF's Q4_0 / Q4_1 blocks into MatMulNBits (no second rounding).

When the reference was loaded from a GGUF, its weights *are* the GGUF's dequantized
blocks; rounding them to int4 again (RTN, GPTQ...) loses accuracy for nothing. Here each
fp32 MatMul weight of the ONNX graph is matched, output channel by output channel, to the
GGUF's dequantized rows (by exact bytes, so permuted (q/k) and fused (qkv) weights match
too, and weights an adapter changed do not), and a fully matched MatMul becomes a
MatMulNBits holding the GGUF's own nibbles and scales (block 32):

* Q4_0 (``w = d * (q - 8)``): scales ``d``, default zero point 8 — bit-exact.
* Q4_1 (``w = d * q + m``): MatMulNBits cannot hold a float offset on its fast path
  (float zero points run ~60x slower on the CPU EP), so the node gets scales ``d``, zero
  point 0, and the offsets as a small correction ``(x @ E) @ M`` with ``E`` the [K, K/32]
  block-sum matrix and ``M`` the [K/32, N] minima (kept as GGUF's fp16): the effective
  weight is ``d * q + m`` exactly (``d * q`` is exact in fp32), i.e. the GGUF's
  dequantization. ``x @ E`` is computed once per distinct input.
* Q8_0 (``w = d * q``, int8 q): an 8-bit MatMulNBits (``q + 128``, default zero point
  128) — bit-exact; an embedding Gather whose rows are Q8_0 becomes an 8-bit
  GatherBlockQuantized, sharing the LM head's bytes (via Reshape) when the two are tied.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BLOCK = 32
Q4_TYPES = ("Q4_0", "Q4_1")
IMPORTED_TYPES = (*Q4_TYPES, "Q8_0")
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
MIN_SUFFIX = "_min"


def _unpack_gguf(raw, qtype: str):
    """GGUF blocks [n, bytes] -> (q [n, 32] uint8, d [n] f32, m [n] f32).

    Q8_0's int8 values come back offset by 128 (MatMulNBits' 8-bit default zero point).
    """
    import numpy as np

    d = raw[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    if qtype == "Q8_0":
        q = (raw[:, 2:].copy().view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return q, d, np.zeros_like(d)
    if qtype == "Q4_1":
        m = raw[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
        qs = raw[:, 4:]
    else:
        m = -8 * d  # Q4_0 as Q4_1: d * q - 8d == d * (q - 8) exactly
        qs = raw[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
    return q, d, m


class RowBank:
    """The dequantized rows of a GGUF's Q4 tensors, found by their exact bytes."""

    def __init__(self, gguf_path: Path, types: tuple[str, ...] = IMPORTED_TYPES):
        import numpy as np
        from gguf import GGUFReader
        from gguf.quants import dequantize

        self.path = gguf_path
        self.rows: dict[bytes, tuple[str, int]] = {}
        self.raw: dict[str, tuple[str, Any]] = {}
        for tensor in GGUFReader(gguf_path).tensors:
            qtype = tensor.tensor_type.name
            if qtype not in types:
                continue
            data = np.asarray(tensor.data)
            values = dequantize(data, tensor.tensor_type).astype(np.float32)
            self.raw[tensor.name] = (qtype, data)
            for i, row in enumerate(values):
                self.rows.setdefault(hashlib.blake2b(row.tobytes(), digest_size=16).digest(),
                                     (tensor.name, i))

    def match(self, weight_t) -> list[tuple[str, int]] | None:
        """GGUF (tensor, row) of each row of ``weight_t`` [N, K], or None if any is missing."""
        import numpy as np

        out = []
        for row in np.ascontiguousarray(weight_t, dtype=np.float32):
            hit = self.rows.get(hashlib.blake2b(row.tobytes(), digest_size=16).digest())
            if hit is None:
                return None
            out.append(hit)
        return out

    def blocks(self, hits: list[tuple[str, int]]):
        """(q [N, kb, 32], d [N, kb], m [N, kb], types) for the matched rows."""
        import numpy as np

        qs, ds, ms, types = [], [], [], set()
        for name, row in hits:
            qtype, data = self.raw[name]
            blocks = data[row].reshape(-1, BLOCK_BYTES[qtype])
            q, d, m = _unpack_gguf(blocks, qtype)
            qs.append(q)
            ds.append(d)
            ms.append(m)
            types.add(qtype)
        return np.stack(qs), np.stack(ds), np.stack(ms), types


def _constant(array, name: str):
    import onnx
    from onnx import numpy_helper

    return onnx.helper.make_node("Constant", [], [name], name=name + "_const",
                                 value=numpy_helper.from_array(array, name))


def _replace(graph, node, q, d, m, types: set[str], accuracy_level: int,
             blocksums: dict[str, str]) -> list:
    """MatMulNBits (+ Q4_1 offset correction) nodes and initializers replacing ``node``."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    n, kb, _ = q.shape
    k = kb * BLOCK
    prefix = node.input[1] + "_gguf"
    if types == {"Q8_0"}:
        inits = [numpy_helper.from_array(q.astype(np.uint8), prefix + "_Q8"),
                 numpy_helper.from_array(d.reshape(-1).astype(np.float32), prefix + "_scales")]
        graph.initializer.extend(inits)
        return [onnx.helper.make_node(
            "MatMulNBits", [node.input[0], inits[0].name, inits[1].name], list(node.output),
            name=node.name + "_gguf", domain="com.microsoft", K=k, N=n, bits=8,
            block_size=BLOCK, accuracy_level=accuracy_level)]
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    inits = [numpy_helper.from_array(packed, prefix + "_Q4"),
             numpy_helper.from_array(d.reshape(-1).astype(np.float32), prefix + "_scales")]
    inputs = [node.input[0], inits[0].name, inits[1].name]
    symmetric = types == {"Q4_0"}
    if not symmetric:  # zero point 0 for every block; the offsets m come below
        zeros = np.zeros((n, (kb + 1) // 2), np.uint8)
        inits.append(numpy_helper.from_array(zeros, prefix + "_zero_points"))
        inputs.append(inits[-1].name)
    out = node.output[0] if symmetric else node.output[0] + "_gguf_q"
    nodes = [onnx.helper.make_node("MatMulNBits", inputs, [out], name=node.name + "_gguf",
                                   domain="com.microsoft", K=k, N=n, bits=4, block_size=BLOCK,
                                   accuracy_level=accuracy_level)]
    if not symmetric:
        # E and M are Constant nodes, not initializers, so that no quantizer pass that
        # follows takes these two small MatMuls for weights to quantize.
        # One block-sum matrix E per K for the whole graph, one x @ E per input; the
        # minima are fp16 in GGUF, stored so (exact) and cast to fp32 once at load.
        e_name = f"gguf_blocksum_E_{k}"
        if e_name not in blocksums:
            e = np.kron(np.eye(kb, dtype=np.float32), np.ones((BLOCK, 1), np.float32))
            blocksums[e_name] = e_name
            nodes.append(_constant(e, e_name))
        key = f"{node.input[0]}:{k}"
        if key not in blocksums:
            blocksums[key] = f"{node.name}_gguf_blocksum"
            nodes.append(onnx.helper.make_node("MatMul", [node.input[0], e_name],
                                               [blocksums[key]], name=blocksums[key]))
        m_name = prefix + MIN_SUFFIX
        nodes += [_constant(np.ascontiguousarray(m.T, np.float16), m_name + "_fp16"),
                  onnx.helper.make_node("Cast", [m_name + "_fp16"], [m_name],
                                        name=m_name + "_cast", to=onnx.TensorProto.FLOAT),
                  onnx.helper.make_node("MatMul", [blocksums[key], m_name],
                                        [node.output[0] + "_gguf_m"],
                                        name=node.name + "_gguf_m"),
                  onnx.helper.make_node("Add", [out, node.output[0] + "_gguf_m"],
                                        [node.output[0]], name=node.name + "_gguf_add")]
    graph.initializer.extend(inits)
    return nodes


def _gather(graph, node, q, d, shared: dict[bytes, tuple[str, str]]) -> list:
    """An 8-bit GatherBlockQuantized for an embedding Gather whose rows are all Q8_0."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    v, kb, _ = q.shape
    data = q.reshape(v, kb * BLOCK).astype(np.uint8)
    key = hashlib.blake2b(data.tobytes() + d.tobytes(), digest_size=16).digest()
    prefix = node.input[0] + "_gguf"
    nodes = []
    if key in shared:  # tied with an imported LM head: reshape its bytes, store nothing new
        b_name, s_name = shared[key]
        for src, shape, out in ((b_name, [v, kb * BLOCK], prefix + "_Q8"),
                                (s_name, [v, kb], prefix + "_scales")):
            graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64),
                                                             out + "_shape"))
            nodes.append(onnx.helper.make_node("Reshape", [src, out + "_shape"], [out],
                                               name=out + "_reshape"))
    else:
        graph.initializer.extend([numpy_helper.from_array(data, prefix + "_Q8"),
                                  numpy_helper.from_array(d.astype(np.float32),
                                                          prefix + "_scales")])
    nodes.append(onnx.helper.make_node(
        "GatherBlockQuantized", [prefix + "_Q8", node.input[1], prefix + "_scales"],
        list(node.output), name=node.name + "_gguf", domain="com.microsoft", bits=8,
        block_size=BLOCK, gather_axis=0, quantize_axis=1))
    return nodes


def import_gguf_blocks(model, gguf_path: Path, accuracy_level: int = 4,
                       types: tuple[str, ...] = IMPORTED_TYPES) -> dict[str, Any]:
    """Replace every MatMul whose fp32 weight the GGUF's Q4 blocks reproduce exactly.

    Args:
        model: An fp32 ONNX ModelProto (weights loaded), changed in place.
        gguf_path: The GGUF file the reference was loaded from.
        accuracy_level: MatMulNBits ``accuracy_level`` of the new nodes.
        types: The GGUF block types to import (others stay for the algorithm).

    Returns:
        Details for the manifest: imported nodes, block types, MatMuls left to the
        algorithm.
    """
    from onnx import numpy_helper

    bank = RowBank(gguf_path, types)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes, imported, skipped, types_seen = [], [], [], set()
    blocksums: dict[str, str] = {}
    used: set[str] = set()
    shared: dict[bytes, tuple[str, str]] = {}
    gathers = []
    for node in list(graph.node):
        weight = None
        if node.op_type == "MatMul" and node.input[1] in inits:
            weight = numpy_helper.to_array(inits[node.input[1]])
        elif node.op_type == "Gather" and node.input[0] in inits:
            gathers.append(node)  # after the MatMuls: it may share the LM head's bytes
            new_nodes.append(node)
            continue
        if weight is None or weight.ndim != 2 or weight.shape[0] % BLOCK:
            new_nodes.append(node)
            continue
        hits = bank.match(weight.T)
        blocks = bank.blocks(hits) if hits is not None else None
        if blocks is None or ("Q8_0" in blocks[3] and len(blocks[3]) > 1):
            skipped.append(node.name)  # no exact rows, or Q8_0 rows mixed with Q4 rows
            new_nodes.append(node)
            continue
        q, d, m, types = blocks
        new_nodes += _replace(graph, node, q, d, m, types, accuracy_level, blocksums)
        if types == {"Q8_0"}:
            packed = q.reshape(q.shape[0], -1).astype("uint8")
            shared[hashlib.blake2b(packed.tobytes() + d.tobytes(), digest_size=16)
                   .digest()] = (node.input[1] + "_gguf_Q8", node.input[1] + "_gguf_scales")
        imported.append(node.name)
        types_seen |= types
        used.add(node.input[1])
    for node in gathers:
        table = numpy_helper.to_array(inits[node.input[0]])
        hits = bank.match(table) if table.ndim == 2 and table.shape[1] % BLOCK == 0 else None
        blocks = bank.blocks(hits) if hits is not None else None
        if blocks is None or blocks[3] != {"Q8_0"}:
            continue
        at = next(i for i, n in enumerate(new_nodes) if n is node)
        new_nodes[at:at + 1] = _gather(graph, node, blocks[0], blocks[1], shared)
        imported.append(node.name)
        types_seen.add("Q8_0")
        used.add(node.input[0])
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    still_used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name not in used or i.name in still_used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    if imported and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(__import__("onnx").helper.make_opsetid("com.microsoft", 1))
    log.info("GGUF blocks: %d MatMuls imported, %d left", len(imported), len(skipped))
    return {"file": str(gguf_path), "exact": True, "block_size": BLOCK,
            "types": sorted(types_seen), "imported": imported,
            "not_matched": skipped,
            "note": "Q4_0: scales, zero point 8; Q4_1: zero point 0 plus the minima as a "
                    "block-sum correction MatMul; Q8_0: 8-bit, zero point 128"}


def effective_weight(model, node_name: str):
    """The [K, N] weight a MatMulNBits node (plus its GGUF offset correction) applies.

    Dequantizes ``(q - zero_point) * scale`` per block (default zero point 8 without a
    zero-point input) and adds the Q4_1 minima of an imported GGUF node, if any.
    """
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    attrs = {a.name: a.i for a in node.attribute}
    k, n, bs, bits = attrs["K"], attrs["N"], attrs["block_size"], attrs["bits"]
    kb = -(-k // bs)
    packed = numpy_helper.to_array(inits[node.input[1]])
    if bits == 8:
        q = packed.reshape(n, kb, bs).astype(np.float32)
    else:
        packed = packed.reshape(n, kb, bs // 2)
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, kb, bs)
        q = q.astype(np.float32)
    scale = numpy_helper.to_array(inits[node.input[2]]).reshape(n, kb, 1).astype(np.float32)
    if len(node.input) > 3 and node.input[3]:
        zp = numpy_helper.to_array(inits[node.input[3]])
        if zp.dtype == np.uint8 and bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :kb]
        zp = zp.reshape(n, kb, 1).astype(np.float32)
    else:
        zp = np.float32(2 ** (bits - 1))
    weight = (scale * (q - zp)).reshape(n, kb * bs)[:, :k]
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    minima_name = node.input[1].removesuffix("_Q4") + MIN_SUFFIX + "_fp16"
    if minima_name in consts:
        minima = numpy_helper.to_array(consts[minima_name].attribute[0].t)  # [kb, N]
        weight = weight + np.repeat(minima.T.astype(np.float32), bs, axis=1)[:, :k]
    return weight.T
