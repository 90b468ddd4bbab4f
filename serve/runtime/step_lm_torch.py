"""The torch :class:`serve.runtime.step_lm.StepLM`: a transformers causal LM driven step by step.

The decoded slots are :class:`serve.runtime.slot_table.SlotTable`'s left-padded decode groups; each
step is one forward per group, each group with a transformers ``DynamicCache`` of its own
built over its arrays (kept while the group is). Decode masks are built here for
full and sliding-window attention layers (transformers would rebuild them every step).
Qwen3.5's linear-attention layers keep a conv and a recurrent state per sequence instead of
keys and values: :class:`LinearStates` slots them beside the KV rows (chunked prefill
continues them; prefix-KV copy-in is off, a state cannot be restored at a block boundary).
Other recurrent layer types (Mamba-style, LFM2's conv) are refused in one line.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serve.errors import ArtifactError
from serve.runtime.slot_table import Group, LayerKV, SlotTable

#: transformers ``layer_types`` whose layers keep a fixed-size state per sequence instead of
#: keys and values: Qwen3.5's Gated DeltaNet (``linear_attention``: a conv and a recurrent
#: state, slotted here by :class:`LinearStates`) and Mamba-style mixers (refused).
RECURRENT_LAYER_TYPES = frozenset({"linear_attention", "mamba", "conv", "recurrent"})
SLOTTED_RECURRENT = frozenset({"linear_attention"})


def _layer_types(config: Any) -> set[str]:
    """The ``layer_types`` of a transformers (text) config, as a set."""
    return set(getattr(config.get_text_config(), "layer_types", None) or ())


def _attention_layout(config: Any) -> tuple[int | None, bool, bool]:
    """(sliding window or None, one mask per layer type, whether :class:`TorchStepLM` may
    build the decode masks itself) from a transformers config."""
    types = _layer_types(config)
    config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    windowed = bool(window) and (not types or "sliding_attention" in types)
    return (int(window) if windowed else None, "sliding_attention" in types,
            types <= {"full_attention", "sliding_attention", "linear_attention"})


def _layer_kv(cache: Any) -> list[LayerKV]:
    """A transformers cache's (keys, values) per layer; (None, None) where a layer holds none
    (it reuses an earlier layer's keys)."""
    return [(getattr(layer, "keys", None), getattr(layer, "values", None))
            for layer in cache.layers]


class LinearStates:
    """Per-slot conv and recurrent states of linear-attention layers, slotted like KV rows.

    A slot's states are its own tensors after a prefill; while the slot is a group row they
    are views of its row in the group's cache, which transformers updates in place each step.

    Args:
        layers: Indices of the linear-attention layers.
    """

    def __init__(self, layers: list[int]):
        self.layers = layers
        self.own: dict[int, list[tuple[Any, Any]]] = {}

    def take(self, slot: int, cache: Any) -> None:
        """Keep the states of a batch-1 ``cache`` as ``slot``'s."""
        self.own[slot] = [(cache.layers[i].conv_states[0], cache.layers[i].recurrent_states[0])
                          for i in self.layers]

    def fill(self, cache: Any, slots: list[int]) -> None:
        """Write the states of ``slots`` (batch rows, in order) into a new ``cache``; the
        slots' states become views of their rows."""
        import torch

        for j, i in enumerate(self.layers):
            layer = cache.layers[i]
            conv = torch.cat([self.own[slot][j][0] for slot in slots])
            recurrent = torch.cat([self.own[slot][j][1] for slot in slots])
            layer.lazy_initialization(conv_states=conv, recurrent_states=recurrent,
                                      conv_kernel_size=conv.shape[-1])
            layer.conv_states[0].copy_(conv)
            layer.recurrent_states[0].copy_(recurrent)
            layer.has_previous_state[0] = True
        for row, slot in enumerate(slots):
            self.own[slot] = [(cache.layers[i].conv_states[0][row:row + 1],
                               cache.layers[i].recurrent_states[0][row:row + 1])
                              for i in self.layers]


class TorchStepLM:
    """:class:`serve.runtime.step_lm.StepLM` over a loaded transformers causal LM (fp32, fp16, bf16
    or bitsandbytes).

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
        # a forward costs ~4,500 token-rows of KV (SmolLM2 fp32 on CPU, docs/benchmarks.md)
        self.table = SlotTable(self.max_length, lambda like, shape: like.new_zeros(shape), 4096)
        self._caches: dict[int, Any] = {}  # by the layout number of a group
        self.chunked_prefill = self.copies_kv = True
        self._window, self._by_type, self._own_mask = _attention_layout(model.config)
        unslotted = sorted(_layer_types(model.config) & (RECURRENT_LAYER_TYPES
                                                         - SLOTTED_RECURRENT))
        if unslotted:
            raise ArtifactError(
                f"{type(model).__name__}: the torch format cannot be served by the engine: its "
                f"{', '.join(unslotted)} layers keep a recurrent state per sequence, which "
                "TorchStepLM does not slot (attention and linear-attention layers only)")
        types = getattr(model.config.get_text_config(), "layer_types", None) or []
        linear = [i for i, kind in enumerate(types) if kind in SLOTTED_RECURRENT]
        self._states = LinearStates(linear) if linear else None
        # a recurrent state cannot be restored at a cached prefix's block boundary
        self.copies_kv = self._states is None

    def _new_cache(self, kv: list[LayerKV] | None = None, slots: list[int] | None = None):
        """A transformers cache holding ``kv`` (and, for linear-attention layers, the states
        of ``slots``); typed per layer from the config when the model has such layers."""
        if self._states is None:
            return self._cache_cls(ddp_cache_data=kv)
        cache = self._cache_cls(ddp_cache_data=kv, config=self.model.config)
        if slots:
            self._states.fill(cache, slots)
        return cache

    def _mask(self, mask: np.ndarray) -> Any:
        """The step's attention mask; with padding, the 4D mask attention takes directly.

        transformers builds a padded mask with ``vmap`` on every forward (~9 ms a step
        here); for one query token per row the causal part is empty, so the padding mask,
        in the form sdpa (bool) or eager attention (additive) expects, is the same mask.
        Sliding-window layers also hide keys ``window`` or more columns before the query
        (rows are left-padded, so columns count positions); a model that mixes layer types
        gets one mask per type (linear-attention layers none). Without padding, or for
        other layer types, the 2D mask is passed: transformers then builds the masks
        itself, exactly as ``generate`` does.
        """
        torch = self._torch
        padded = torch.from_numpy(mask).to(self.device)
        impl = getattr(self.model.config, "_attn_implementation", None)
        if mask.all() or impl not in ("sdpa", "eager") or not self._own_mask:
            return padded
        keep = padded.bool()[:, None, None, :]
        masks = {"full_attention": self._mask_form(keep, impl)}
        if self._window is not None:
            width = keep.shape[-1]
            recent = torch.arange(width, device=self.device) > width - 1 - self._window
            masks["sliding_attention"] = self._mask_form(keep & recent, impl)
            if not self._by_type:
                return masks["sliding_attention"]
        if self._states is not None:  # one new token per row: no padding to zero out
            masks["linear_attention"] = None
        return masks if len(masks) > 1 else masks["full_attention"]

    def _mask_form(self, keep: Any, impl: str) -> Any:
        """A boolean keep-mask as sdpa (bool) or eager attention (additive) takes it."""
        if impl == "sdpa":
            return keep
        torch, dtype = self._torch, self.model.dtype
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
        cache = (self._new_cache(self.table.lone(slot), [slot]) if start
                 else self._new_cache())
        positions = torch.arange(start, start + n, device=self.device)[None]
        with torch.inference_mode():
            out = self.model(input_ids=ids,
                             attention_mask=torch.ones((1, start + n), dtype=torch.long,
                                                       device=self.device),
                             position_ids=positions, cache=cache, use_cache=True,
                             logits_to_keep=1)
        self.table.add(slot, _layer_kv(out.cache), start + n)
        if self._states is not None:
            self._states.take(slot, out.cache)
        return self._logits(out)[0]

    def decode(self, slots: list[int], tokens: list[int]) -> np.ndarray:
        """Append ``tokens[i]`` to ``slots[i]``, one forward per decode group; float32
        ``[len(slots), vocab]`` in the order of ``slots``."""
        if len(slots) != len(tokens):
            raise ValueError(f"decode: {len(slots)} slots but {len(tokens)} tokens")
        if not slots:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        logits = self.table.decode(slots, tokens, self._step)
        self._drop_caches()
        return logits

    def _step(self, group: Group, ids: np.ndarray, mask: np.ndarray,
              positions: np.ndarray) -> tuple[np.ndarray, list[LayerKV]]:
        """One forward of ``group``; its logits and new cache."""
        torch = self._torch
        cache = self._caches.get(group.layout)
        if cache is None:
            cache = self._caches[group.layout] = self._new_cache(group.kv, group.rows)
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(ids).to(self.device),
                attention_mask=self._mask(mask),
                position_ids=torch.from_numpy(positions).to(self.device),
                cache=cache, use_cache=True, logits_to_keep=1)
        return self._logits(out), _layer_kv(cache)

    def _drop_caches(self) -> None:
        """Forget the transformers caches of groups that no longer exist."""
        live = {group.layout for group in self.table.groups}
        self._caches = {k: c for k, c in self._caches.items() if k in live}

    def free(self, slot: int) -> None:
        """Drop the slot's cache now (its group row is removed at once)."""
        self.table.free(slot)
        if self._states is not None:
            del self._states.own[slot]
        self._drop_caches()

    def read_kv(self, slot: int, start: int, stop: int) -> list[LayerKV]:
        """A copy of ``slot``'s keys/values at ``[start, stop)`` per layer."""
        return self.table.read(slot, start, stop)

    def reserve(self, rows: int, length: int) -> None:
        """Nothing to reserve: each decode group's cache is laid out when its slots change
        (:class:`serve.runtime.slot_table.SlotTable`)."""

    def load_prefix(self, slot: int, blocks: list[list[LayerKV]]) -> None:
        """Create ``slot``'s cache from cached prefix blocks."""
        self.table.load(slot, blocks)
