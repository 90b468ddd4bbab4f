"""Step-level causal LM: prefill one slot, decode one token for many slots at once.

The generation engine's scheduler drives a :class:`StepLM`: a request is prefilled into a
free slot and joins the running batch at the next :meth:`StepLM.decode`, which runs ONE
batched forward over every slot it is given (continuous / iteration-level batching).

Layout (shared by the torch and ONNX implementations through :class:`SlotTable`): the
running batch keeps one key and one value array per layer, ``[rows, kv_heads, width,
head_dim]``, each row *left-padded* with zeros to the longest sequence; a decode step feeds
an attention mask that hides the padding and explicit ``position_ids`` (each row's own
length), so a sequence's positions and attended keys are exactly those of the sequence
decoded alone. A prefilled slot keeps its own cache until the next decode that includes
it; the batch is re-laid out only when the set of decoded slots changes (a slot joins,
leaves or is freed), and then trimmed to the longest remaining sequence, so memory is
bounded by ``rows x max_length`` and :meth:`StepLM.free` releases the slot's rows at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from serve.runtime.protocol import ContextLengthExceeded

log = logging.getLogger(__name__)

#: One layer's (keys, values), each ``[batch, kv_heads, tokens, head_dim]`` (torch or numpy);
#: ``(None, None)`` for a layer that reuses another layer's keys (Gemma 4's KV sharing).
LayerKV = tuple[Any, Any]

#: (format, precision) of artifacts whose graph quantizes activations at run time with ONE
#: scale over the whole input tensor (ONNX Runtime's ``quantize_dynamic``:
#: DynamicQuantizeLinear): in a batch, a row's int8 activations depend on every other
#: row's values, so a greedy answer would change with its neighbours (issue 20: 13/72 and
#: 15/72 SmolLM2 answers). Their steps run one sequence at a time (:func:`decode_per_row`).
DYNAMIC_INT8 = frozenset({("onnx", "int8-dynamic"), ("onnx-genai", "int8")})


def decode_per_row(manifest: Any) -> bool:
    """Whether the artifact's decode steps must run one sequence at a time, so a greedy
    answer is the same alone or batched (see :data:`DYNAMIC_INT8`)."""
    return (manifest.format, manifest.precision) in DYNAMIC_INT8


class StepLM(Protocol):
    """Step-level causal LM. Called from ONE engine thread only (no locking needed inside).

    Attributes:
        vocab_size: Width of the returned logits.
        max_length: Context length (prompt + generated tokens) per sequence.
        chunked_prefill: Whether :meth:`prefill` continues a slot that holds tokens
            (``start > 0``) exactly as one whole prefill would (not for dynamic-int8
            graphs, whose activation scale spans the whole input).
        copies_kv: Whether :meth:`read_kv` / :meth:`load_prefix` work (prefix caching).
    """

    vocab_size: int
    max_length: int
    chunked_prefill: bool
    copies_kv: bool

    def prefill(self, slot: int, prompt_ids: list[int], start: int = 0) -> np.ndarray:
        """Append ``prompt_ids`` to ``slot``'s cache, which holds ``start`` tokens (0: a new
        slot), at positions ``start...``; float32 next-token logits ``[vocab]``."""
        ...

    def decode(self, slots: list[int], tokens: list[int]) -> np.ndarray:
        """Append ``tokens[i]`` to ``slots[i]``, one batched forward; logits ``[len(slots), V]``."""
        ...

    def free(self, slot: int) -> None:
        """Drop the slot's cache now (the slot id may be prefilled again)."""
        ...

    def read_kv(self, slot: int, start: int, stop: int) -> list[LayerKV]:
        """A copy of ``slot``'s cached keys/values at positions ``[start, stop)``, per layer
        ``[kv_heads, stop - start, head_dim]``."""
        ...

    def load_prefix(self, slot: int, blocks: list[list[LayerKV]]) -> None:
        """Create ``slot``'s cache from consecutive :meth:`read_kv` blocks (positions 0...);
        :meth:`prefill` then continues it with ``start`` = their total length."""
        ...


