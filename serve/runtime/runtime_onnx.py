"""ONNX Runtime: an exported ``model.onnx`` (fp32, fp16, int8, int4) with its tokenizer.

Both tasks run a plain ``onnxruntime.InferenceSession`` (CUDA EP when available and asked
for, else CPU EP). A causal LM (one graph with a KV cache,
:mod:`compress.stages.onnx_export`) generates and scores through
:class:`serve.runtime.onnx_lm.OrtCausalLM`, whose session the serving engine's step LM shares;
the onnxruntime-genai format is faster for LMs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from serve.artifact import Manifest
from serve.errors import ArtifactError
from serve.runtime.protocol import (
    Classification,
    Generation,
    GenerationParams,
    require_task,
)

log = logging.getLogger(__name__)

MAX_CLASSIFY_BATCH = 64
CUDA_EP = "CUDAExecutionProvider"


def ort_threads() -> int:
    """Intra-op threads: ``MODELPRESS_THREADS`` if set, else every core the process may use."""
    env = os.environ.get("MODELPRESS_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def providers_for(device: str) -> tuple[list[str], str]:
    """ORT execution providers and the resolved device for ``auto``/``cpu``/``cuda``."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in ("auto", "cuda") and CUDA_EP in available:
        return [CUDA_EP, "CPUExecutionProvider"], "cuda"
    if device == "cuda":
        raise ArtifactError("device cuda asked for, but this onnxruntime has no "
                            "CUDAExecutionProvider (install onnxruntime-gpu)")
    return ["CPUExecutionProvider"], "cpu"


def session_options():
    """Session options: all graph optimisations, sensible thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = ort_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


class OnnxRuntime:
    """Runs an ``onnx`` artifact for classification or generation.

    Args:
        path: The artifact folder (``model.onnx``, ``config.json``, tokenizer files).
        manifest: Its (verified) manifest.
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    def __init__(self, path: Path, manifest: Manifest, device: str = "auto"):
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.manifest = manifest
        self.providers, self.device = providers_for(device)
        if not (self.path / "model.onnx").is_file():
            raise ArtifactError(f"{self.path}: no model.onnx in this onnx artifact")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.labels: list[str] = []
        self._lm = None
        if manifest.task == "text-classification":
            import onnxruntime as ort

            try:
                options = session_options()
                # Idle intra-op threads would otherwise spin for work and take the CPU
                # the server's event loop needs between batches: 1.35x the req/s of
                # `modelpress serve` at 32 connections on 2 cores (docs/benchmarks.md).
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                self.session = ort.InferenceSession(str(self.path / "model.onnx"), options,
                                                    providers=self.providers)
            except Exception as exc:  # ORT raises its own exception types
                raise ArtifactError(f"{self.path}: ONNX Runtime cannot load model.onnx "
                                    f"({str(exc).splitlines()[0][:300]})") from None
            self._inputs = {i.name for i in self.session.get_inputs()}
            config = json.loads((self.path / "config.json").read_text())
            id2label = config.get("id2label") or {}
            self.labels = [id2label[str(i)] for i in range(len(id2label))]
            self.max_length = min(int(config.get("max_position_embeddings", 512)),
                                  self.tokenizer.model_max_length)
        else:
            from serve.runtime.onnx_lm import OrtCausalLM

            self._lm = OrtCausalLM(self.path, manifest, self.tokenizer, self.providers,
                                   session_options())
            self.max_length = self._lm.max_length
            self.eos_ids = self._lm.eos_ids
        log.info("loaded %s (onnx, %s) on %s", self.path, manifest.precision, self.device)

    def _need(self, task: str) -> None:
        require_task(self.manifest, task)

    def class_probabilities(self, texts: list[str]) -> np.ndarray:
        """Probabilities, float32 array [len(texts), num_labels] (softmax of the logits)."""
        self._need("text-classification")
        out = []
        for start in range(0, len(texts), MAX_CLASSIFY_BATCH):
            enc = self.tokenizer(list(texts[start:start + MAX_CLASSIFY_BATCH]), padding=True,
                                 truncation=True, max_length=self.max_length,
                                 return_tensors="np")
            feed = {k: v.astype(np.int64) for k, v in enc.items() if k in self._inputs}
            if "token_type_ids" in self._inputs and "token_type_ids" not in feed:
                feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
            logits = self.session.run(None, feed)[0].astype(np.float32)
            logits -= logits.max(axis=-1, keepdims=True)
            probs = np.exp(logits)
            out.append(probs / probs.sum(axis=-1, keepdims=True))
        if not out:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)

    def classify(self, texts: list[str]) -> list[Classification]:
        """Classify a batch of texts (padded and truncated to the model's max length)."""
        results = []
        for row in self.class_probabilities(texts):
            best = int(row.argmax())
            results.append(Classification(
                label=self.labels[best], score=float(row[best]),
                scores={name: float(p) for name, p in zip(self.labels, row, strict=True)}))
        return results

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        """Complete a batch of prompts (KV cache, batched decode steps)."""
        self._need("text-generation")
        return self._lm.generate(prompts, params)

    def next_token_logprobs(self, texts: list[str], max_length: int = 256) -> list[Any]:
        """Per text: (token_ids [T], log-softmax [T-1, V]), see ``Runtime``."""
        self._need("text-generation")
        return self._lm.next_token_logprobs(texts, max_length)

    def prompt_logits(self, ids: list[int]) -> np.ndarray:
        """float32 logits ``[len(ids), vocab]`` over ``ids``, see ``TorchRuntime``."""
        self._need("text-generation")
        return self._lm.prompt_logits(ids)

    def count_tokens(self, text: str) -> int:
        """Tokens the model sees for ``text``, special tokens included."""
        return len(self.tokenizer(text)["input_ids"])

    def step_lm(self):
        """A :class:`serve.runtime.step_lm.StepLM` driving this runtime's ORT session (shared)."""
        self._need("text-generation")
        return self._lm.step_lm()
