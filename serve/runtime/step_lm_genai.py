"""Step-level decoding of an ``onnx-genai`` model with ONNX Runtime: the continuous-batching
backend of :class:`serve.engine.core.Engine` for that format.

onnxruntime-genai's own ``og.Engine`` batches statically on the CPU (0.11.4, measured:
requests added at steps 3-11 of a 30-token batch got their first token at step 59; 0.18
still hard-codes a batch of 4 there, its continuous batching needs paged attention, built
only for CUDA/WebGPU fp16), so it cannot join streams mid-flight. The builder's
``model.onnx`` itself can: its ``GroupQueryAttention`` reads each row's length from
``attention_mask`` and writes the new key/value at that position of a shared past/present
buffer. This module keeps one such buffer per layer, ``[rows, kv_heads, length,
head_size]``, a row per running sequence, in a :class:`serve.runtime.kv_arena.KVArena`
(reserved up front by :meth:`GenaiStepLM.reserve` as address space, committed as tokens
are written, so a long prompt never makes the buffers grow and copy while other streams
wait), binds it as both past and present (IOBinding, no copy per step) and runs every
running sequence's next token as one batch of right-padded rows; a graph with a
``position_ids`` input (RoPE outside the attention op) gets each row's own positions.
Greedy outputs equal onnxruntime-genai's lone ``Generator`` (tests/unit/test_engine.py,
test_genai_archs.py). A dynamic-int8 model runs each row's step on its own
(``per_row``, :func:`serve.runtime.step_lm.decode_per_row`).

A hybrid model (Qwen3.5: linear-attention layers with a convolution and a recurrent state
per sequence, KV caches only for its full-attention layers) keeps one state buffer per
state input, ``[rows, ...]``, a row per sequence like the KV rows; a step writes back the
new state of the rows it was asked for only (a dummy token must not advance another
row's state), and such a model copies no prefix (a cached prefix's KV alone cannot
restore the recurrent state). Graphs it cannot drive are refused in one line: window-sized
KV caches for sliding-window layers (0.18's default; modelpress builds with
``windowed_kv_cache=false``) and inputs it does not know.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from serve.errors import ArtifactError
from serve.runtime.kv_arena import KVArena

log = logging.getLogger(__name__)

_MIN_ROWS, _MIN_LENGTH = 4, 256


class GenaiStepLM:
    """A :class:`serve.runtime.step_lm.StepLM` over a model-builder ``model.onnx``.

    Args:
        path: The ``onnx-genai`` artifact folder (``genai_config.json``, ``model.onnx``).
        providers: ONNX Runtime execution providers.
        session_options: ONNX Runtime session options.
        per_row: Decode every row in a forward of its own: a row's activations are then
            quantized with its own scale, as when it runs alone (for
            :data:`serve.runtime.step_lm.DYNAMIC_INT8` models), at the cost of batching.
    """

    def __init__(self, path: Path, providers: list[str], session_options,
                 per_row: bool = False) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.per_row = per_row
        # a dynamic-int8 graph's activation scale spans the whole input: a chunk or a
        # copied prefix would not give the whole prompt's numbers
        self.chunked_prefill = not per_row
        config = json.loads((Path(path) / "genai_config.json").read_text())["model"]
        decoder = config["decoder"]
        self.vocab_size = int(config["vocab_size"])
        self.max_length = int(config["context_length"])
        self._layers = int(decoder["num_hidden_layers"])
        names = decoder["inputs"]
        outputs = decoder["outputs"]
        kinds = [("key", "value")] + [(k,) for k in ("conv", "recurrent")
                                      if f"past_{k}_names" in names]
        per_layer = {kind: [(names[f"past_{k}_names"] % i, outputs[f"present_{k}_names"] % i)
                            for i in range(self._layers) for k in kind] for kind in kinds}
        self._input_ids, self._mask = names["input_ids"], names["attention_mask"]
        self._positions = names.get("position_ids", "position_ids")
        self._logits = outputs["logits"]
        if "sliding_window" in decoder:
            raise ArtifactError(f"{path}: the serving engine cannot run this onnx-genai "
                                "model: its sliding-window layers have window-sized KV "
                                "caches; rebuild the variant with modelpress (full-length "
                                "caches)")
        self.session = ort.InferenceSession(str(Path(path) / decoder["filename"]),
                                            session_options, providers=providers)
        inputs = {i.name: i for i in self.session.get_inputs()}
        # a hybrid graph has KV inputs for its attention layers only
        pairs = {kind: [p for p in pairs if p[0] in inputs] for kind, pairs in
                 per_layer.items()}
        self._past, self._present = (list(x) for x in zip(*pairs[("key", "value")],
                                                          strict=True))
        self._states = [p for kind in kinds[1:] for p in pairs[kind]]
        self.copies_kv = not per_row and not self._states
        # int4 MatMulNBits runs one row through a kernel of its own (SmolLM2: 0.48 in a
        # logit against the same row among others; two rows and up are bitwise equal)
        self.min_decode_rows = 1
        unknown = sorted(set(inputs) - {self._input_ids, self._mask, self._positions,
                                        *self._past, *(p for p, _ in self._states)})
        if unknown:
            raise ArtifactError(f"{path}: the serving engine cannot run this onnx-genai "
                                f"graph: it does not know its inputs {', '.join(unknown[:4])}")
        self._with_positions = self._positions in inputs
        # Qwen3.5's MRoPE takes [3, batch, tokens]: text positions repeat in all three
        self._position_rank = len(inputs[self._positions].shape) if self._with_positions else 0
        self._state_dims = [(tuple(inputs[p].shape[1:]),
                             np.float16 if "float16" in inputs[p].type else np.float32)
                            for p, _ in self._states]
        self._kv_dtype = np.float16 if "float16" in inputs[self._past[0]].type else np.float32
        # [kv_heads, head_size] per past input: from the graph where it is concrete (a
        # model may vary them per layer), else from genai_config
        default = (int(decoder["num_key_value_heads"]), int(decoder["head_size"]))
        self._kv_dims = [tuple(d if isinstance(d, int) else f for d, f in
                               zip(inputs[name].shape[1::2], default, strict=True))
                         for name in self._past]
        self._arena: KVArena | None = None
        self._state_buffers: list[np.ndarray] = []
        self._rows: dict[int, int] = {}  # slot → row of the buffers
        self._lengths = np.zeros(0, dtype=np.int64)  # tokens cached per row
        self._allocate(_MIN_ROWS, _MIN_LENGTH)

    # --- the KV buffer ----------------------------------------------------------------

    def _allocate(self, rows: int, length: int) -> None:
        """(Re)allocate the buffers with ``rows`` × ``length``, keeping the cached rows."""
        length = min(length, self.max_length)
        arena = KVArena(self._kv_dims, self._kv_dtype, rows, length)
        used = len(self._rows)
        if self._arena is not None:
            arena.copy_rows(self._arena, self._lengths[:used])
        lengths = np.zeros(rows, dtype=np.int64)
        lengths[:used] = self._lengths[:used]
        states = [np.zeros((rows, *dims), dtype=dtype) for dims, dtype in self._state_dims]
        for old, new in zip(self._state_buffers, states, strict=False):
            new[:used] = old[:used]
        self._arena, self._lengths, self._state_buffers = arena, lengths, states
        log.debug("KV buffers: %d rows × %d tokens (%.1f GB of address space)", rows, length,
                  arena.reserved_bytes / 1e9)

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, tokens per row) the KV buffers hold now."""
        return self._arena.rows, self._arena.length

    def reserve(self, rows: int, length: int) -> None:
        """Reserve room for ``rows`` sequences of ``length`` tokens now, so the buffers never
        grow (and copy) while requests run: address space only, memory is committed as
        tokens are written. Without it, or past it, the buffers grow by doubling."""
        rows = max(rows, self._arena.rows)
        length = max(min(length, self.max_length), self._arena.length)
        if (rows, length) == (self._arena.rows, self._arena.length):
            return
        try:
            self._allocate(rows, length)
        except OSError as exc:  # address space refused (strict overcommit): grow instead
            log.warning("could not reserve KV room for %d × %d tokens (%s); the buffers "
                        "grow as needed", rows, length, exc)

    def _reserve(self, need_length: int) -> int:
        """A free row with room for ``need_length`` tokens (grows the buffers by doubling)."""
        rows, length = self._arena.rows, self._arena.length
        used = len(self._rows)
        if used >= rows or need_length > length:
            while rows <= used:
                rows *= 2
            while length < need_length:
                length *= 2
            self._allocate(rows, length)
        return used

    # --- StepLM ----------------------------------------------------------------------

    def _run(self, first: int, stop: int, ids: np.ndarray, rows: list[int] | None = None
             ) -> np.ndarray:
        """Run rows ``first:stop`` on ``ids`` [rows, tokens]; return last-position logits.
        The new recurrent states of ``rows`` (default: all) are kept."""
        ort = self._ort
        width = ids.shape[1]
        total = int(self._lengths[first:stop].max()) + width
        mask = (np.arange(total)[None, :]
                < (self._lengths[first:stop] + width)[:, None]).astype(np.int64)
        binding = self.session.io_binding()
        binding.bind_cpu_input(self._input_ids, ids.astype(np.int64))
        binding.bind_cpu_input(self._mask, mask)
        if self._with_positions:
            positions = self._lengths[first:stop, None] + np.arange(width)[None, :]
            if self._position_rank == 3:
                positions = np.repeat(positions[None], 3, axis=0)
            binding.bind_cpu_input(self._positions, positions.astype(np.int64))
        for past, present, buffer in zip(self._past, self._present, self._arena.buffers,
                                         strict=True):
            value = ort.OrtValue.ortvalue_from_numpy(buffer[first:stop])
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)  # in place: past = present
        for (past, present), buffer in zip(self._states, self._state_buffers, strict=True):
            binding.bind_cpu_input(past, buffer[first:stop])
            binding.bind_output(present)
        binding.bind_output(self._logits)
        self.session.run_with_iobinding(binding)
        results = binding.get_outputs()
        for buffer, value in zip(self._state_buffers, results[len(self._present):-1],
                                 strict=True):
            new = value.numpy()
            for row in range(first, stop) if rows is None else rows:
                buffer[row] = new[row - first]
        return results[-1].numpy()[:, -1, :].astype(np.float32)

    def prefill(self, slot: int, prompt_ids: list[int], start: int = 0) -> np.ndarray:
        """Append ``prompt_ids`` to ``slot``'s row, which holds ``start`` tokens (0: a new
        row); logits [vocab] of the next token."""
        if (slot in self._rows) != bool(start):
            raise ValueError(f"slot {slot} is already in use" if start == 0 else
                             f"slot {slot} has no row to continue")
        if start and self._lengths[self._rows[slot]] != start:
            raise ValueError(f"slot {slot} does not hold {start} tokens")
        if not 0 < len(prompt_ids) < self.max_length - start:
            raise ValueError(f"prompt of {start + len(prompt_ids)} tokens does not fit the "
                             f"context of {self.max_length}")
        if start:
            row = self._rows[slot]
            self._grow(start + len(prompt_ids) + 1)
        else:
            row = self._reserve(len(prompt_ids) + 1)
            self._rows[slot] = row
            self._lengths[row] = 0
            for buffer in self._state_buffers:
                buffer[row] = 0
        logits = self._run(row, row + 1, np.asarray([prompt_ids], dtype=np.int64))
        self._lengths[row] = start + len(prompt_ids)
        return logits[0]

    def _grow(self, need_length: int) -> None:
        """Make the buffers at least ``need_length`` tokens long (doubling)."""
        length = self._arena.length
        if need_length > length:
            self._allocate(self._arena.rows, max(need_length, 2 * length))

    def read_kv(self, slot: int, start: int, stop: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """A copy of ``slot``'s keys/values at ``[start, stop)`` per layer."""
        row = self._rows[slot]
        buffers = [b[row, :, start:stop].copy() for b in self._arena.buffers]
        return list(zip(buffers[0::2], buffers[1::2], strict=True))

    def load_prefix(self, slot: int, blocks: list[list[tuple[np.ndarray, np.ndarray]]]
                    ) -> None:
        """Create ``slot``'s row from cached prefix blocks (positions 0...)."""
        if slot in self._rows:
            raise ValueError(f"slot {slot} is already in use")
        n = sum(int(block[0][0].shape[1]) for block in blocks)
        row = self._reserve(n + 1)
        self._rows[slot] = row
        at = 0
        for block in blocks:
            width = int(block[0][0].shape[1])
            for layer, (keys, values) in enumerate(block):
                self._arena.buffers[2 * layer][row, :, at:at + width] = keys
                self._arena.buffers[2 * layer + 1][row, :, at:at + width] = values
            at += width
        self._lengths[row] = n

    def decode(self, slots: list[int], tokens: list[int]) -> np.ndarray:
        """Append ``tokens[i]`` to ``slots[i]`` in one batch; logits [len(slots), vocab].

        Rows run as one contiguous block of at least ``min_decode_rows`` rows (2 for
        batch-invariant decoding); a row in it that was not asked for is fed a
        dummy token whose key/value land past its length and are overwritten later.
        """
        rows = [self._rows[s] for s in slots]
        first, stop = min(rows), max(rows) + 1
        if stop - first < self.min_decode_rows and not self.per_row:
            # a neighbouring row (in use or not) pads the step: its dummy token lands
            # past its length, as for any row of the block that was not asked for
            stop = min(first + self.min_decode_rows, self._arena.rows)
            first = max(stop - self.min_decode_rows, 0)
        self._grow(int(self._lengths[first:stop].max()) + 1)
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
        logits = self._run(first, stop, ids, rows)
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
            self._arena.move_row(last, row, n)
            self._arena.release(row, start=n)  # the freed sequence's longer tail
            for buffer in self._state_buffers:
                buffer[row] = buffer[last]
            self._lengths[row] = n
            self._rows[moved] = row
        self._lengths[last] = 0
        self._arena.release(last)
