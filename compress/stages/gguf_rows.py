"""A GGUF's Q4_0 / Q4_1 / Q8_0 tensors, row by row, for the exact block import.

``RowBank`` dequantizes every tensor of the imported types once and indexes its rows by
their exact bytes, so an fp32 weight of the ONNX graph (whose values *are* the GGUF's
dequantized rows when the reference was loaded from that GGUF) finds its blocks again, row
by row, whatever order or fusion (q/k permutation, qkv) the graph applied.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

BLOCK = 32
Q4_TYPES = ("Q4_0", "Q4_1")
IMPORTED_TYPES = (*Q4_TYPES, "Q8_0")
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


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
