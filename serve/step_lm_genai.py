"""Step-level decoding of an ``onnx-genai`` model with ONNX Runtime: the continuous-batching
backend of :class:`serve.engine.Engine` for that format.

onnxruntime-genai 0.11.4's own ``og.Engine`` admits a new request on the CPU only once
the running batch has drained (measured: requests added at steps 3-11 of a 30-token
batch got their first token at step 59), so it cannot join streams mid-flight. The
builder's ``model.onnx`` itself can: its ``GroupQueryAttention`` reads each row's length
from ``attention_mask`` and writes the new key/value at that position of a shared
past/present buffer. This module keeps one such buffer per layer, ``[rows, kv_heads,
length, head_size]``, a row per running sequence, binds it as both past and present
(IOBinding, no copy per step) and runs every running sequence's next token as one batch
of right-padded rows. Greedy outputs equal onnxruntime-genai's lone ``Generator``
(tests/unit/test_engine.py). A dynamic-int8 model runs each row's step on its own
(``per_row``, :func:`serve.step_lm.decode_per_row`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_MIN_ROWS, _MIN_LENGTH = 4, 256


class GenaiStepLM:
    """A :class:`serve.step_lm.StepLM` over a model-builder ``model.onnx``.

    Args:
        path: The ``onnx-genai`` artifact folder (``genai_config.json``, ``model.onnx``).
        providers: ONNX Runtime execution providers.
        session_options: ONNX Runtime session options.
        per_row: Decode every row in a forward of its own: a row's activations are then
            quantized with its own scale, as when it runs alone (for
            :data:`serve.step_lm.DYNAMIC_INT8` models), at the cost of batching.
    """

    def __init__(self, path: Path, providers: list[str], session_options,
                 per_row: bool = False) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.per_row = per_row
        config = json.loads((Path(path) / "genai_config.json").read_text())["model"]
        decoder = config["decoder"]
        self.vocab_size = int(config["vocab_size"])
        self.max_length = int(config["context_length"])
        self._layers = int(decoder["num_hidden_layers"])
        self._kv_heads = int(decoder["num_key_value_heads"])
        self._head_size = int(decoder["head_size"])
        names = decoder["inputs"]
        outputs = decoder["outputs"]
        self._past = [name % i for i in range(self._layers)
                      for name in (names["past_key_names"], names["past_value_names"])]
        self._present = [name % i for i in range(self._layers)
                         for name in (outputs["present_key_names"],
                                      outputs["present_value_names"])]
        self._input_ids, self._mask = names["input_ids"], names["attention_mask"]
        self._logits = outputs["logits"]
        self.session = ort.InferenceSession(str(Path(path) / decoder["filename"]),
                                            session_options, providers=providers)
        kinds = {i.name: i.type for i in self.session.get_inputs()}
        self._kv_dtype = np.float16 if "float16" in kinds[self._past[0]] else np.float32
        self._buffers: list[np.ndarray] = []
        self._rows: dict[int, int] = {}  # slot → row of the buffers
        self._lengths = np.zeros(0, dtype=np.int64)  # tokens cached per row
        self._allocate(_MIN_ROWS, _MIN_LENGTH)

    # --- the KV buffer ----------------------------------------------------------------

    def _allocate(self, rows: int, length: int) -> None:
        """(Re)allocate the buffers with ``rows`` × ``length``, keeping the cached rows."""
        length = min(length, self.max_length)
        shape = (rows, self._kv_heads, length, self._head_size)
        fresh = [np.zeros(shape, dtype=self._kv_dtype) for _ in self._past]
        used = len(self._rows)
        for old, new in zip(self._buffers, fresh, strict=False):
            keep = min(old.shape[2], length)
            new[:used, :, :keep] = old[:used, :, :keep]
        lengths = np.zeros(rows, dtype=np.int64)
        lengths[:used] = self._lengths[:used]
        self._buffers, self._lengths = fresh, lengths
        log.debug("KV buffer: %d rows × %d tokens", rows, length)

    def _reserve(self, need_length: int) -> int:
        """A free row with room for ``need_length`` tokens (grows the buffers by doubling)."""
        rows, length = self._buffers[0].shape[0], self._buffers[0].shape[2]
        used = len(self._rows)
        if used >= rows or need_length > length:
            while rows <= used:
                rows *= 2
            while length < need_length:
                length *= 2
            self._allocate(rows, length)
        return used

    # --- StepLM ----------------------------------------------------------------------

    def _run(self, first: int, stop: int, ids: np.ndarray) -> np.ndarray:
        """Run rows ``first:stop`` on ``ids`` [rows, tokens]; return last-position logits."""
        ort = self._ort
        width = ids.shape[1]
        total = int(self._lengths[first:stop].max()) + width
        mask = (np.arange(total)[None, :]
                < (self._lengths[first:stop] + width)[:, None]).astype(np.int64)
        binding = self.session.io_binding()
        binding.bind_cpu_input(self._input_ids, ids.astype(np.int64))
        binding.bind_cpu_input(self._mask, mask)
        for past, present, buffer in zip(self._past, self._present, self._buffers,
                                         strict=True):
            value = ort.OrtValue.ortvalue_from_numpy(buffer[first:stop])
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)  # in place: past = present
        binding.bind_output(self._logits)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[-1].numpy()
        return logits[:, -1, :].astype(np.float32)

    def prefill(self, slot: int, prompt_ids: list[int]) -> np.ndarray:
        """Cache ``prompt_ids`` in a new row for ``slot``; logits [vocab] of the next token."""
        if slot in self._rows:
            raise ValueError(f"slot {slot} is already in use")
        if not 0 < len(prompt_ids) < self.max_length:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the context "
                             f"of {self.max_length}")
        row = self._reserve(len(prompt_ids) + 1)
        self._rows[slot] = row
        self._lengths[row] = 0
        logits = self._run(row, row + 1, np.asarray([prompt_ids], dtype=np.int64))
        self._lengths[row] = len(prompt_ids)
        return logits[0]

    def decode(self, slots: list[int], tokens: list[int]) -> np.ndarray:
        """Append ``tokens[i]`` to ``slots[i]`` in one batch; logits [len(slots), vocab].

        Rows run as one contiguous block; a row in it that was not asked for is fed a
        dummy token whose key/value land past its length and are overwritten later.
        """
        rows = [self._rows[s] for s in slots]
        first, stop = min(rows), max(rows) + 1
        need, length = int(self._lengths[first:stop].max()) + 1, self._buffers[0].shape[2]
        if need > length:
            self._allocate(self._buffers[0].shape[0], max(need, 2 * length))
        if self.per_row:
            out = np.empty((len(rows), self.vocab_size), dtype=np.float32)
            for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
                out[i] = self._run(row, row + 1, np.asarray([[token]], dtype=np.int64))[0]
                self._lengths[row] += 1
            return out
        ids = np.zeros((stop - first, 1), dtype=np.int64)
        for row, token in zip(rows, tokens, strict=True):
            ids[row - first, 0] = token
        before = self._lengths[first:stop].copy()
        logits = self._run(first, stop, ids)
        self._lengths[first:stop] = before
        for row in rows:
            self._lengths[row] += 1
        return logits[[row - first for row in rows]]

    def free(self, slot: int) -> None:
        """Drop ``slot``'s cache: the last row moves into its place (rows stay contiguous)."""
        row = self._rows.pop(slot)
        last = len(self._rows)
        if row != last:
            moved = next(s for s, r in self._rows.items() if r == last)
            n = int(self._lengths[last])
            for buffer in self._buffers:
                buffer[row, :, :n] = buffer[last, :, :n]
            self._lengths[row] = n
            self._rows[moved] = row
        self._lengths[last] = 0
