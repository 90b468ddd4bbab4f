"""Automatic prefix caching: the KV of prompt prefixes shared across requests, in blocks.

As vLLM's automatic prefix caching: a prompt is cut into full blocks of ``block_size``
tokens; a block is keyed by its tokens chained with its parent block's key, so a key
names the whole prefix up to the block's end. After a sequence's prompt is prefilled its
full blocks' KV rows are copied out of its slot; a later prompt starting with the same
blocks gets them copied into its fresh slot and prefills only the rest (at least its last
token, whose logits give the first generated token).

Blocks are copies, referenced by no running sequence, so any of them may be evicted: the
least recently used first, and a chain's deeper blocks before its root (a lookup touches
a chain from its end to its root). The cache's tokens count in the engine's
``max_kv_tokens``; the scheduler evicts blocks when running sequences need the room.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: Tokens per cached block (vLLM's default block size).
BLOCK_SIZE = 16

# (parent key, block tokens): the key of a block and of the whole prefix it ends
_Key = tuple[Any, tuple[int, ...]]


class PrefixCache:
    """Prompt-prefix KV blocks, LRU-evicted.

    Args:
        block_size: Tokens per block.
        on_counts: Called with (hit tokens, missed tokens) per admitted prompt (metrics).
    """

    def __init__(self, block_size: int = BLOCK_SIZE,
                 on_counts: Callable[[int, int], None] | None = None) -> None:
        self.block_size = block_size
        self._blocks: OrderedDict[_Key, Any] = OrderedDict()
        self._on_counts = on_counts
        self.hits = 0
        self.misses = 0
        self.evicted = 0  # blocks

    @property
    def tokens(self) -> int:
        """KV tokens the cache holds."""
        return len(self._blocks) * self.block_size

    def _keys(self, ids: list[int], limit: int) -> list[_Key]:
        """Chained keys of the full blocks within ``ids[:limit]``."""
        keys: list[_Key] = []
        parent: Any = None
        size = self.block_size
        for start in range(0, limit - size + 1, size):
            key = (parent, tuple(ids[start:start + size]))
            keys.append(key)
            parent = key
        return keys

    def lookup(self, ids: list[int], leave: int) -> tuple[int, list[Any]]:
        """The longest cached prefix of ``ids`` leaving at least ``leave`` tokens to prefill
        (the scheduler's shortest chunk): (its tokens, its blocks' KV in order)."""
        found: list[_Key] = []
        for key in self._keys(ids, len(ids) - leave):
            if key not in self._blocks:
                break
            found.append(key)
        for key in reversed(found):  # the root ends most recent: evicted last
            self._blocks.move_to_end(key)
        return len(found) * self.block_size, [self._blocks[key] for key in found]

    def record(self, hit: int, miss: int) -> None:
        """Count an admitted prompt's cached and computed tokens."""
        self.hits += hit
        self.misses += miss
        if self._on_counts is not None:
            self._on_counts(hit, miss)

    def insert(self, ids: list[int], read: Callable[[int, int], Any],
               room: Callable[[], int]) -> int:
        """Store the full blocks of ``ids`` not cached yet, while ``room()`` tokens allow.

        Args:
            ids: Tokens the slot holds, from position 0.
            read: ``read(start, stop)`` copies the slot's KV rows ``[start, stop)``.
            room: KV tokens still free in the engine's budget.

        Returns:
            The number of blocks added.
        """
        added = 0
        keys = self._keys(ids, len(ids))
        for i, key in enumerate(keys):
            if key in self._blocks:
                continue
            if room() < self.block_size:
                break
            start = i * self.block_size
            self._blocks[key] = read(start, start + self.block_size)
            added += 1
        for key in reversed(keys[:i + 1] if keys else []):
            if key in self._blocks:
                self._blocks.move_to_end(key)
        return added

    def evict_one(self) -> bool:
        """Drop the least recently used block; whether there was one."""
        if not self._blocks:
            return False
        self._blocks.popitem(last=False)
        self.evicted += 1
        return True
