"""KV buffers reserved in virtual memory: committed by the tokens written, handed back on free.

onnxruntime-genai's ``GroupQueryAttention`` reads a batch's cache as ONE tensor per layer,
``[rows, kv_heads, length, head_size]``, so a row cannot grow on its own: growing the tensor
means a new one and a copy of every row, and on this VM writing fresh memory costs ~6 ms
per MB in page faults (a 3,000-token prompt's row of SmolLM2-135M: 0.55 s; the reallocations
of a doubling buffer cost 0.5-3.7 s each while other streams waited, issue 21). An arena
maps each buffer anonymously at its full reserved size instead: the reservation is only
address space, a page is committed when a token is first written into it, and
:meth:`KVArena.release` hands a freed row's pages back to the OS (``MADV_DONTNEED``), so
resident memory follows the tokens held, not the reservation.
"""

from __future__ import annotations

import logging
import mmap

import numpy as np

log = logging.getLogger(__name__)


class KVArena:
    """One key and one value buffer per attention layer, rows × length tokens reserved.

    Args:
        dims: ``(kv_heads, head_size)`` per buffer, in the graph's past-input order.
        dtype: Element type of the cache.
        rows: Sequences the buffers hold.
        length: Tokens per row.
    """

    def __init__(self, dims: list[tuple[int, int]], dtype: np.dtype, rows: int,
                 length: int) -> None:
        self.dims, self.dtype, self.rows, self.length = dims, np.dtype(dtype), rows, length
        self._maps: list[mmap.mmap] = []
        self.buffers: list[np.ndarray] = []
        for heads, size in dims:
            shape = (rows, heads, length, size)
            nbytes = max(int(np.prod(shape)) * self.dtype.itemsize, 1)
            # private: MADV_DONTNEED frees its pages (a shared mapping would keep them)
            region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
            self._maps.append(region)
            self.buffers.append(np.frombuffer(region, dtype=self.dtype,
                                              count=int(np.prod(shape))).reshape(shape))

    @property
    def reserved_bytes(self) -> int:
        """Address space reserved (not memory used)."""
        return sum(len(region) for region in self._maps)

    def copy_rows(self, source: KVArena, lengths: np.ndarray) -> None:
        """Copy each row's first ``lengths[row]`` tokens from ``source`` (a smaller arena)."""
        for row, n in enumerate(int(n) for n in lengths[:min(self.rows, source.rows)]):
            keep = min(n, self.length, source.length)
            for old, new in zip(source.buffers, self.buffers, strict=True):
                new[row, :, :keep] = old[row, :, :keep]

    def move_row(self, source: int, target: int, n: int) -> None:
        """Copy ``source``'s first ``n`` tokens into ``target`` (the hole of a freed row)."""
        for buffer in self.buffers:
            buffer[target, :, :n] = buffer[source, :, :n]

    def release(self, row: int, start: int = 0) -> None:
        """Hand the pages of ``row`` holding tokens ``start...`` back to the OS (pages wholly
        inside that range; they read as zeros after, and a row's tokens are always written
        before they are attended to)."""
        page = mmap.PAGESIZE
        for (heads, size), region in zip(self.dims, self._maps, strict=True):
            token = size * self.dtype.itemsize
            spans = ([(row * heads * self.length * token,
                       (row + 1) * heads * self.length * token)] if start == 0 else
                     [((row * heads + h) * self.length * token + start * token,
                       (row * heads + h + 1) * self.length * token) for h in range(heads)])
            for first, stop in spans:
                first, stop = -(-first // page) * page, stop // page * page
                if stop > first:
                    region.madvise(mmap.MADV_DONTNEED, first, stop - first)
