"""Per-slot KV caches and the decode groups of the torch and ONNX step LMs.

A decoded slot is a row of one *group*: a left-padded batch holding one key and one value
array per layer, ``[rows, kv_heads, width, head_dim]``, width = the group's longest
sequence. A decode step runs one forward per group, with an attention mask hiding each
row's padding and explicit ``position_ids`` (the row's own length), so a sequence's
positions and attended keys are exactly those of the sequence decoded alone, whichever
group it is in.

Groups keep a long sequence from widening the short ones' batch (each ONNX decode step
also copies past into present: rows x width again). The decoded slots, sorted by length,
are split into contiguous runs minimizing ``sum(pass_tokens + rows x width)``
(:func:`partition`; ``pass_tokens`` prices one more forward in token-rows of KV), again
only when the set of decoded slots changes (a join, leave or free); a group whose members
did not change keeps its arrays, so a steady decode copies nothing. A prefilled slot keeps
its own cache until the next decode that includes it; a freed slot's rows go at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from serve.runtime.protocol import ContextLengthExceeded

log = logging.getLogger(__name__)

#: One layer's (keys, values), each ``[batch, kv_heads, tokens, head_dim]`` (torch or numpy);
#: ``(None, None)`` for a layer that reuses another layer's keys (Gemma 4's KV sharing).
LayerKV = tuple[Any, Any]

#: Token-rows of KV that cost as much as one more forward (a pass over the weights). A
#: SmolLM2-135M fp32 decode step on 2 CPU cores costs ~27 ms + 16 µs per token-row through
#: ONNX (~1,600) and ~40 ms + 9 µs through torch (~4,500) (docs/benchmarks.md, "Decode
#: groups"); the step LMs pass their own value, this is the default.
PASS_TOKENS = 2048


def partition(lengths: Sequence[int], pass_tokens: int = PASS_TOKENS) -> list[list[int]]:
    """Split sequences into groups minimizing ``sum(pass_tokens + rows x longest)``.

    Args:
        lengths: Each sequence's length.
        pass_tokens: The cost of one more group, in token-rows.

    Returns:
        Groups of indices into ``lengths``, each group's members sorted by length (the
        shortest group first); an optimal grouping is contiguous in sorted order, so this
        is an O(n²) dynamic programme over the sorted lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    best = [0] + [0] * len(order)  # best[j]: cost of the first j sorted sequences
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        width = lengths[order[j - 1]]  # the longest of any run ending at j
        best[j], cut[j] = min((best[i] + pass_tokens + (j - i) * width, i) for i in range(j))
    groups: list[list[int]] = []
    j = len(order)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


class Group:
    """One left-padded decode batch (read-only to callers: :class:`SlotTable` owns it).

    Attributes:
        rows: Slot ids, one per batch row.
        kv: Per layer (keys, values), ``[len(rows), kv_heads, width, head_dim]``.
        layout: Serial number of the layout that built these arrays; a group re-laid out
            is a new :class:`Group` with a new number.
    """

    def __init__(self, rows: list[int], kv: list[LayerKV], layout: int):
        self.rows, self.kv, self.layout = rows, kv, layout

    @property
    def width(self) -> int:
        """Token columns of the group's arrays."""
        return next((int(k.shape[2]) for k, _ in self.kv if k is not None), 0)


