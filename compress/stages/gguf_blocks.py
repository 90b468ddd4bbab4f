"""Exact import of a GGUF's quantized blocks into MatMulNBits (no second rounding).

When the reference was loaded from a GGUF, its weights *are* the GGUF's dequantized
blocks; rounding them to int4 again (RTN, GPTQ...) loses accuracy for nothing. Here each
fp32 MatMul weight of the ONNX graph is matched, output channel by output channel, to the
GGUF's dequantized rows (by exact bytes, so permuted (q/k) and fused (qkv) weights match
too, and weights an adapter changed do not), and a fully matched MatMul becomes a
MatMulNBits holding the GGUF's own integers and scales (``gguf_rows`` unpacks them):

* Q4_0 (``w = d * (q - 8)``): scales ``d``, default zero point 8 — bit-exact.
* Q4_1 (``w = d * q + m``): MatMulNBits cannot hold a float offset on its fast path
  (float zero points run ~60x slower on the CPU EP), so the node gets scales ``d``, the
  default zero point 8, and the offsets ``m + 8 d`` (exact in fp32; ``q4_offsets``) as a
  small correction ``(x @ E) @ M`` with ``E`` the [K, K/32] block-sum matrix and ``M``
  the [K/32, N] offsets: the effective weight is ``d * (q - 8) + m + 8 d = d * q + m``
  exactly, i.e. the GGUF's dequantization. By default the block sums ``x @ E`` come from
  ``K/32`` extra output channels of the MatMulNBits itself (the int8 activations it sees,
  as llama.cpp's Q8_1 sums are; a Split separates them), else from one fp32 ``x @ E`` per
  distinct input; MatMuls reading one input (gate and up) share one node and correction.
* Q4_K: per 32-value sub-block ``d·sc * q - dmin·m``, i.e. Q4_1 with scale ``d·sc`` and
  offset ``-dmin·m`` (both exact in fp32): imported as Q4_1 is.
* Q8_0 (``w = d * q``, int8 q): an 8-bit MatMulNBits (``q + 128``, default zero point
  128) — bit-exact; an embedding Gather whose rows are Q8_0 becomes an 8-bit
  GatherBlockQuantized, sharing the LM head's bytes (via Reshape) when the two are tied.
* Q5_0 (``d * (q5 - 16)``) and Q6_K (``d·sc * (q6 - 32)`` per 16 values): MatMulNBits has
  no 5- or 6-bit storage, so they are 8-bit nodes like Q8_0 (``q5 + 112``; ``q6 + 96``,
  block 16) — bit-exact, at 8 bits' size and speed.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from compress.stages.gguf_nodes import MIN_SUFFIX, gather_q8, replace_q4, replace_q8
from compress.stages.gguf_rows import BLOCK, IMPORTED_TYPES, Q5_TYPES, Q8_TYPES, RowBank

log = logging.getLogger(__name__)


def import_gguf_blocks(model, gguf_path: Path, accuracy_level: int = 4,
                       types: tuple[str, ...] = IMPORTED_TYPES,
                       fuse: bool = True, node_sums: bool = True) -> dict[str, Any]:
    """Replace every MatMul whose fp32 weight the GGUF's blocks reproduce exactly.

    Args:
        model: An fp32 ONNX ModelProto (weights loaded), changed in place.
        gguf_path: The GGUF file the reference was loaded from.
        accuracy_level: MatMulNBits ``accuracy_level`` of the new nodes.
        types: The GGUF block types to import (others stay for the algorithm).
        fuse: One MatMulNBits (and one offset correction) for the Q4 MatMuls that read
            the same input (e.g. a Llama MLP's gate and up), split afterwards.
        node_sums: Take the Q4_1 offsets' block sums from extra output channels of the
            MatMulNBits (the activations it quantizes, as llama.cpp does); false: an
            fp32 ``x @ E`` (``gguf_nodes.replace_q4``).

    Returns:
        Details for the manifest: imported nodes, block types, MatMuls left to the
        algorithm, fused groups.
    """
    from onnx import numpy_helper

    bank = RowBank(gguf_path, types)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes, imported, skipped, types_seen = [], [], [], set()
    groups: dict[str, list] = {}
    used: set[str] = set()
    shared: dict[bytes, tuple[str, str]] = {}
    gathers = []
    for node in list(graph.node):
        new_nodes.append(node)
        weight = None
        if node.op_type == "MatMul" and node.input[1] in inits:
            weight = numpy_helper.to_array(inits[node.input[1]])
        elif node.op_type == "Gather" and node.input[0] in inits:
            gathers.append(node)  # after the MatMuls: it may share the LM head's bytes
        if weight is None or weight.ndim != 2 or weight.shape[0] % BLOCK:
            continue
        hits = bank.match(weight.T)
        blocks = bank.blocks(hits) if hits is not None else None
        if blocks is None:
            skipped.append(node.name)  # no exact rows, or 8-bit rows mixed with 4-bit rows
            continue
        q, d, m, found = blocks
        if found <= set(Q8_TYPES):
            new_nodes[-1:] = replace_q8(graph, node, q, d, accuracy_level)
            packed = q.reshape(q.shape[0], -1).astype("uint8")
            shared[hashlib.blake2b(packed.tobytes() + d.tobytes(), digest_size=16)
                   .digest()] = (node.input[1] + "_gguf_Q8", node.input[1] + "_gguf_scales")
        else:  # placed at its first member's spot below, once the group is complete
            bits = 8 if found <= set(Q5_TYPES) else 4
            key = f"{node.input[0]}:{weight.shape[0]}:{bits}" if fuse else node.name
            groups.setdefault(key, []).append((node, q, d, m, bits))
        imported.append(node.name)
        types_seen |= found
        used.add(node.input[1])
    blocksums: dict[str, str] = {}
    fused: dict[str, list[str]] = {}
    for group in groups.values():
        members = {id(g[0]) for g in group}
        at = next(i for i, n in enumerate(new_nodes) if id(n) == id(group[0][0]))
        new_nodes[at:at + 1] = replace_q4(graph, [g[:4] for g in group], accuracy_level,
                                            blocksums, node_sums, bits=group[0][4])
        new_nodes = [n for n in new_nodes if id(n) not in members]
        if len(group) > 1:
            fused[group[0][0].name + "_gguf_fused"] = [g[0].name for g in group]
    for node in gathers:
        table = numpy_helper.to_array(inits[node.input[0]])
        hits = bank.match(table) if table.ndim == 2 and table.shape[1] % BLOCK == 0 else None
        blocks = bank.blocks(hits) if hits is not None else None
        if blocks is None or not blocks[3] <= set(Q8_TYPES):
            continue
        at = next(i for i, n in enumerate(new_nodes) if n is node)
        new_nodes[at:at + 1] = gather_q8(graph, node, blocks[0], blocks[1], shared)
        imported.append(node.name)
        types_seen |= blocks[3]
        used.add(node.input[0])
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    still_used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name not in used or i.name in still_used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    if imported and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(__import__("onnx").helper.make_opsetid("com.microsoft", 1))
    log.info("GGUF blocks: %d MatMuls imported (%d fused groups), %d left", len(imported),
             len(fused), len(skipped))
    return {"file": str(gguf_path), "exact": True, "block_size": BLOCK,
            "types": sorted(types_seen), "imported": imported,
            "not_matched": skipped, "fused": fused, "node_sums": node_sums,
            "note": "Q4_0: scales, zero point 8; Q4_1 and Q4_K (scale d*sc, offset "
                    "-dmin*m per 32 values): zero point 8 plus the offsets m + 8d as a "
                    "block-sum correction MatMul (zero point 0 and m where m + 8d is not "
                    "exact in fp32); Q4 MatMuls sharing an input fused into one "
                    "MatMulNBits and split; Q8_0, Q5_0 (q+112) and Q6_K (q+96, block 16): "
                    "8-bit, zero point 128 (MatMulNBits has no 5/6-bit storage)"}


def effective_weight(model, node_name: str, fused: dict[str, list[str]] | None = None):
    """The [K, N] weight a MatMulNBits node (plus its GGUF offset correction) applies.

    Dequantizes ``(q - zero_point) * scale`` per block (default zero point 8 without a
    zero-point input) and adds the Q4 offsets of an imported GGUF node, if any.

    Args:
        model: The ModelProto.
        node_name: The MatMulNBits node, or ``<MatMul>_gguf`` for an imported MatMul that
            was fused with others (then ``fused`` is needed).
        fused: ``import_gguf_blocks``' ``fused`` details: that MatMul's columns are cut
            out of its group's node.
    """
    import numpy as np
    from onnx import numpy_helper

    original = node_name.removesuffix("_gguf")
    for group_name, members in (fused or {}).items():
        if original in members:
            sizes = numpy_helper.to_array(next(i for i in model.graph.initializer
                                               if i.name == group_name + "_split"))
            start = int(sizes[:members.index(original)].sum())
            whole = effective_weight(model, group_name)
            return whole[:, start:start + int(sizes[members.index(original)])]
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
    minima_name = node.input[1].removesuffix("_Q4").removesuffix("_Q8") + MIN_SUFFIX
    const = consts.get(minima_name + "_fp16", consts.get(minima_name))
    if const is not None:
        minima = numpy_helper.to_array(const.attribute[0].t)  # [kb, N]
        weight = weight[:minima.shape[1]]  # without node_sums' block-sum channels
        weight = weight + np.repeat(minima.T.astype(np.float32), bs, axis=1)[:, :k]
    return weight.T
