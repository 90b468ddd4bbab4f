"""Step-level LM (:class:`serve.step_lm.StepLM`) over an optimum-exported ONNX causal LM.

Drives the ``onnxruntime.InferenceSession`` that the ONNX runtime already loaded (no second
copy of the weights) directly, without optimum's ``generate`` loop. The graph exported by
optimum (``text-generation-with-past``) takes ``input_ids``, ``attention_mask``,
``position_ids`` and ``past_key_values.N.key/value`` and returns ``logits`` and
``present.N.key/value`` (past plus the new token), so the left-padded batch layout of
:class:`serve.step_lm.SlotTable` maps onto it one to one. fp32, fp16, int8 and int4
(MatMulNBits) exports share these inputs. A dynamic-int8 graph decodes each sequence in a
forward of its own (``per_row``, :func:`serve.step_lm.decode_per_row`).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from serve.errors import ArtifactError
from serve.step_lm import LayerKV, SlotTable

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
    """:class:`serve.step_lm.StepLM` over an optimum ONNX causal LM session.

    Args:
        session: The loaded ``onnxruntime.InferenceSession`` (shared).
        max_length: Context length per sequence.
        per_row: Decode every sequence in a forward of its own, with its own unpadded
            cache: exactly the computation of the sequence alone (for graphs whose rows
            interact, :data:`serve.step_lm.DYNAMIC_INT8`), at the cost of batching.

    Raises:
        ArtifactError: the graph has no KV-cache inputs (exported without ``-with-past``).
    """

    def __init__(self, session: Any, max_length: int, per_row: bool = False):
        self.session = session
        self.max_length = int(max_length)
        self.per_row = per_row
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        self._past = _layer_names(list(inputs), _PAST)
        present = _layer_names(outputs, _PRESENT)
        if not self._past or len(present) != len(self._past) or "logits" not in outputs:
            raise ArtifactError("this ONNX LM has no KV-cache inputs/outputs (export it with "
                                "task text-generation-with-past)")
        self._outputs = ["logits"] + [name for pair in present for name in pair]
        first = inputs[self._past[0][0]]
        self._dtype = ORT_DTYPES.get(first.type, np.float32)
        self._heads, self._head_dim = int(first.shape[1]), int(first.shape[3])
        self._position_ids = "position_ids" in inputs
        self._branch = "use_cache_branch" in inputs  # older merged decoders
        vocab = session.get_outputs()[0].shape[-1]
        self.vocab_size = int(vocab) if isinstance(vocab, int) else -1
        self.table = SlotTable(self.max_length,
                               lambda like, shape: np.zeros(shape, dtype=like.dtype))

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
             past: list[LayerKV]) -> tuple[np.ndarray, list[LayerKV]]:
        """One forward; last-position logits (float32) and the new cache per layer."""
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
        return logits[:, -1, :].astype(np.float32), kv

    def prefill(self, slot: int, prompt_ids: list[int]) -> np.ndarray:
        """Create ``slot``'s KV cache from the prompt; float32 next-token logits ``[vocab]``."""
        n = len(prompt_ids)
        self.table.check_prompt(slot, n)
        empty = np.zeros((1, self._heads, 0, self._head_dim), dtype=self._dtype)
        ids = np.asarray([prompt_ids], dtype=np.int64)
        logits, kv = self._run(ids, np.ones_like(ids), np.arange(n, dtype=np.int64)[None],
                               [(empty, empty)] * len(self._past))
        self.table.add(slot, kv, n)
        return logits[0]

    def decode(self, slots: list[int], tokens: list[int]) -> np.ndarray:
        """Append ``tokens[i]`` to ``slots[i]``, one batched forward; logits ``[len(slots), V]``."""
        if len(slots) != len(tokens):
            raise ValueError(f"decode: {len(slots)} slots but {len(tokens)} tokens")
        if not slots:
            return np.zeros((0, max(self.vocab_size, 0)), dtype=np.float32)
        if self.per_row:
            return np.stack([self._decode_alone(s, t) for s, t in zip(slots, tokens,
                                                                      strict=True)])
        index = self.table.prepare(slots)
        ids = np.zeros((len(index), 1), dtype=np.int64)
        ids[index, 0] = np.asarray(tokens, dtype=np.int64)
        mask, positions = self.table.mask_and_positions()
        logits, kv = self._run(ids, mask, positions, self.table.kv)
        self.table.advance(kv)
        return logits[index]

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
        """Drop the slot's cache now (its batch row is removed at once)."""
        self.table.free(slot)
