"""Step pacing: size prompt chunks from measured step times, so running streams keep pace.

A token budget alone (``max_num_batched_tokens``) does not bound what the running streams
feel while a long prompt prefills: on a GPU a 2,048-token chunk costs about a decode step,
on two CPU cores it costs seconds (SmolLM2-135M int4: ~2.6 ms per prompt token against
~22 ms for a step of 8 decoding streams). The pacer measures the step LM as it runs, a
moving average of a decode step's seconds and of a prompt token's seconds inside chunk
prefills, and while any sequence decodes the scheduler gives long prompts (over
``long_prefill_tokens``) at most the tokens that keep a step within about
``max_gap_ratio`` decode steps: the streams' inter-token gap stays within that ratio of its
usual value, whatever the hardware, and a lone prompt (nothing decoding) still prefills in
chunks as large as the budget allows. Short prompts are not paced: small chunks cost a
pass over the weights each, so pacing a burst of chat prompts cut prefill throughput (a
demo's queued requests waited past the 30 s queue timeout).
"""

from __future__ import annotations

#: Fewest prompt tokens a paced step prefills: a prompt always makes progress, and the
#: first chunk measures the cost of a prompt token.
MIN_CHUNK = 8

_WEIGHT = 0.25  # of the newest measurement in the moving averages


class StepPacer:
    """Moving averages of step costs and the prompt-chunk cap they imply.

    Args:
        max_gap_ratio: A step with a prompt chunk takes at most about this many times a
            decode-only step while sequences decode; ``0`` turns pacing off.
    """

    def __init__(self, max_gap_ratio: float) -> None:
        self.max_gap_ratio = max_gap_ratio
        self.decode_s: float | None = None  # seconds of a decode step
        self.token_s: float | None = None  # seconds per prompt token in a chunk prefill

    def observe(self, prompt_tokens: int, prefill_s: float, decoded: int,
                decode_s: float) -> None:
        """Record one step: ``prompt_tokens`` prefilled in ``prefill_s`` seconds, then
        ``decoded`` sequences decoded in ``decode_s`` seconds."""
        if decoded:
            self.decode_s = _average(self.decode_s, decode_s)
        if prompt_tokens:
            self.token_s = _average(self.token_s, prefill_s / prompt_tokens)

    def chunk_cap(self, decoding: int) -> int | None:
        """The most prompt tokens for the next step (``None``: no cap beyond the budget).

        Args:
            decoding: Sequences that decode in that step.
        """
        if self.max_gap_ratio <= 0 or not decoding or self.decode_s is None:
            return None
        if self.token_s is None or self.token_s <= 0:
            return MIN_CHUNK
        allowed = (self.max_gap_ratio - 1.0) * self.decode_s / self.token_s
        return max(MIN_CHUNK, int(allowed))


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1.0 - _WEIGHT) * old + _WEIGHT * new
