"""Shared fixtures: tiny models built from configs (no network), CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny BERT/Llama models and LoRA adapters (see compress/tiny.py)."""
    from compress.tiny import build_all

    return build_all(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def bentoml_env(tmp_path_factory) -> dict[str, str]:
    """Process environment for a served test: a private BENTOML_HOME, tracking off."""
    home = tmp_path_factory.mktemp("bentoml-home")
    return {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
            "OMP_NUM_THREADS": "1"}


def write_recipe(path: Path, text: str) -> Path:
    """Write a recipe file and return its path."""
    path.write_text(text)
    return path


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real ``modelpress`` command in a subprocess."""
    return subprocess.run([sys.executable, "-c", "from compress.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
