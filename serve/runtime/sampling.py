"""Next-token choice from logits (greedy, or temperature + nucleus sampling with a seed),
within a grammar's token mask for a structured-output request."""

from __future__ import annotations

import numpy as np

from serve.runtime.logprobs import TokenLogprob, token_logprob
from serve.runtime.protocol import GenerationParams


class Sampler:
    """Picks each next token of one sequence.

    Greedy (``temperature == 0``) takes the arg-max, so batched and lone runs of the same
    prompt agree wherever the logits do. Sampling draws from the softmax of
    ``logits / temperature`` cut to the smallest set whose mass reaches ``top_p``, with a
    generator of its own per sequence: a seeded request gives the same tokens whatever
    else runs beside it. A request with a grammar (:mod:`serve.engine.grammar`) has its own
    matcher: the logits are masked to the tokens it allows before the pick, and it
    advances with the token picked (so EOS comes only once the output is complete).

    Args:
        params: The request's decoding settings.
    """

    def __init__(self, params: GenerationParams) -> None:
        self.temperature = params.temperature
        self.top_p = params.top_p
        self.rng = np.random.default_rng(params.seed) if params.temperature > 0 else None
        self.top_logprobs = params.logprobs
        #: The last token's log-probability, when the request asked for them.
        self.last: TokenLogprob | None = None
        self.matcher = params.grammar.matcher() if params.grammar is not None else None

    def __call__(self, logits: np.ndarray) -> int:
        """The next token id for ``logits`` [vocab], within the grammar if there is one; its
        log-probability (of the raw logits, as vLLM reports) goes to :attr:`last` when
        asked for."""
        if self.matcher is None:
            token = self._pick(logits)
        else:
            token = self._pick(self.matcher.mask(logits))
            self.matcher.accept(token)
        if self.top_logprobs is not None:
            self.last = token_logprob(logits, token, self.top_logprobs)
        return token

    def _pick(self, logits: np.ndarray) -> int:
        if self.rng is None:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.temperature
        scaled -= scaled.max()
        probs = np.exp(scaled)
        probs /= probs.sum()
        if self.top_p < 1.0:
            order = np.argsort(-probs)
            mass = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(mass, self.top_p)) + 1]
            kept = probs[keep] / probs[keep].sum()
            return int(keep[self.rng.choice(len(keep), p=kept)])
        return int(self.rng.choice(len(probs), p=probs))
