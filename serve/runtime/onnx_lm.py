"""Offline generation over an ONNX causal LM session: generate and log-probs.

The decoding loop is the serving engine's own pieces, run for one call:
:class:`serve.runtime.step_lm_onnx.OnnxStepLM` (one prefill per prompt, then batched decode steps
over left-padded KV rows) on the ONE ``onnxruntime.InferenceSession`` the engine also gets
from :meth:`OrtCausalLM.step_lm`, :class:`serve.runtime.sampling.Sampler` for the next token,
:func:`serve.runtime.text.finish_generation` and the stop-sequence helpers for the text.
Greedy outputs equal the torch runtime's wherever the logits' arg-max does.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from serve.artifact import Manifest
from serve.errors import ArtifactError
from serve.runtime.protocol import ContextLengthExceeded, Generation, GenerationParams
from serve.runtime.sampling import Sampler
from serve.runtime.text import finish_generation, stop_index

log = logging.getLogger(__name__)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


class OrtCausalLM:
    """An ONNX causal LM (KV-cache graph) with its tokenizer, for offline calls.

    Args:
        path: The artifact folder (``model.onnx``, ``config.json``, tokenizer files).
        manifest: Its manifest (``decode_per_row`` reads its format and precision).
        tokenizer: The artifact's tokenizer.
        providers: ONNX Runtime execution providers.
        options: ``onnxruntime.SessionOptions``.

    Raises:
        ArtifactError: ONNX Runtime cannot load the graph, or it has no KV cache.
    """

    def __init__(self, path: Path, manifest: Manifest, tokenizer: Any, providers: list[str],
                 options: Any):
        import onnxruntime as ort

        from serve.runtime.step_lm import decode_per_row

        self.path = Path(path)
        self.tokenizer = tokenizer
        self.per_row = decode_per_row(manifest)
        self._lock = threading.Lock()
        try:
            self.session = ort.InferenceSession(str(self.path / "model.onnx"), options,
                                                providers=providers)
        except Exception as exc:  # ORT raises its own exception types
            raise ArtifactError(f"{self.path}: ONNX Runtime cannot load model.onnx "
                                f"({str(exc).splitlines()[0][:300]})") from None
        config = _read_json(self.path / "config.json")
        limits = [tokenizer.model_max_length, config.get("max_position_embeddings")]
        limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
        self.max_length = min(limits) if limits else 512
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = _read_json(self.path / "generation_config.json").get("eos_token_id")
        if eos is None:
            eos = tokenizer.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos_ids = frozenset(self._eos)
        self.step_lm()  # refuse a graph without KV cache at load time

    def step_lm(self) -> Any:
        """A fresh :class:`~serve.runtime.step_lm_onnx.OnnxStepLM` over this session."""
        from serve.runtime.step_lm_onnx import OnnxStepLM

        return OnnxStepLM(self.session, self.max_length, per_row=self.per_row)

    def _encode(self, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
        """Token ids per prompt; never truncated.

        Raises:
            ContextLengthExceeded: a prompt plus ``max_new_tokens`` exceeds ``max_length``.
        """
        rows = [self.tokenizer(p, verbose=False)["input_ids"] for p in prompts]
        for i, row in enumerate(rows):
            if len(row) + max_new_tokens > self.max_length:
                raise ContextLengthExceeded(i, len(row), max_new_tokens, self.max_length)
        return rows

    def _tokens(self, rows: list[list[int]], params: GenerationParams
                ) -> Iterator[list[tuple[int, int]]]:
        """Per step, ``(row, token)`` of every row still generating. A row ends at EOS, at
        a stop sequence, or after ``max_new_tokens``; the caller may stop early."""
        step = self.step_lm()
        samplers = [Sampler(params) for _ in rows]
        out: list[list[int]] = [[] for _ in rows]
        live = list(range(len(rows)))
        while live and params.max_new_tokens > 0:
            if not out[live[0]]:
                logits = np.stack([step.prefill(i, rows[i]) for i in live])
            else:
                logits = step.decode(live, [out[i][-1] for i in live])
            picked = [(i, samplers[i](row)) for i, row in zip(live, logits, strict=True)]
            for i, token in picked:
                out[i].append(token)
            yield picked
            live = [i for i in live if not self._done(out[i], params)]

    def _done(self, ids: list[int], params: GenerationParams) -> bool:
        if ids[-1] in self._eos or len(ids) >= params.max_new_tokens:
            return True
        stops = [s for s in params.stop if s]
        if not stops:
            return False
        tail = ids[-(2 * max(len(s) for s in stops) + 4):]
        return stop_index(self.tokenizer.decode(tail, skip_special_tokens=True),
                           stops) is not None

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        """Complete a batch of prompts (one batched decode, greedy or seeded sampling).

        ``completion_tokens`` counts generated tokens up to (not including) EOS, or up to
        the end of the stop sequence; ``finish_reason`` is ``stop`` or ``length``.
        """
        if not prompts:
            return []
        rows = self._encode(prompts, params.max_new_tokens)
        out: list[list[int]] = [[] for _ in rows]
        with self._lock:
            for picked in self._tokens(rows, params):
                for i, token in picked:
                    out[i].append(token)
        results = []
        for row, ids in zip(rows, out, strict=True):
            text, n, reason = finish_generation(self.tokenizer, self._eos, ids, params)
            results.append(Generation(text=text, prompt_tokens=len(row),
                                      completion_tokens=n, finish_reason=reason))
        return results

    def prompt_logits(self, ids: list[int]) -> np.ndarray:
        """float32 logits ``[len(ids), vocab]`` of one forward over ``ids`` (row ``t``
        predicts token ``t + 1``)."""
        return self.step_lm().prompt_logits(ids)

    def next_token_logprobs(self, texts: list[str], max_length: int = 256) -> list[Any]:
        """Per text: (token_ids [T] int64, log-softmax [T-1, V] float32), each text alone."""
        max_length = min(max_length, self.max_length)
        out = []
        for text in texts:
            ids = self.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            logits = self.prompt_logits(ids)[: max(len(ids) - 1, 0)].astype(np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            out.append((np.asarray(ids, dtype=np.int64), logprobs.astype(np.float32)))
        return out
