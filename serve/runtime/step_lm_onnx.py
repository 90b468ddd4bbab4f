"""Step-level LM (:class:`serve.runtime.step_lm.StepLM`) over an ONNX causal LM with a KV cache.

Drives the ``onnxruntime.InferenceSession`` that the ONNX runtime already loaded (no second
copy of the weights) directly. The graph (:func:`compress.stages.onnx_export.export_causal_lm`,
or an older optimum-onnx ``text-generation-with-past`` export: the same I/O names) takes
``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.N.key/value`` and
returns ``logits`` and ``present.N.key/value`` (past plus the new tokens), so the
left-padded layout of a :class:`serve.runtime.slot_table.SlotTable` decode group maps onto it
one to one (one ``session.run`` per group).
fp32, fp16, int8 and int4 (MatMulNBits) graphs share these inputs; layers may differ in
KV heads and head size (Gemma 4's global layers). A dynamic-int8 graph decodes each
sequence in a forward of its own (``per_row``, :func:`serve.runtime.step_lm.decode_per_row`).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from serve.errors import ArtifactError
from serve.runtime.slot_table import LayerKV, SlotTable

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"present\.(\d+)\.(key|value)$")


def _layer_names(names: list[str], pattern: re.Pattern) -> list[tuple[str, str]]:
    """(key name, value name) per layer, in layer order."""
    found: dict[int, dict[str, str]] = {}
    for name in names:
        match = pattern.match(name)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = name
    return [(found[i]["key"], found[i]["value"]) for i in sorted(found)]


class OnnxStepLM:
    """:class:`serve.runtime.step_lm.StepLM` over an ONNX causal LM session (KV cache).

    Args:
        session: The loaded ``onnxruntime.InferenceSession`` (shared).
        max_length: Context length per sequence.
        per_row: Decode every sequence in a forward of its own, with its own unpadded
            cache: exactly the computation of the sequence alone (for graphs whose rows
            interact, :data:`serve.runtime.step_lm.DYNAMIC_INT8`), at the cost of batching.

    Raises:
        ArtifactError: the graph has no KV-cache inputs (exported without ``-with-past``).
    """

    def __init__(self, session: Any, max_length: int, per_row: bool = False):
        self.session = session
        self.max_length = int(max_length)
        self.per_row = per_row
        # a dynamic-int8 graph's activation scale spans the whole input: a chunk or a
        # copied prefix would not give the whole prompt's numbers
        self.chunked_prefill = self.copies_kv = not per_row
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        self._past = _layer_names(list(inputs), _PAST)
        present = _layer_names(outputs, _PRESENT)
        if not self._past or len(present) != len(self._past) or "logits" not in outputs:
            raise ArtifactError("this ONNX LM has no KV-cache inputs/outputs (past_key_values.N"
                                ".key/value, present.N.key/value); export it again")
        self._outputs = ["logits"] + [name for pair in present for name in pair]
        first = inputs[self._past[0][0]]
        self._dtype = ORT_DTYPES.get(first.type, np.float32)
        # (kv heads, head size) per layer, for an empty cache
        self._shapes = [(int(inputs[key].shape[1]), int(inputs[key].shape[3]))
                        for key, _ in self._past]
        self._position_ids = "position_ids" in inputs
        self._branch = "use_cache_branch" in inputs  # older merged decoders
        vocab = session.get_outputs()[0].shape[-1]
        self.vocab_size = int(vocab) if isinstance(vocab, int) else -1
        # one more forward costs ~1,600 token-rows of KV (SmolLM2 fp32, docs/benchmarks.md;
        # fewer with int4 weights): past is copied into present every step
        self.table = SlotTable(self.max_length,
                               lambda like, shape: np.zeros(shape, dtype=like.dtype), 1536)

    def _empty(self, rows: int) -> list[LayerKV]:
        out = []
        for heads, head_dim in self._shapes:
            empty = np.zeros((rows, heads, 0, head_dim), dtype=self._dtype)
            out.append((empty, empty))
        return out

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
             past: list[LayerKV], every: bool = False) -> tuple[np.ndarray, list[LayerKV]]:
        """One forward; float32 logits of the last position (every position if ``every``)
        and the new cache per layer."""
        feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
        if self._position_ids:
            feed["position_ids"] = positions
        if self._branch:
            feed["use_cache_branch"] = np.array([past[0][0].shape[2] > 0])
        for (key_name, value_name), (keys, values) in zip(self._past, past, strict=True):
            feed[key_name], feed[value_name] = keys, values
        logits, *present = self.session.run(self._outputs, feed)
        kv = [(present[2 * i], present[2 * i + 1]) for i in range(len(self._past))]
        if self.vocab_size < 0:
            self.vocab_size = int(logits.shape[-1])
        return (logits if every else logits[:, -1, :]).astype(np.float32), kv

    def prefill(self, slot: int, prompt_ids: list[int], start: int = 0) -> np.ndarray:
        """Append ``prompt_ids`` to ``slot``'s cache (``start`` tokens held); float32
        next-token logits ``[vocab]``."""
        n = len(prompt_ids)
        self.table.check_prompt(slot, n, start)
        past = self.table.lone(slot) if start else self._empty(1)
        ids = np.asarray([prompt_ids], dtype=np.int64)
        logits, kv = self._run(ids, np.ones((1, start + n), dtype=np.int64),
                               np.arange(start, start + n, dtype=np.int64)[None], past)
        self.table.add(slot, kv, start + n)
        return logits[0]

    def prompt_logits(self, ids: list[int]) -> np.ndarray:
        """float32 logits ``[len(ids), vocab]`` of one forward over ``ids`` (an empty
        cache, no slot used): row ``t`` predicts token ``t + 1``."""
        row = np.asarray([list(ids)], dtype=np.int64)
        logits, _ = self._run(row, np.ones_like(row), np.arange(row.shape[1], dtype=np.int64)[None],
                              self._empty(1), every=True)
        return logits[0]

    def decode(self, slots: list[int], tokens: list[int]) -> np.ndarray:
        """Append ``tokens[i]`` to ``slots[i]``, one batched forward per decode group; logits
        ``[len(slots), V]`` in the order of ``slots``."""
        if len(slots) != len(tokens):
            raise ValueError(f"decode: {len(slots)} slots but {len(tokens)} tokens")
        if not slots:
            return np.zeros((0, max(self.vocab_size, 0)), dtype=np.float32)
        if self.per_row:
            return np.stack([self._decode_alone(s, t) for s, t in zip(slots, tokens,
                                                                      strict=True)])
        return self.table.decode(slots, tokens, lambda group, ids, mask, positions:
                                 self._run(ids, mask, positions, group.kv))

    def _decode_alone(self, slot: int, token: int) -> np.ndarray:
        """One token for ``slot`` in a forward of its own; its logits ``[vocab]``."""
        past = self.table.lone(slot)
        n = self.table.lengths[slot]
        logits, kv = self._run(np.asarray([[token]], dtype=np.int64),
                               np.ones((1, n + 1), dtype=np.int64),
                               np.asarray([[n]], dtype=np.int64), past)
        self.table.advance_lone(slot, kv)
        return logits[0]

    def free(self, slot: int) -> None:
        """Drop the slot's cache now (its group row is removed at once)."""
        self.table.free(slot)

    def read_kv(self, slot: int, start: int, stop: int) -> list[LayerKV]:
        """A copy of ``slot``'s keys/values at ``[start, stop)`` per layer."""
        return self.table.read(slot, start, stop)

    def reserve(self, rows: int, length: int) -> None:
        """Nothing to reserve: each decode group's cache is laid out when its slots change
        (:class:`serve.runtime.slot_table.SlotTable`)."""

    def load_prefix(self, slot: int, blocks: list[list[LayerKV]]) -> None:
        """Create ``slot``'s cache from cached prefix blocks."""
        self.table.load(slot, blocks)
