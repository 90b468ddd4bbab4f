"""A GGUF's quantized tensors, row by row, for the exact block import.

``RowBank`` dequantizes every tensor of the imported types once and indexes its rows by
their exact bytes, so an fp32 weight of the ONNX graph (whose values *are* the GGUF's
dequantized rows when the reference was loaded from that GGUF) finds its blocks again, row
by row, whatever order or fusion (q/k permutation, qkv) the graph applied.

Each type is unpacked into the two forms ONNX Runtime 1.31's MatMulNBits can hold (it
takes 2, 4 or 8 bits, blocks of 16 or more; no 5- or 6-bit storage):

* 4-bit, ``w = d * q + m`` per 32 values (``Q4_TYPES``): Q4_0 (``m = -8 d``), Q4_1, and
  Q4_K, whose 32-value sub-blocks are ``d·sc * q - dmin·m`` with 6-bit ``sc``/``m``: the
  products ``d·sc`` and ``dmin·m`` (an fp16 times a 6-bit integer) are exact in fp32.
* 8-bit, ``w = d * (q - 128)`` (``Q8_TYPES``): Q8_0; Q5_0 (``d * (q5 - 16)``: ``q5 +
  112``); Q6_K, whose 16-value sub-blocks are ``d·sc * (q6 - 32)`` with int8 ``sc``
  (``q6 + 96``, block 16). These need 8-bit storage (5 and 6 bits do not fit 4).
* 5-bit with an offset, ``w = d * q5 + m`` per 32 values (``Q5_TYPES``): Q5_1 and Q5_K
  (``d·sc * q5 - dmin·m``, as Q4_K): 8-bit storage plus the offset correction of Q4_1.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

BLOCK = 32
Q4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
Q8_TYPES = ("Q8_0", "Q5_0", "Q6_K")
Q5_TYPES = ("Q5_1", "Q5_K")
IMPORTED_TYPES = (*Q4_TYPES, *Q8_TYPES, *Q5_TYPES)
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144,
               "Q5_K": 176, "Q6_K": 210}
#: rows of one MatMulNBits must share a storage kind (and a block size)
KIND = {**dict.fromkeys(Q4_TYPES, 4), **dict.fromkeys(Q8_TYPES, 8),
        **dict.fromkeys(Q5_TYPES, 5)}
#: values per MatMulNBits block (the GGUF sub-block), where not ``BLOCK``
SUB_BLOCK = {"Q6_K": 16}


def _f16(raw):
    import numpy as np

    return raw.copy().view(np.float16).astype(np.float32)[:, 0]


def _unpack_k(raw, qtype: str):
    """Q4_K / Q5_K / Q6_K super-blocks [n, bytes] -> (q [n * subs, sub] uint8, d, m).

    The bit layout is ``gguf.quants``' (llama.cpp's ``dequantize_row_q4_K/q5_K/q6_K``).
    """
    import numpy as np
    from gguf.quants import Q4_K

    n = len(raw)
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(raw[:, 0:2]), _f16(raw[:, 2:4])
        sc, mins = Q4_K.get_scale_min(raw[:, 4:16])
        sc, mins = sc.reshape(n, 8).astype(np.float32), mins.reshape(n, 8).astype(np.float32)
        qs = raw[:, -128:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(n, 8, 32).astype(np.uint8)
        if qtype == "Q5_K":  # bit j of the 32 qh bytes is sub-block j's fifth bit
            qh = raw[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            q = q | ((qh & 1) << 4).astype(np.uint8)
        return (q.reshape(n * 8, 32), (d[:, None] * sc).reshape(-1),
                (-(dmin[:, None] * mins)).reshape(-1))
    ql, qh = raw[:, :128], raw[:, 128:192]
    sc = raw[:, 192:208].copy().view(np.int8).astype(np.float32)
    d = _f16(raw[:, 208:210])
    ql = (ql.reshape(n, -1, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    qh = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q6 = ql.reshape(n, -1, 32) | (qh.reshape(n, -1, 32) << 4)  # 0..63, w = d·sc (q6 - 32)
    q = (q6.reshape(n * 16, 16).astype(np.int16) + 96).astype(np.uint8)
    scale = (d[:, None] * sc).reshape(-1)
    return q, scale, np.zeros_like(scale)


def _unpack_gguf(raw, qtype: str):
    """GGUF blocks [n, bytes] -> (q [subs, size] uint8, d [subs] f32, m [subs] f32).

    4- and 5-bit offset types come back as ``w = d * q + m``; 8-bit types as ``w = d *
    (q - 128)`` (MatMulNBits' 8-bit default zero point), ``m`` zero.
    """
    import numpy as np

    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        return _unpack_k(raw, qtype)
    d = _f16(raw[:, :2])
    if qtype == "Q8_0":
        q = (raw[:, 2:].copy().view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return q, d, np.zeros_like(d)
    if qtype in ("Q5_0", "Q5_1"):
        at = 2 if qtype == "Q5_0" else 4
        qh = raw[:, at:at + 4].copy().view(np.uint32).reshape(-1, 1) >> np.arange(
            32, dtype=np.uint32)
        qs = raw[:, at + 4:]
        q5 = np.concatenate([qs & 0x0F, qs >> 4], axis=1) | ((qh & 1).astype(np.uint8) << 4)
        if qtype == "Q5_1":  # w = d * q5 + m
            return q5, d, _f16(raw[:, 2:4])
        return (q5 + 112).astype(np.uint8), d, np.zeros_like(d)
    if qtype == "Q4_1":
        m = _f16(raw[:, 2:4])
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
        """(q [N, kb, size], d [N, kb], m [N, kb], types) for the matched rows, or None.

        None when the rows mix block sizes or storage kinds (no one node holds them).
        """
        import numpy as np

        qs, ds, ms, types = [], [], [], set()
        for name, row in hits:
            qtype, data = self.raw[name]
            types.add(qtype)
            if len({SUB_BLOCK.get(t, BLOCK) for t in types}) > 1 or len(
                    {KIND[t] for t in types}) > 1:
                return None
            blocks = data[row].reshape(-1, BLOCK_BYTES[qtype])
            q, d, m = _unpack_gguf(blocks, qtype)
            qs.append(q)
            ds.append(d)
            ms.append(m)
        return np.stack(qs), np.stack(ds), np.stack(ms), types
