"""onnxruntime-genai runtime: a model-builder folder run by its C++ generation loop.

Written against onnxruntime-genai 0.18's ``Config`` / ``Model`` / ``GeneratorParams`` /
``Generator`` API (unchanged from 0.11 in what is used here; the ``Engine`` / ``Request``
API that changed is not used: the serving engine drives the graph itself, see
:mod:`serve.runtime.step_lm_genai`). Text is tokenized and decoded with transformers
(onnxruntime-genai 0.11's own tokenizer mis-encodes GGUF-derived ``tokenizer.json``
files) and token ids are passed to the generator with ``append_tokens``. A batch runs as
groups of prompts of equal token length (0.11 and 0.18 continue left-padded rows
wrongly). Log-probs come from the ``logits`` output of the prompt pass, which covers
every prompt position.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from serve.artifact import Manifest
from serve.errors import ArtifactError
from serve.runtime.protocol import (
    Classification,
    ContextLengthExceeded,
    Generation,
    GenerationParams,
    UnsupportedRequest,
)
from serve.runtime.text import finish_generation

log = logging.getLogger(__name__)


class GenaiRuntime:
    """Runs an ``onnx-genai`` artifact (text generation only).

    Args:
        path: The artifact folder (``genai_config.json``, ``model.onnx``, tokenizer files).
        manifest: Its (verified) manifest.
        device: ``auto``, ``cpu`` or ``cuda`` (CUDA only if the model was built for it).
    """

    def __init__(self, path: Path, manifest: Manifest, device: str = "auto"):
        import onnxruntime_genai as og
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.manifest = manifest
        self.labels: list[str] = []
        self._og = og
        self._lock = threading.Lock()
        genai = json.loads((self.path / "genai_config.json").read_text())["model"]
        providers = genai["decoder"]["session_options"].get("provider_options", [])
        built_for = "cuda" if any("cuda" in p for p in providers) else "cpu"
        self.device = "cuda" if device in ("auto", "cuda") and built_for == "cuda" else "cpu"
        if device == "cuda" and built_for != "cuda":
            raise ArtifactError(f"{self.path}: built for the CPU execution provider; "
                                "rebuild the variant for cuda")
        self._model: Any = None  # og.Model, loaded by the first offline generation
        self._model_lock = threading.Lock()
        try:
            self._config = self._genai_config()
        except Exception as exc:  # onnxruntime-genai raises RuntimeError/OSError
            raise ArtifactError(f"{self.path}: onnxruntime-genai cannot read the model's "
                                f"config ({str(exc).splitlines()[0][:300]})") from None
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.context_length = int(genai["context_length"])
        self.max_length = self.context_length
        self.pad_id = int(genai.get("pad_token_id", self.tokenizer.pad_token_id or 0))
        eos = genai.get("eos_token_id", self.tokenizer.eos_token_id)
        self._eos = set(eos if isinstance(eos, list) else [eos])
        self.eos_ids = frozenset(self._eos)
        log.info("loaded %s (onnx-genai, %s) on %s", self.path, manifest.precision,
                 self.device)

    def _genai_config(self) -> Any:
        from serve.runtime.runtime_onnx import ort_threads

        config = self._og.Config(str(self.path))
        # onnxruntime-genai's own default ran one intra-op thread here (measured: 120
        # vs 150 tok/s at 2 on SmolLM2 int4); same thread count as every ORT session
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": ort_threads()}}}}))
        config.clear_providers()
        if self.device == "cuda":
            config.append_provider("cuda")
        return config

    @property
    def model(self) -> Any:
        """The ``og.Model`` of the offline path (generate, log-probs), loaded on
        first use: a server runs only :meth:`step_lm`'s session, so it holds the weights
        once (SmolLM2 worker RSS: fp32 1754 -> 1107 MiB, int4 747 -> 610, docs/benchmarks.md).

        Raises:
            ArtifactError: onnxruntime-genai cannot load the model.
        """
        with self._model_lock:
            if self._model is None:
                try:
                    self._model = self._og.Model(self._config)
                except Exception as exc:  # onnxruntime-genai raises RuntimeError/OSError
                    raise ArtifactError(f"{self.path}: onnxruntime-genai cannot load the "
                                        f"model ({str(exc).splitlines()[0][:300]})") from None
                log.info("loaded %s's onnxruntime-genai model (offline generation)",
                         self.path)
            return self._model

    def step_lm(self) -> Any:
        """A step-level view of this model for the serving engine (its own ORT session).

        Its KV buffers are host memory bound in place (IOBinding), which the CPU
        execution provider needs; device-resident buffers for CUDA are not built (no GPU
        to verify them on), so the engine runs a CUDA-built model on the CPU EP.
        """
        from serve.runtime.runtime_onnx import session_options
        from serve.runtime.step_lm import decode_per_row
        from serve.runtime.step_lm_genai import GenaiStepLM

        if self.device == "cuda":
            log.warning("%s: the serving engine runs onnx-genai models on the CPU "
                        "execution provider (CUDA KV buffers not implemented)", self.path)
        return GenaiStepLM(self.path, ["CPUExecutionProvider"], session_options(),
                           per_row=decode_per_row(self.manifest))

    def _need_generation(self) -> None:
        if self.manifest.task != "text-generation":
            raise UnsupportedRequest("this artifact is not a text-generation model")

    def classify(self, texts: list[str]) -> list[Classification]:
        """Not supported: onnx-genai artifacts are causal LMs."""
        raise UnsupportedRequest("this artifact is a text-generation model; "
                                 "it does not support text-classification")

    def class_probabilities(self, texts: list[str]) -> Any:
        """Not supported: onnx-genai artifacts are causal LMs."""
        return self.classify(texts)

    def _encode(self, prompts: list[str], max_new_tokens: int,
                first: int = 0) -> tuple[np.ndarray, list[int]]:
        """Left-padded ids and prompt lengths; a prompt is never cut (as in every runtime).

        Args:
            prompts: The prompts.
            max_new_tokens: Tokens to generate after each.
            first: The batch position of ``prompts[0]`` (for the error).

        Raises:
            ContextLengthExceeded: a prompt plus ``max_new_tokens`` exceeds the context.
        """
        rows = [self.tokenizer(p)["input_ids"] for p in prompts]
        for i, row in enumerate(rows):
            if len(row) + max_new_tokens > self.context_length:
                raise ContextLengthExceeded(first + i, len(row), max_new_tokens,
                                            self.context_length)
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int32)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = row
        return ids, [len(r) for r in rows]

    def _generator(self, ids: np.ndarray, params: GenerationParams):
        og = self._og
        options: dict[str, Any] = {
            "batch_size": ids.shape[0],
            "max_length": min(self.context_length, ids.shape[1] + params.max_new_tokens)}
        if params.temperature > 0:
            options.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                           top_k=len(self.tokenizer))
            if params.seed is not None:
                options["random_seed"] = params.seed
        else:
            options.update(do_sample=False)
        gp = og.GeneratorParams(self.model)
        gp.set_search_options(**options)
        generator = og.Generator(self.model, gp)
        generator.append_tokens(ids)
        return generator

    def _finish(self, ids: list[int], params: GenerationParams) -> tuple[str, int, str]:
        return finish_generation(self.tokenizer, self._eos, ids, params)

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        """Complete a batch of prompts (left padding, greedy or seeded sampling)."""
        self._need_generation()
        if not prompts:
            return []
        # onnxruntime-genai 0.11 and 0.18 continue left-padded rows wrongly (measured: a
        # padded row's greedy output differs from the same prompt alone), so prompts are batched
        # only with prompts of the same token length.
        encoded = [self._encode([p], params.max_new_tokens, i)[0][0]
                   for i, p in enumerate(prompts)]
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(encoded):
            groups.setdefault(len(row), []).append(i)
        rows: dict[int, list[int]] = {}
        with self._lock:
            for width, members in groups.items():
                ids = np.stack([encoded[i] for i in members])
                generator = self._generator(ids, params)
                while not generator.is_done():
                    generator.generate_next_token()
                for k, i in enumerate(members):
                    rows[i] = generator.get_sequence(k)[width:].tolist()
        results = []
        for i in range(len(prompts)):
            text, n, reason = self._finish(rows[i], params)
            results.append(Generation(text=text, prompt_tokens=len(encoded[i]),
                                      completion_tokens=n, finish_reason=reason))
        return results

    def next_token_logprobs(self, texts: list[str], max_length: int = 256) -> list[Any]:
        """Per text: (token_ids [T] int64, log-softmax [T-1, V] float32), see ``Runtime``."""
        self._need_generation()
        max_length = min(max_length, self.context_length)
        out = []
        for text in texts:
            ids = self.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            row = np.asarray([ids], dtype=np.int32)
            with self._lock:
                gp = self._og.GeneratorParams(self.model)
                gp.set_search_options(max_length=min(self.context_length, len(ids) + 1),
                                      batch_size=1)
                generator = self._og.Generator(self.model, gp)
                generator.append_tokens(row)
                logits = np.asarray(generator.get_output("logits"), dtype=np.float32)[0]
            logits = logits[: len(ids) - 1]
            logits = logits - logits.max(axis=-1, keepdims=True)
            logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            out.append((np.asarray(ids, dtype=np.int64), logprobs.astype(np.float32)))
        return out

    def prompt_logits(self, ids: list[int]) -> np.ndarray:
        """float32 logits ``[len(ids), vocab]`` of one forward over ``ids`` (row ``t``
        predicts token ``t + 1``): what ``echo`` scores the prompt with."""
        self._need_generation()
        with self._lock:
            gp = self._og.GeneratorParams(self.model)
            gp.set_search_options(max_length=min(self.context_length, len(ids) + 1),
                                  batch_size=1)
            generator = self._og.Generator(self.model, gp)
            generator.append_tokens(np.asarray([list(ids)], dtype=np.int32))
            logits = np.asarray(generator.get_output("logits"), dtype=np.float32)[0]
        return logits[: len(ids)]

    def count_tokens(self, text: str) -> int:
        """Tokens the model sees for ``text``, special tokens (BOS) included."""
        return len(self.tokenizer(text)["input_ids"])
