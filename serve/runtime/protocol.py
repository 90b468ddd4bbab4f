"""The contract every runtime keeps: its data types, errors and the ``Runtime`` protocol.

Offline evaluation and the HTTP service both run models through runtimes loaded by
:func:`serve.runtime.loader.load_runtime`, so offline and served numbers come from the
same code. This module imports no framework; the concrete runtimes import theirs lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from serve.artifact import Manifest
from serve.errors import ModelpressError

Device = Literal["auto", "cpu", "cuda"]


class UnsupportedRequest(ModelpressError):
    """A request the runtime cannot serve (wrong task, bad parameters)."""


class ContextLengthExceeded(UnsupportedRequest):
    """A prompt plus ``max_new_tokens`` does not fit in the model's context.

    Raised instead of cutting the prompt (OpenAI answers such a request with a 400 too).

    Attributes:
        index: Position of the (first) offending prompt in the batch.
        prompt_tokens: Its token count.
        max_new_tokens: The requested completion length.
        context_length: The model's context length.
    """

    def __init__(self, index: int, prompt_tokens: int, max_new_tokens: int,
                 context_length: int) -> None:
        self.index, self.prompt_tokens = index, prompt_tokens
        self.max_new_tokens, self.context_length = max_new_tokens, context_length
        super().__init__(f"max_new_tokens: {max_new_tokens} plus the {prompt_tokens} tokens "
                         f"of prompt {index} exceed the model's context of {context_length} "
                         "tokens; lower max_new_tokens or shorten the prompt")


@dataclass
class Classification:
    """One classified text.

    Attributes:
        label: The predicted label name.
        score: Probability of the predicted label.
        scores: Probability of every label, by name.
    """

    label: str
    score: float
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class GenerationParams:
    """Decoding settings for :meth:`Runtime.generate`.

    Attributes:
        max_new_tokens: Upper bound on generated tokens.
        temperature: 0 means greedy decoding.
        top_p: Nucleus sampling threshold (used when temperature > 0).
        stop: Stop sequences; the text is cut before the first one found.
        seed: Random seed for sampling (reproducible outputs).
        logprobs: Alternatives to report with each generated token's log-probability
            (``None``: no log-probabilities; the engine only).
        grammar: A :class:`serve.engine.grammar.Grammar` the output must follow (structured
            outputs; the engine's sampler applies it), or None.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    grammar: Any = None


@dataclass
class Generation:
    """One generated completion.

    Attributes:
        text: The completion (prompt excluded, cut at a stop sequence).
        prompt_tokens: Tokens in the prompt.
        completion_tokens: Tokens generated.
        finish_reason: ``stop`` (EOS or stop sequence) or ``length``.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"] = "stop"


class Runtime(Protocol):
    """What every runtime offers. Methods for the other task raise ``UnsupportedRequest``."""

    manifest: Manifest
    device: str
    labels: list[str]

    def classify(self, texts: list[str]) -> list[Classification]:
        """Classify a batch of texts."""
        ...

    def class_probabilities(self, texts: list[str]) -> Any:
        """Probabilities, a float array of shape [len(texts), num_labels]."""
        ...

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        """Complete a batch of prompts (left-padded, KV cache)."""
        ...

    def next_token_logprobs(self, texts: list[str], max_length: int = 256) -> list[Any]:
        """Per text: (token_ids [T], log_softmax over the vocabulary [T-1, V]).

        Row ``t`` is the distribution predicting ``token_ids[t + 1]`` (a BOS token the
        tokenizer adds is scored as context only). Texts are truncated to ``max_length``.
        """
        ...

    def count_tokens(self, text: str) -> int:
        """Number of tokens the model sees for ``text``."""
        ...


class LMRuntime(Runtime, Protocol):
    """What a text-generation runtime adds: what the engine, the token limits and the
    OpenAI routes read (every LM runtime: torch, onnx, onnx-genai).

    Attributes:
        tokenizer: The artifact's Hugging Face tokenizer.
        max_length: The model's context length in tokens (prompt plus completion).
        eos_ids: Token ids that end a completion.
    """

    tokenizer: Any
    max_length: int
    eos_ids: frozenset[int]

    def prompt_logits(self, ids: list[int]) -> Any:
        """float32 logits ``[len(ids), vocab]``: row ``t`` predicts token ``t + 1``."""
        ...

    def step_lm(self) -> Any:
        """A step-level LM (:class:`serve.runtime.step_lm.StepLM`) over this runtime's
        model, shared with it (the continuous-batching engine drives it)."""
        ...


def require_task(manifest: Manifest, task: str) -> None:
    """Raise ``UnsupportedRequest`` unless the artifact is a ``task`` model."""
    if manifest.task != task:
        raise UnsupportedRequest(f"this artifact is a {manifest.task} model; "
                                 f"it does not support {task}")


def resolve_device(device: Device = "auto") -> str:
    """``cuda`` when asked for or available (auto), else ``cpu``."""
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"
