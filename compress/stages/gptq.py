"""GPTQ into MatMulNBits, calibrated on the recipe's calibration texts.

ONNX Runtime 1.31 ships a GPTQ (``GPTQWeightOnlyQuantConfig``, a port of
neural-compressor), but its error propagation reads a *column* of the upper-triangular
inverse-Hessian factor (``Hinv1[i:, i]``), which is zero below the diagonal: no error is
ever propagated and the result equals round-to-nearest (checked here on the tiny Llama:
identical weights). This module is the algorithm of Frantar et al. (2022) as published —
per output channel, block-wise asymmetric 4-bit grids of ``block_size`` along K, errors
propagated with the row ``Hinv[i, i:]`` — writing MatMulNBits nodes directly.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

MAXQ = 15
COLUMN_BLOCK = 128


def _grid(w, symmetric: bool):
    """Scale and zero point per row of ``w`` [N, g] (4-bit, MatMulNBits convention)."""
    import numpy as np

    if symmetric:
        absmax = np.abs(w).max(axis=1)
        scale = np.where(absmax > 0, absmax / 8, 1.0)
        return scale, np.full_like(scale, 8.0)
    lo, hi = w.min(axis=1), w.max(axis=1)
    scale = np.where(hi > lo, (hi - lo) / MAXQ, 1.0)
    zero = np.clip(np.round(-lo / scale), 0, MAXQ)
    return scale, zero


def gptq_matrix(weight_t, hessian, block_size: int, symmetric: bool = False,
                percdamp: float = 0.01, actorder: bool = False):
    """Quantize one weight with GPTQ.

    Args:
        weight_t: The weight as [N, K] (one row per output channel).
        hessian: ``X^T X`` of the layer's calibration inputs, [K, K].
        block_size: Weights per scale along K (K must be a multiple of it).
        symmetric: Zero point fixed at 8 (else a per-block zero point).
        percdamp: Dampening, a fraction of the mean Hessian diagonal.
        actorder: Process columns by decreasing Hessian diagonal (groups stay static).

    Returns:
        (q [N, K] uint8 in 0..15, scale [N, K/block_size], zero [N, K/block_size]).
    """
    import numpy as np

    w = np.array(weight_t, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64)
    n, k = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    kb = k // block_size
    scale = np.zeros((n, kb))
    zero = np.zeros((n, kb))
    for b in range(kb):  # static groups: grids from the original weights
        scale[:, b], zero[:, b] = _grid(w[:, b * block_size:(b + 1) * block_size], symmetric)
    perm = np.argsort(-np.diag(h)) if actorder else np.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h[np.arange(k), np.arange(k)] += percdamp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper triangular
    q = np.zeros((n, k), dtype=np.uint8)
    for i1 in range(0, k, COLUMN_BLOCK):
        i2 = min(i1 + COLUMN_BLOCK, k)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm[i1 + i] // block_size
            s, z = scale[:, col], zero[:, col]
            qi = np.clip(np.round(w1[:, i] / s) + z, 0, MAXQ)
            q[:, i1 + i] = qi
            err = (w1[:, i] - (qi - z) * s) / h1[i, i]
            w1[:, i:] -= np.outer(err, h1[i, i:])
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q = q[:, np.argsort(perm)]
    return q, scale.astype(np.float32), zero


def _hessians(model, names: dict[str, str], reader) -> dict[str, Any]:
    """``X^T X`` per activation feeding the MatMuls in ``names`` (node -> input)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    known = {o.name for o in augmented.graph.output}
    acts = sorted(set(names.values()))
    for act in acts:
        if act not in known:
            augmented.graph.output.append(onnx.helper.make_tensor_value_info(act, 1, None))
    session = ort.InferenceSession(augmented.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    del augmented
    hess: dict[str, Any] = {}
    for feed in reader:
        for act, value in zip(acts, session.run(acts, feed), strict=True):
            x = value.reshape(-1, value.shape[-1]).astype(np.float32)
            hess[act] = hess.get(act, 0) + x.T @ x
    return hess


def _pack(q, scale, zero, symmetric: bool, block_size: int):
    import numpy as np

    n, k = q.shape
    kb = k // block_size
    blocks = q.reshape(n, kb, block_size)
    packed = (blocks[..., 0::2] | (blocks[..., 1::2] << 4)).astype(np.uint8)
    if symmetric:
        return packed, scale.reshape(-1), None
    z = zero.astype(np.uint8)
    if kb % 2:
        z = np.concatenate([z, np.full((n, 1), 8, np.uint8)], axis=1)
    return packed, scale.reshape(-1), (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)


def gptq_graph(model, options, reader, symmetric: bool, accuracy_level: int) -> Any:
    """Replace every weight MatMul (K a multiple of ``block_size``) by a GPTQ MatMulNBits.

    Returns:
        The model (changed in place).
    """
    import onnx
    from onnx import numpy_helper
    from tqdm import tqdm

    bs = options.block_size
    inits = {i.name: i for i in model.graph.initializer}
    targets = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and "_gguf" not in node.name:
            dims = list(inits[node.input[1]].dims)
            if len(dims) == 2 and dims[0] % bs == 0:
                targets[node.name] = node
    if not targets:  # e.g. every MatMul took GGUF blocks or 8 bits already
        return model
    hess = _hessians(model, {n: node.input[0] for n, node in targets.items()}, reader)
    replaced: dict[str, Any] = {}
    for name, node in tqdm(targets.items(), desc="GPTQ", unit="layer", leave=False):
        weight = numpy_helper.to_array(inits[node.input[1]])
        q, scale, zero = gptq_matrix(weight.T, hess[node.input[0]], bs, symmetric,
                                     options.percdamp, options.actorder)
        packed, scales, zp = _pack(q, scale, zero, symmetric, bs)
        prefix = node.input[1] + "_gptq"
        new = [numpy_helper.from_array(packed, prefix + "_Q4"),
               numpy_helper.from_array(scales, prefix + "_scales")]
        if zp is not None:
            new.append(numpy_helper.from_array(zp, prefix + "_zero_points"))
        model.graph.initializer.extend(new)
        replaced[name] = onnx.helper.make_node(
            "MatMulNBits", [node.input[0], *(t.name for t in new)], list(node.output),
            name=name + "_Q4", domain="com.microsoft", K=weight.shape[0], N=weight.shape[1],
            bits=4, block_size=bs, accuracy_level=accuracy_level)
    nodes = [replaced.get(n.name, n) for n in model.graph.node]
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    log.info("GPTQ: %d MatMuls quantized", len(replaced))
    return model
