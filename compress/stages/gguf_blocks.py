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
  block-sum matrix and ``M`` the [K/32, N] minima: the effective weight is
  ``d * q + m`` exactly (``d * q`` is exact in fp32), i.e. the GGUF's dequantization.
  ``x @ E`` is computed once per distinct input.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BLOCK = 32
Q4_TYPES = ("Q4_0", "Q4_1")
MIN_SUFFIX = "_min"


def _unpack_gguf(raw, qtype: str):
    """GGUF blocks [n, bytes] -> (q [n, 32] uint8, d [n] f32, m [n] f32)."""
    import numpy as np

    d = raw[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
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

    def __init__(self, gguf_path: Path):
        import numpy as np
        from gguf import GGUFReader
        from gguf.quants import dequantize

        self.path = gguf_path
        self.rows: dict[bytes, tuple[str, int]] = {}
        self.raw: dict[str, tuple[str, Any]] = {}
        for tensor in GGUFReader(gguf_path).tensors:
            qtype = tensor.tensor_type.name
            if qtype not in Q4_TYPES:
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
            blocks = data[row].reshape(-1, 18 if qtype == "Q4_0" else 20)
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
        key = f"{node.input[0]}:{k}"
        if key not in blocksums:
            e = np.kron(np.eye(kb, dtype=np.float32), np.ones((BLOCK, 1), np.float32))
            blocksums[key] = f"{node.name}_gguf_blocksum"
            nodes += [_constant(e, blocksums[key] + "_E"),
                      onnx.helper.make_node("MatMul", [node.input[0], blocksums[key] + "_E"],
                                            [blocksums[key]], name=blocksums[key])]
        m_name = prefix + MIN_SUFFIX
        nodes += [_constant(np.ascontiguousarray(m.T, np.float32), m_name),
                  onnx.helper.make_node("MatMul", [blocksums[key], m_name],
                                        [node.output[0] + "_gguf_m"],
                                        name=node.name + "_gguf_m"),
                  onnx.helper.make_node("Add", [out, node.output[0] + "_gguf_m"],
                                        [node.output[0]], name=node.name + "_gguf_add")]
    graph.initializer.extend(inits)
    return nodes


def import_gguf_blocks(model, gguf_path: Path, accuracy_level: int = 4) -> dict[str, Any]:
    """Replace every MatMul whose fp32 weight the GGUF's Q4 blocks reproduce exactly.

    Args:
        model: An fp32 ONNX ModelProto (weights loaded), changed in place.
        gguf_path: The GGUF file the reference was loaded from.
        accuracy_level: MatMulNBits ``accuracy_level`` of the new nodes.

    Returns:
        Details for the manifest: imported nodes, block types, MatMuls left to the
        algorithm.
    """
    from onnx import numpy_helper

    bank = RowBank(gguf_path)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes, imported, skipped, types_seen = [], [], [], set()
    blocksums: dict[str, str] = {}
    used: set[str] = set()
    for node in list(graph.node):
        weight = None
        if node.op_type == "MatMul" and node.input[1] in inits:
            weight = numpy_helper.to_array(inits[node.input[1]])
        if weight is None or weight.ndim != 2 or weight.shape[0] % BLOCK:
            new_nodes.append(node)
            continue
        hits = bank.match(weight.T)
        if hits is None:
            skipped.append(node.name)
            new_nodes.append(node)
            continue
        q, d, m, types = bank.blocks(hits)
        new_nodes += _replace(graph, node, q, d, m, types, accuracy_level, blocksums)
        imported.append(node.name)
        types_seen |= types
        used.add(node.input[1])
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
            "note": "Q4_1 offsets as a block-sum correction MatMul" if "Q4_1" in types_seen
            else "Q4_0 scales with zero point 8"}


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
    k, n, bs = attrs["K"], attrs["N"], attrs["block_size"]
    kb = -(-k // bs)
    packed = numpy_helper.to_array(inits[node.input[1]]).reshape(n, kb, bs // 2)
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, kb, bs).astype(np.float32)
    scale = numpy_helper.to_array(inits[node.input[2]]).reshape(n, kb, 1).astype(np.float32)
    if len(node.input) > 3 and node.input[3]:
        zp = numpy_helper.to_array(inits[node.input[3]])
        if zp.dtype == np.uint8:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :kb]
        zp = zp.reshape(n, kb, 1).astype(np.float32)
    else:
        zp = np.float32(8)
    weight = (scale * (q - zp)).reshape(n, kb * bs)[:, :k]
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    minima_name = node.input[1].removesuffix("_Q4") + MIN_SUFFIX
    if minima_name in consts:
        minima = numpy_helper.to_array(consts[minima_name].attribute[0].t)  # [kb, N]
        weight = weight + np.repeat(minima.T, bs, axis=1)[:, :k]
    return weight.T
