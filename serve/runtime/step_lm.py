"""Step-level causal LM: prefill one slot, decode one token for many slots at once.

The generation engine's scheduler drives a :class:`StepLM`: a request is prefilled into a
free slot and joins the running batch at the next :meth:`StepLM.decode`, which runs
batched forwards over the slots it is given (continuous / iteration-level batching).

Layout (shared by the torch and ONNX implementations through
:class:`serve.runtime.slot_table.SlotTable`): the decoded slots are rows of one or more
left-padded *decode groups* (sequences of similar length batched together, so a long one
does not widen the short ones' batch); a decode step runs one forward per group, and a
row's numbers are those of the sequence decoded alone whichever group holds it.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from serve.errors import ArtifactError
from serve.runtime.slot_table import LayerKV

__all__ = ["BATCH_INVARIANT_FORMATS", "DYNAMIC_INT8", "LayerKV", "StepLM",
           "check_batch_invariant", "decode_per_row"]

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


#: Formats whose step LM can decode batch-invariantly (``min_decode_rows``): a row's
#: numbers then do not depend on how many rows decode with it. The slot-table LMs (torch,
#: ONNX) cannot: their GEMM kernels split rows differently by batch size (SmolLM2 fp32
#: torch: 2e-5 between identical rows of one batch).
BATCH_INVARIANT_FORMATS = frozenset({"onnx-genai"})


def check_batch_invariant(manifest: Any) -> None:
    """Refuse batch-invariant serving of an artifact whose step LM cannot do it.

    Raises:
        ArtifactError: Naming the format.
    """
    if manifest.format not in BATCH_INVARIANT_FORMATS and not decode_per_row(manifest):
        raise ArtifactError(f"batch_invariant: a {manifest.format} artifact cannot decode "
                            "batch-invariantly (its kernels split rows by batch size); "
                            f"use an {' or '.join(sorted(BATCH_INVARIANT_FORMATS))} variant "
                            "or serve without --batch-invariant")


class StepLM(Protocol):
    """Step-level causal LM. Called from ONE engine thread only (no locking needed inside).

    Attributes:
        vocab_size: Width of the returned logits.
        max_length: Context length (prompt + generated tokens) per sequence.
        chunked_prefill: Whether :meth:`prefill` continues a slot that holds tokens
            (``start > 0``) exactly as one whole prefill would (not for dynamic-int8
            graphs, whose activation scale spans the whole input).
        copies_kv: Whether :meth:`read_kv` / :meth:`load_prefix` work (prefix caching).

    A step LM of :data:`BATCH_INVARIANT_FORMATS` also has ``min_decode_rows`` (default
    1): the engine sets 2 for batch-invariant decoding, and :meth:`decode` then pads a
    lone row with a neighbour.
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
        """Append ``tokens[i]`` to ``slots[i]`` (batched forwards); logits ``[len(slots), V]``
        in the order of ``slots``."""
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

    def reserve(self, rows: int, length: int) -> None:
        """Make room for ``rows`` sequences of ``length`` tokens before any request, where
        the cache would otherwise grow (and copy) while requests run; a hint: past it the
        cache still grows."""
        ...
