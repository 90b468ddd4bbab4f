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

from serve.runtimes import ContextLengthExceeded

log = logging.getLogger(__name__)

#: One layer's (keys, values), each ``[batch, kv_heads, tokens, head_dim]`` (torch or numpy).
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
        return int(self.kv[0][0].shape[2]) if self.kv else 0

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
        return [(_copy(k[0, :, start:stop]), _copy(v[0, :, start:stop]))
                for k, v in self._own(slot)]

    def load(self, slot: int, blocks: list[list[LayerKV]]) -> None:
        """Create ``slot``'s own cache from consecutive :meth:`read` blocks."""
        self.check_prompt(slot, 1)
        n = sum(int(block[0][0].shape[1]) for block in blocks)
        kv: list[LayerKV] = []
        for layer in range(len(blocks[0])):
            like = blocks[0][layer][0]
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
        return [(k[row:row + 1, :, width - n:], v[row:row + 1, :, width - n:])
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
    """A copy of a numpy array or torch tensor."""
    return array.copy() if isinstance(array, np.ndarray) else array.clone()


class TorchStepLM:
    """:class:`StepLM` over a loaded transformers causal LM (fp32/fp16/bf16 or bitsandbytes).

    Args:
        model: The runtime's model (shared, not copied).
        max_length: Context length per sequence.
    """

    def __init__(self, model: Any, max_length: int):
        import torch
        from transformers import DynamicCache

        self._torch, self._cache_cls = torch, DynamicCache
        self.model = model
        self.device = model.device
        self.max_length = int(max_length)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.table = SlotTable(self.max_length,
                               lambda like, shape: like.new_zeros(shape))
        self._cache: Any = None
        self._cache_layout = -1
        self.chunked_prefill = self.copies_kv = True

    def _mask(self, mask: np.ndarray) -> Any:
        """The step's attention mask; with padding, the 4D mask attention takes directly.

        transformers builds a padded mask with ``vmap`` on every forward (~9 ms a step
        here); for one query token per row the causal part is empty, so the padding mask,
        in the form sdpa (bool) or eager attention (additive) expects, is the same mask.
        Without padding the 2D mask is passed: transformers then skips the mask entirely,
        exactly as ``generate`` does.
        """
        torch = self._torch
        padded = torch.from_numpy(mask).to(self.device)
        impl = getattr(self.model.config, "_attn_implementation", None)
        if mask.all() or impl not in ("sdpa", "eager"):
            return padded
        keep = padded.bool()[:, None, None, :]
        if impl == "sdpa":
            return keep
        dtype = self.model.dtype
        return torch.zeros(keep.shape, dtype=dtype, device=self.device).masked_fill(
            ~keep, torch.finfo(dtype).min)

    def _logits(self, out: Any) -> np.ndarray:
        return out.logits[:, -1, :].float().cpu().numpy()

    def prefill(self, slot: int, prompt_ids: list[int], start: int = 0) -> np.ndarray:
        """Append ``prompt_ids`` to ``slot``'s cache (``start`` tokens held); float32 logits
        ``[vocab]``."""
        torch = self._torch
        n = len(prompt_ids)
        self.table.check_prompt(slot, n, start)
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        cache = (self._cache_cls(ddp_cache_data=self.table.lone(slot)) if start
                 else self._cache_cls())
        positions = torch.arange(start, start + n, device=self.device)[None]
        with torch.inference_mode():
            out = self.model(input_ids=ids,
                             attention_mask=torch.ones((1, start + n), dtype=torch.long,
                                                       device=self.device),
                             position_ids=positions, cache=cache, use_cache=True,
                             logits_to_keep=1)
        kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        self.table.add(slot, kv, start + n)
        return self._logits(out)[0]

    def decode(self, slots: list[int], tokens: list[int]) -> np.ndarray:
        """Append ``tokens[i]`` to ``slots[i]`` in one forward; float32 ``[len(slots), vocab]``."""
        torch = self._torch
        if len(slots) != len(tokens):
            raise ValueError(f"decode: {len(slots)} slots but {len(tokens)} tokens")
        if not slots:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        index = self.table.prepare(slots)
        if self._cache_layout != self.table.layout:
            self._cache = self._cache_cls(ddp_cache_data=self.table.kv)
            self._cache_layout = self.table.layout
        row_tokens = [0] * len(index)
        for i, row in enumerate(index):
            row_tokens[row] = int(tokens[i])
        mask, positions = self.table.mask_and_positions()
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor(row_tokens, device=self.device)[:, None],
                attention_mask=self._mask(mask),
                position_ids=torch.from_numpy(positions).to(self.device),
                cache=self._cache, use_cache=True, logits_to_keep=1)
        self.table.advance([(layer.keys, layer.values) for layer in self._cache.layers])
        return self._logits(out)[index]

    def free(self, slot: int) -> None:
        """Drop the slot's cache now (its batch row is removed at once)."""
        self.table.free(slot)
        if self._cache_layout != self.table.layout:
            self._cache, self._cache_layout = None, -1

    def read_kv(self, slot: int, start: int, stop: int) -> list[LayerKV]:
        """A copy of ``slot``'s keys/values at ``[start, stop)`` per layer."""
        return self.table.read(slot, start, stop)

    def load_prefix(self, slot: int, blocks: list[list[LayerKV]]) -> None:
        """Create ``slot``'s cache from cached prefix blocks."""
        self.table.load(slot, blocks)
