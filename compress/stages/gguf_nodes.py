"""The ONNX nodes of the exact GGUF import: 8-bit and 4-bit MatMulNBits, the Q4 offset
correction, and the 8-bit embedding Gather (see ``gguf_blocks`` for the whole scheme)."""

from __future__ import annotations

import hashlib

from compress.stages.gguf_rows import BLOCK

MIN_SUFFIX = "_min"


def _constant(array, name: str):
    import onnx
    from onnx import numpy_helper

    return onnx.helper.make_node("Constant", [], [name], name=name + "_const",
                                 value=numpy_helper.from_array(array, name))


def replace_q8(graph, node, q, d, level: int) -> list:
    """An 8-bit MatMulNBits (default zero point 128) for a MatMul of 8-bit rows.

    ``q`` [N, kb, size]: ``w = d * (q - 128)`` (Q8_0, Q5_0, Q6_K), block ``size``.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    n, kb, size = q.shape
    prefix = node.input[1] + "_gguf"
    inits = [numpy_helper.from_array(q.astype(np.uint8), prefix + "_Q8"),
             numpy_helper.from_array(d.reshape(-1).astype(np.float32), prefix + "_scales")]
    graph.initializer.extend(inits)
    return [onnx.helper.make_node(
        "MatMulNBits", [node.input[0], inits[0].name, inits[1].name], list(node.output),
        name=node.name + "_gguf", domain="com.microsoft", K=kb * size, N=n, bits=8,
        block_size=size, accuracy_level=level)]


def replace_q4(graph, group: list, level: int, blocksums: dict[str, str],
               node_sums: bool = False, bits: int = 4) -> list:
    """One MatMulNBits (+ offset correction, + Split) for ``d * q + m`` MatMuls on one input.

    ``bits`` 4: 4-bit ``q`` (Q4_0, Q4_1, Q4_K) centred on zero point 8; 8: 5-bit ``q``
    (Q5_1, Q5_K) stored as ``q + 112`` at 8 bits, centred on 16 (zero point 128).
    ``group`` holds ``(node, q, d, m)`` for each MatMul; two or more become one node over
    their concatenated output channels, split back afterwards. ``node_sums``: the block
    sums the offsets multiply come from ``kb`` extra output channels of the node itself
    (weight 1 on one block each), i.e. from the activations as the node sees them (int8
    at ``accuracy_level`` 4), as llama.cpp's Q8_1 block sums are, instead of ``x @ E``.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    first = group[0][0]
    q = np.concatenate([g[1] for g in group])
    d = np.concatenate([g[2] for g in group])
    center, shift = (8, 0) if bits == 4 else (16, 112)  # stored q + shift; 2**(bits-1)
    zp, minima = q4_offsets(np.concatenate([g[3] for g in group]), d, center)
    n, kb, _ = q.shape
    k = kb * BLOCK
    sums = node_sums and minima is not None
    if sums:  # row j: q = center + 1 (weight 1) on block j, center (weight 0) elsewhere
        ones = np.full((kb, kb, BLOCK), center, np.uint8)
        ones[np.arange(kb), np.arange(kb)] = center + 1
        q, d = np.concatenate([q, ones]), np.concatenate([d, np.ones((kb, kb), d.dtype)])
        zp = None if zp is None else np.concatenate([zp, np.full((kb, kb), center,
                                                                 np.uint8)])
    prefix = first.input[1] + "_gguf"
    name = first.name + ("_gguf" if len(group) == 1 else "_gguf_fused")
    q = (q + shift).astype(np.uint8)
    packed = q if bits == 8 else (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    inits = [numpy_helper.from_array(packed, prefix + f"_Q{bits}"),
             numpy_helper.from_array(d.reshape(-1).astype(np.float32), prefix + "_scales")]
    if zp is not None:  # zero point ``center`` where that keeps the offset exact, else 0
        zp = (zp + shift).astype(np.uint8)
        if bits == 4 and kb % 2:
            zp = np.concatenate([zp, np.zeros((len(zp), 1), np.uint8)], axis=1)
        if bits == 4:
            zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
        inits.append(numpy_helper.from_array(zp, prefix + "_zero_points"))
    graph.initializer.extend(inits)
    outputs = [g[0].output[0] for g in group]
    final = outputs[0] if len(group) == 1 else name + "_out"
    out = final if minima is None else name + "_q"
    nodes = [onnx.helper.make_node("MatMulNBits", [first.input[0]] + [i.name for i in inits],
                                   [name + "_qs" if sums else out], name=name,
                                   domain="com.microsoft", K=k, N=len(q), bits=bits,
                                   block_size=BLOCK, accuracy_level=level)]
    if sums:
        graph.initializer.append(numpy_helper.from_array(np.array([n, kb], np.int64),
                                                         name + "_sums_split"))
        nodes.append(onnx.helper.make_node("Split", [name + "_qs", name + "_sums_split"],
                                           [out, name + "_sums"], name=name + "_sums",
                                           axis=-1))
        blocksums[f"{first.input[0]}:{k}:{name}"] = name + "_sums"
    if minima is not None:
        key = f"{first.input[0]}:{k}" + (f":{name}" if sums else "")
        nodes += _correction(first.input[0], k, kb, minima, prefix, name, out, final,
                             blocksums, key)
    if len(group) > 1:
        sizes = np.array([len(g[1]) for g in group], np.int64)
        graph.initializer.append(numpy_helper.from_array(sizes, name + "_split"))
        nodes.append(onnx.helper.make_node("Split", [final, name + "_split"], outputs,
                                           name=name + "_split", axis=-1))
    return nodes


def q4_offsets(m, d, center: int = 8):
    """(zero points [N, kb] uint8 or None, offsets [N, kb] f32 or None) for ``d * q + m``.

    With zero point 8 (``center``; 16 for 5-bit ``q``) the node computes ``d * (q - 8)``
    and the correction adds ``m + 8 d``; that offset is small (about ``d / 2`` for a block
    straddling zero), so the error int8 activations cause is about what it is on the true
    weight, where ``d * q`` plus ``m`` (zero point 0) multiplies it by the whole positive
    ``d * q`` (measured on SmolLM2: agreement 0.949 vs 0.890). Where ``m + 8 d`` is not
    exact in fp32 a block keeps zero point 0 and ``m``; zero points are None when all are 8
    (no input: the default).
    """
    import numpy as np

    shifted = m.astype(np.float64) + center * d.astype(np.float64)
    exact = shifted.astype(np.float32).astype(np.float64) == shifted
    offsets = np.where(exact, shifted, m).astype(np.float32)
    zp = None if exact.all() else np.where(exact, center, 0).astype(np.uint8)
    return zp, (None if not offsets.any() else offsets)


def _correction(x: str, k: int, kb: int, minima, prefix: str, name: str, out: str,
                final: str, blocksums: dict[str, str], key: str) -> list:
    """``final = out + (x @ E) @ M``: the Q4_1 offsets, one ``x @ E`` per distinct input.

    ``blocksums[key]``, when set, already names the block sums (``node_sums``).
    """
    import numpy as np
    import onnx

    # E and M are Constant nodes, not initializers, so that no quantizer pass that follows
    # takes these two small MatMuls for weights to quantize. Offsets fp16 when exact there.
    nodes = []
    e_name = f"gguf_blocksum_E_{k}"
    if key not in blocksums and e_name not in blocksums:
        blocksums[e_name] = e_name
        nodes.append(_constant(np.kron(np.eye(kb, dtype=np.float32),
                                       np.ones((BLOCK, 1), np.float32)), e_name))
    if key not in blocksums:
        blocksums[key] = f"{name}_blocksum"
        nodes.append(onnx.helper.make_node("MatMul", [x, e_name], [blocksums[key]],
                                           name=blocksums[key]))
    m_name = prefix + MIN_SUFFIX
    half = minima.T.astype(np.float16)
    if np.array_equal(half.astype(np.float32), minima.T):
        nodes += [_constant(np.ascontiguousarray(half), m_name + "_fp16"),
                  onnx.helper.make_node("Cast", [m_name + "_fp16"], [m_name],
                                        name=m_name + "_cast", to=onnx.TensorProto.FLOAT)]
    else:
        nodes.append(_constant(np.ascontiguousarray(minima.T), m_name))
    nodes.append(onnx.helper.make_node("MatMul", [blocksums[key], m_name], [name + "_m"],
                                       name=name + "_m"))
    nodes.append(onnx.helper.make_node("Add", [out, name + "_m"], [final], name=name + "_add"))
    return nodes


def gather_q8(graph, node, q, d, shared: dict[bytes, tuple[str, str]]) -> list:
    """An 8-bit GatherBlockQuantized for an embedding Gather whose rows are all 8-bit."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    v, kb, size = q.shape
    data = q.reshape(v, kb * size).astype(np.uint8)
    key = hashlib.blake2b(data.tobytes() + d.tobytes(), digest_size=16).digest()
    prefix = node.input[0] + "_gguf"
    nodes = []
    if key in shared:  # tied with an imported LM head: reshape its bytes, store nothing new
        b_name, s_name = shared[key]
        for src, shape, out in ((b_name, [v, kb * size], prefix + "_Q8"),
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
        block_size=size, gather_axis=0, quantize_axis=1))
    return nodes
