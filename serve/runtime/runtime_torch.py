"""Torch runtime: a ``save_pretrained`` folder run with transformers.

Weights load in the manifest's precision (``fp32``/``fp16``/``bf16``); an artifact saved
by bitsandbytes (``nf4``, ``int8-bnb``) carries its ``quantization_config`` in
``config.json`` and loads quantized through it. CUDA is used when available. On a CPU with
AVX512-BF16, bitsandbytes 0.50 first tries to fetch a faster 4-bit kernel from the Hugging
Face Hub (``kernels-community``) and, offline, warns that it failed; its own built-in CPU
kernel is then used (same greedy tokens); and int8 (LLM.int8) logs on every forward that
it casts fp32 activations to fp16, which is how it works. Those loggers are kept to errors.

Generation pads on the left and decodes with ``model.generate`` (KV cache); the server
streams through the engine's step LM (:meth:`TorchRuntime.step_lm`). Model calls are serialised by
a lock, so a seeded sampling request is reproducible while others run. Prompts are never
cut: one that leaves no room for ``max_new_tokens`` in the model's context is refused with
:class:`serve.runtime.protocol.ContextLengthExceeded`.
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
    require_task,
    resolve_device,
)
from serve.runtime.text import finish_generation, stop_index

log = logging.getLogger(__name__)

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
MAX_CLASSIFY_BATCH = 64


class TorchRuntime:
    """Runs a torch artifact (transformers folder) for classification or generation.

    Args:
        path: The artifact folder.
        manifest: Its (verified) manifest.
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    def __init__(self, path: Path, manifest: Manifest, device: str = "auto"):
        import torch
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        self.path = Path(path)
        self.manifest = manifest
        self.device = resolve_device(device)
        self._torch = torch
        self._lock = threading.Lock()
        config = json.loads((self.path / "config.json").read_text())
        quantized = "quantization_config" in config
        cls = (AutoModelForSequenceClassification if manifest.task == "text-classification"
               else AutoModelForCausalLM)
        kwargs: dict[str, Any] = {"use_safetensors": True}
        if quantized:
            for name in ("kernels", "bitsandbytes.backends.cpu.ops",
                         "bitsandbytes.autograd._functions"):
                logging.getLogger(name).setLevel(logging.ERROR)
            # bitsandbytes places the quantized weights itself; compute dtype is in its config.
            kwargs["device_map"] = {"": self.device}
            kwargs["dtype"] = torch.float32 if self.device == "cpu" else torch.float16
        else:
            kwargs["dtype"] = getattr(torch, DTYPES.get(manifest.precision, "float32"))
        try:
            self.model = cls.from_pretrained(self.path, **kwargs).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ArtifactError(f"{self.path}: cannot load as a {manifest.task} torch model "
                                f"({str(exc).strip().splitlines()[0]})") from None
        if not quantized:
            self.model.to(self.device)
        self.max_length = self._max_length()
        id2label = self.model.config.id2label or {}
        if manifest.task == "text-classification":
            self.labels = [id2label[i] for i in range(len(id2label))]
        else:
            self._setup_generation()
        log.info("loaded %s (%s, %s) on %s", self.path, manifest.format, manifest.precision,
                 self.device)

    def _setup_generation(self) -> None:
        """Padding token and the token ids generation stops on (generation config first)."""
        self.labels = []
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos_ids = frozenset(self._eos)

    def _max_length(self) -> int:
        limits = [self.tokenizer.model_max_length,
                  getattr(self.model.config, "max_position_embeddings", None)]
        limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
        return min(limits) if limits else 512

    def _need(self, task: str) -> None:
        require_task(self.manifest, task)

    # --- classification -------------------------------------------------------------

    def class_probabilities(self, texts: list[str]) -> np.ndarray:
        """Probabilities, float32 array [len(texts), num_labels] (softmax of the logits)."""
        self._need("text-classification")
        torch = self._torch
        out = []
        for start in range(0, len(texts), MAX_CLASSIFY_BATCH):
            chunk = list(texts[start:start + MAX_CLASSIFY_BATCH])
            enc = self.tokenizer(chunk, padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            enc = {k: v.to(self.model.device) for k, v in enc.items()
                   if k in ("input_ids", "attention_mask", "token_type_ids")}
            with self._lock, torch.inference_mode():
                logits = self.model(**enc).logits.float()
            out.append(torch.softmax(logits, dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)

    def classify(self, texts: list[str]) -> list[Classification]:
        """Classify a batch of texts (padded and truncated to the model's max length)."""
        probs = self.class_probabilities(texts)
        results = []
        for row in probs:
            best = int(row.argmax())
            results.append(Classification(
                label=self.labels[best], score=float(row[best]),
                scores={name: float(p) for name, p in zip(self.labels, row, strict=True)}))
        return results

    # --- generation -----------------------------------------------------------------

    def _encode_prompts(self, prompts: list[str], max_new_tokens: int):
        """Left-padded batch; never truncated (a prompt that does not fit is refused).

        Raises:
            ContextLengthExceeded: a prompt plus ``max_new_tokens`` exceeds ``max_length``.
        """
        enc = self.tokenizer(list(prompts), padding=True, padding_side="left",
                             return_tensors="pt", verbose=False)
        for i, n in enumerate(enc["attention_mask"].sum(dim=1).tolist()):
            if n + max_new_tokens > self.max_length:
                raise ContextLengthExceeded(i, int(n), max_new_tokens, self.max_length)
        return {k: v.to(self.model.device) for k, v in enc.items()
                if k in ("input_ids", "attention_mask")}

    def _generate_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": params.max_new_tokens,
                                  "pad_token_id": self.tokenizer.pad_token_id,
                                  "use_cache": True}
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def _criteria(self, params: GenerationParams, prompt_width: int, extra=()) -> Any:
        """Stopping criteria: the given ones plus stop sequences (checked on decoded text)."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        torch, tokenizer, stops = self._torch, self.tokenizer, [s for s in params.stop if s]
        tail = 2 * max((len(s) for s in stops), default=0) + 4

        class _StopText(StoppingCriteria):
            # transformers' own stop_strings cannot handle every tokenizer (word-level ones)
            def __call__(self, input_ids, scores, **kwargs):
                rows = input_ids[:, prompt_width:][:, -tail:].tolist()
                hits = [stop_index(tokenizer.decode(r, skip_special_tokens=True), stops)
                        is not None for r in rows]
                return torch.tensor(hits, dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList(([_StopText()] if stops else []) + list(extra))

    def _seed(self, params: GenerationParams) -> None:
        if params.temperature > 0 and params.seed is not None:
            self._torch.manual_seed(params.seed)

    def _finish(self, ids: list[int], params: GenerationParams) -> tuple[str, int, str]:
        return finish_generation(self.tokenizer, self._eos, ids, params)

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        """Complete a batch of prompts (left padding, KV cache, greedy or seeded sampling).

        ``completion_tokens`` counts generated tokens up to (not including) EOS, or up to
        the end of the stop sequence; ``finish_reason`` is ``stop`` or ``length``.
        """
        self._need("text-generation")
        if not prompts:
            return []
        torch = self._torch
        enc = self._encode_prompts(prompts, params.max_new_tokens)
        with self._lock, torch.inference_mode():
            self._seed(params)
            out = self.model.generate(
                **enc, **self._generate_kwargs(params),
                stopping_criteria=self._criteria(params, enc["input_ids"].shape[1]))
        width = enc["input_ids"].shape[1]
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, n_prompt in zip(out[:, width:].tolist(), prompt_tokens, strict=True):
            text, n, reason = self._finish(row, params)
            results.append(Generation(text=text, prompt_tokens=int(n_prompt),
                                      completion_tokens=n, finish_reason=reason))
        return results

    def next_token_logprobs(self, texts: list[str], max_length: int = 256) -> list[Any]:
        """Per text: (token_ids [T] int64, log-softmax [T-1, V] float32), see Runtime."""
        self._need("text-generation")
        torch = self._torch
        max_length = min(max_length, self.max_length)
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                             padding_side="right", return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.model.device), enc["attention_mask"]
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask.to(self.model.device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
        out = []
        for i, n in enumerate(mask.sum(dim=1).tolist()):
            out.append((ids[i, :n].cpu().numpy().astype(np.int64), logprobs[i, :max(n - 1, 0)]))
        return out

    def prompt_logits(self, ids: list[int]) -> np.ndarray:
        """float32 logits ``[len(ids), vocab]`` of one forward over ``ids`` (row ``t``
        predicts token ``t + 1``): what ``echo`` scores the prompt with."""
        self._need("text-generation")
        torch = self._torch
        row = torch.tensor([list(ids)], dtype=torch.long, device=self.model.device)
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=row, attention_mask=torch.ones_like(row)).logits
        return logits[0].float().cpu().numpy()

    def count_tokens(self, text: str) -> int:
        """Tokens the model sees for ``text``, special tokens (BOS, CLS/SEP) included."""
        return len(self.tokenizer(text, verbose=False)["input_ids"])

    def step_lm(self):
        """A :class:`serve.runtime.step_lm.StepLM` over this runtime's model (weights shared)."""
        self._need("text-generation")
        from serve.runtime.step_lm_torch import TorchStepLM

        return TorchStepLM(self.model, self.max_length)