class SlotTable:
    """Per-slot KV caches and the decode groups (array-library agnostic).

    Args:
        max_length: Context length per sequence.
        zeros: ``zeros(like, shape)`` returns a zeroed array of ``like``'s dtype and device.
        pass_tokens: Token-rows of KV one more forward costs (see :func:`partition`).
    """

    def __init__(self, max_length: int, zeros: Callable[[Any, tuple[int, ...]], Any],
                 pass_tokens: int = PASS_TOKENS):
        self.max_length = max_length
        self.pass_tokens = pass_tokens
        self._zeros = zeros
        self.lengths: dict[int, int] = {}
        self._solo: dict[int, list[LayerKV]] = {}
        self._groups: list[Group] = []
        self.layout = 0  # serial of the latest group layout

    @property
    def groups(self) -> tuple[Group, ...]:
        """The decode groups, in the order a step runs them."""
        return tuple(self._groups)

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
        stepped alone is never a group row.

        Raises:
            ValueError: the slot is unknown, a group row, or its sequence fills the context.
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

    def prepare(self, slots: Sequence[int]) -> tuple[Group, ...]:
        """The groups of a decode step over ``slots`` (regrouped if the set changed).

        Raises:
            ValueError: a slot is unknown or repeated, or its sequence fills the context.
        """
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots: repeated slot ids in {list(slots)}")
        for slot in slots:
            if slot not in self.lengths:
                raise ValueError(f"slot {slot} has no cache (prefill it first)")
            if self.lengths[slot] >= self.max_length:
                raise ValueError(f"slot {slot}: its {self.lengths[slot]} tokens fill the "
                                 f"context of {self.max_length}; free it")
        if set(slots) != set(self._decoded()):
            self._regroup(list(slots))
        return self.groups

    def decode(self, slots: Sequence[int], tokens: Sequence[int],
               run: Callable[[Group, np.ndarray, np.ndarray, np.ndarray],
                             tuple[np.ndarray, list[LayerKV]]]) -> np.ndarray:
        """One decode step: ``run(group, ids, mask, positions)`` per group, in group order,
        returns the group's float32 logits ``[rows, V]`` and its new cache.

        Returns:
            Logits ``[len(slots), V]`` in the order of ``slots``.
        """
        token_of = dict(zip(slots, tokens, strict=True))
        out: dict[int, np.ndarray] = {}
        for group in self.prepare(slots):
            ids = np.asarray([[token_of[slot]] for slot in group.rows], dtype=np.int64)
            mask, positions = self.mask_and_positions(group)
            logits, kv = run(group, ids, mask, positions)
            self.advance(group, kv)
            out.update(zip(group.rows, logits, strict=True))
        return np.stack([out[slot] for slot in slots])

    def mask_and_positions(self, group: Group) -> tuple[np.ndarray, np.ndarray]:
        """int64 attention mask ``[rows, width + 1]`` and position ids ``[rows, 1]`` of a
        step of ``group``."""
        width = group.width
        mask = np.zeros((len(group.rows), width + 1), dtype=np.int64)
        lengths = [self.lengths[slot] for slot in group.rows]
        for row, n in enumerate(lengths):
            mask[row, width - n:] = 1
        return mask, np.asarray(lengths, dtype=np.int64)[:, None]

    def advance(self, group: Group, kv: list[LayerKV]) -> None:
        """Take ``group``'s cache after a step (one more column) and count the new tokens."""
        group.kv = kv
        for slot in group.rows:
            self.lengths[slot] += 1

    def free(self, slot: int) -> None:
        """Forget ``slot``; if it is a group row the groups are recomputed without it now."""
        if slot not in self.lengths:
            raise ValueError(f"slot {slot} has no cache")
        self._solo.pop(slot, None)
        decoded = self._decoded()
        if slot in decoded:
            self._regroup([s for s in decoded if s != slot])
        del self.lengths[slot]

    def _decoded(self) -> list[int]:
        return [slot for group in self._groups for slot in group.rows]

    def _find(self, slot: int) -> tuple[Group, int]:
        """The group holding ``slot`` and its row there."""
        for group in self._groups:
            if slot in group.rows:
                return group, group.rows.index(slot)
        raise ValueError(f"slot {slot} has no cache")

    def _own(self, slot: int) -> list[LayerKV]:
        """``slot``'s unpadded cache, ``[1, H, n, D]`` per layer (a view into its group)."""
        if slot in self._solo:
            return self._solo[slot]
        group, row = self._find(slot)
        n, width = self.lengths[slot], group.width
        return [(None, None) if k is None
                else (k[row:row + 1, :, width - n:], v[row:row + 1, :, width - n:])
                for k, v in group.kv]

    def _regroup(self, slots: list[int]) -> None:
        """Group ``slots`` anew; groups whose members are unchanged keep their arrays, rows
        no longer decoded get their own (copied) cache."""
        for slot in self._decoded():
            if slot not in slots and slot in self.lengths:
                self._solo[slot] = [(_copy(k), _copy(v)) for k, v in self._own(slot)]
        kept = {frozenset(group.rows): group for group in self._groups}
        runs = partition([self.lengths[s] for s in slots], self.pass_tokens)
        self._groups = [kept.get(frozenset(rows)) or self._lay_out(rows)
                        for rows in ([slots[i] for i in run] for run in runs)]
        for slot in slots:
            self._solo.pop(slot, None)

    def _lay_out(self, rows: list[int]) -> Group:
        """A new group for ``rows``, copied from their current caches (a lone slot's own
        cache becomes a one-row group as it is: it has no padding to add)."""
        self.layout += 1
        if len(rows) == 1 and rows[0] in self._solo:
            return Group(rows, self._solo[rows[0]], self.layout)
        sources = [self._own(slot) for slot in rows]
        width = max(self.lengths[slot] for slot in rows)
        kv: list[LayerKV] = []
        for layer in range(len(sources[0])):
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
        log.debug("decode group laid out: %d rows x %d tokens", len(rows), width)
        return Group(rows, kv, self.layout)


def _copy(array: Any) -> Any:
    """A copy of a numpy array or torch tensor (None stays None)."""
    if array is None:
        return None
    return array.copy() if isinstance(array, np.ndarray) else array.clone()