class SlotTable:
    """Per-slot KV caches and the left-padded running batch (array-library agnostic).

    Args:
        max_length: Context length per sequence.
        zeros: ``zeros(like, shape)`` returns a zeroed array of ``like``'s dtype and device.
    """

    def __init__(self, max_length: int, zeros: Callable[[Any, tuple[int, ...]], Any]):
        self.max_length = max_length
        self._zeros = zeros
        self.lengths: dict[int, int] = {}
        self._solo: dict[int, list[LayerKV]] = {}
        self.rows: list[int] = []
        self.kv: list[LayerKV] = []
        self.layout = 0  # bumped whenever ``kv`` is replaced by a new layout

    @property
    def width(self) -> int:
        """Token columns of the running batch."""
        return next((int(k.shape[2]) for k, _ in self.kv if k is not None), 0)

    def check_prompt(self, slot: int, n: int, start: int = 0) -> None:
        """Refuse an empty chunk, a new slot in use, a continued slot not holding ``start``
        tokens of its own, or a prompt that leaves no room to decode."""
        if start == 0 and slot in self.lengths:
            raise ValueError(f"slot {slot} is in use; free it before prefilling it again")
        if start and (self.lengths.get(slot) != start or slot not in self._solo):
            raise ValueError(f"slot {slot} does not hold {start} tokens of its own to "
                             "continue")
        if n < 1:
            raise ValueError(f"slot {slot}: the prompt has no tokens")
        if start + n >= self.max_length:
            raise ContextLengthExceeded(0, start + n, 1, self.max_length)

    def add(self, slot: int, kv: list[LayerKV], n: int) -> None:
        """Register a prefilled slot with its own cache (``[1, H, n, D]`` per layer)."""
        self.lengths[slot] = n
        self._solo[slot] = kv

    def read(self, slot: int, start: int, stop: int) -> list[LayerKV]:
        """A copy of ``slot``'s keys/values ``[H, stop - start, D]`` per layer."""
        return [(None, None) if k is None
                else (_copy(k[0, :, start:stop]), _copy(v[0, :, start:stop]))
                for k, v in self._own(slot)]

    def load(self, slot: int, blocks: list[list[LayerKV]]) -> None:
        """Create ``slot``'s own cache from consecutive :meth:`read` blocks."""
        self.check_prompt(slot, 1)
        n = sum(int(block[0][0].shape[1]) for block in blocks)
        kv: list[LayerKV] = []
        for layer in range(len(blocks[0])):
            like = blocks[0][layer][0]
            if like is None:
                kv.append((None, None))
                continue
            keys = self._zeros(like, (1, like.shape[0], n, like.shape[2]))
            values = self._zeros(like, (1, like.shape[0], n, like.shape[2]))
            at = 0
            for block in blocks:
                width = int(block[layer][0].shape[1])
                keys[0, :, at:at + width] = block[layer][0]
                values[0, :, at:at + width] = block[layer][1]
                at += width
            kv.append((keys, values))
        self.add(slot, kv, n)

    def lone(self, slot: int) -> list[LayerKV]:
        """``slot``'s own cache (``[1, H, n, D]`` per layer) for a step of it alone; a slot
        stepped alone is never a batch row.

        Raises:
            ValueError: the slot is unknown, a batch row, or its sequence fills the context.
        """
        if slot not in self._solo:
            raise ValueError(f"slot {slot} has no cache of its own (prefill it first)")
        if self.lengths[slot] >= self.max_length:
            raise ValueError(f"slot {slot}: its {self.lengths[slot]} tokens fill the "
                             f"context of {self.max_length}; free it")
        return self._solo[slot]

    def advance_lone(self, slot: int, kv: list[LayerKV]) -> None:
        """Take ``slot``'s cache after a step of it alone (one more column)."""
        self._solo[slot] = kv
        self.lengths[slot] += 1

    def prepare(self, slots: Sequence[int]) -> list[int]:
        """Lay the running batch out for ``slots``; return each slot's row index.

        Raises:
            ValueError: a slot is unknown or repeated.
            ContextLengthExceeded: a slot's sequence already fills the context.
        """
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots: repeated slot ids in {list(slots)}")
        for slot in slots:
            if slot not in self.lengths:
                raise ValueError(f"slot {slot} has no cache (prefill it first)")
            if self.lengths[slot] >= self.max_length:
                raise ValueError(f"slot {slot}: its {self.lengths[slot]} tokens fill the "
                                 f"context of {self.max_length}; free it")
        if set(slots) != set(self.rows):
            self._relayout(list(slots))
        where = {slot: row for row, slot in enumerate(self.rows)}
        return [where[slot] for slot in slots]

    def mask_and_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """int64 attention mask ``[rows, width + 1]`` and position ids ``[rows, 1]`` of a step."""
        width = self.width
        mask = np.zeros((len(self.rows), width + 1), dtype=np.int64)
        lengths = [self.lengths[slot] for slot in self.rows]
        for row, n in enumerate(lengths):
            mask[row, width - n:] = 1
        return mask, np.asarray(lengths, dtype=np.int64)[:, None]

    def advance(self, kv: list[LayerKV]) -> None:
        """Take the batch cache after a step (one more column) and count the new tokens."""
        self.kv = kv
        for slot in self.rows:
            self.lengths[slot] += 1

    def free(self, slot: int) -> None:
        """Forget ``slot``; if it is a batch row the batch is re-laid out without it now."""
        if slot not in self.lengths:
            raise ValueError(f"slot {slot} has no cache")
        self._solo.pop(slot, None)
        if slot in self.rows:
            self._relayout([s for s in self.rows if s != slot])
        del self.lengths[slot]

    def _own(self, slot: int) -> list[LayerKV]:
        """``slot``'s unpadded cache, ``[1, H, n, D]`` per layer (a view into the batch)."""
        if slot in self._solo:
            return self._solo[slot]
        row, n, width = self.rows.index(slot), self.lengths[slot], self.width
        return [(None, None) if k is None
                else (k[row:row + 1, :, width - n:], v[row:row + 1, :, width - n:])
                for k, v in self.kv]

    def _relayout(self, rows: list[int]) -> None:
        """Build the batch for ``rows``; batch rows left out get their own (copied) cache."""
        for slot in self.rows:
            if slot not in rows and slot in self.lengths:
                self._solo[slot] = [(_copy(k), _copy(v)) for k, v in self._own(slot)]
        sources = [self._own(slot) for slot in rows]
        width = max((self.lengths[slot] for slot in rows), default=0)
        kv: list[LayerKV] = []
        for layer in range(len(sources[0]) if sources else 0):
            like_k, like_v = sources[0][layer]
            if like_k is None:
                kv.append((None, None))
                continue
            keys = self._zeros(like_k, (len(rows), like_k.shape[1], width, like_k.shape[3]))
            values = self._zeros(like_v, (len(rows), like_v.shape[1], width, like_v.shape[3]))
            for row, (slot, src) in enumerate(zip(rows, sources, strict=True)):
                n = self.lengths[slot]
                keys[row, :, width - n:] = src[layer][0][0]
                values[row, :, width - n:] = src[layer][1][0]
            kv.append((keys, values))
        for slot in rows:
            self._solo.pop(slot, None)
        self.rows, self.kv = rows, kv
        self.layout += 1
        log.debug("step batch re-laid out: %d rows x %d tokens", len(rows), width)


def _copy(array: Any) -> Any:
    """A copy of a numpy array or torch tensor (None stays None)."""
    if array is None:
        return None
    return array.copy() if isinstance(array, np.ndarray) else array.clone()
