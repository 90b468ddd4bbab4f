"""The demo's fine-tuned adapter cache: reused only for the same settings and inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.demo.finetune import FinetuneConfig
from compress.demo.run import _adapter
from serve.artifact import atomic_dir


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A base model folder, a training split and where the adapter goes."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights-v1")
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "fine", "label": "positive"}\n')
    return base, train, tmp_path / "lora"


def _trainer(calls: list[Path]):
    def train(dst: Path) -> Path:
        calls.append(dst)
        with atomic_dir(dst) as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"adapter %d" % len(calls))
        return dst
    return train


def test_adapter_is_reused_for_same_settings_and_inputs(inputs):
    base, train, out = inputs
    calls: list[Path] = []
    cfg = FinetuneConfig(steps=5)
    assert _adapter(out, cfg, base, train, None, _trainer(calls)) == out
    assert _adapter(out, cfg, base, train, None, _trainer(calls)) == out
    assert len(calls) == 1
    assert (out / "adapter_model.safetensors").read_bytes() == b"adapter 1"


def test_adapter_retrains_when_anything_it_was_made_from_changes(inputs):
    base, train, out = inputs
    calls: list[Path] = []
    cfg = FinetuneConfig(steps=5)
    _adapter(out, cfg, base, train, None, _trainer(calls))
    _adapter(out, FinetuneConfig(steps=6), base, train, None, _trainer(calls))  # settings
    assert len(calls) == 2
    train.write_text('{"text": "dull", "label": "negative"}\n')  # training data
    _adapter(out, FinetuneConfig(steps=6), base, train, None, _trainer(calls))
    assert len(calls) == 3
    (base / "model.safetensors").write_bytes(b"weights-v2")  # base model
    _adapter(out, FinetuneConfig(steps=6), base, train, None, _trainer(calls))
    assert len(calls) == 4
    _adapter(out, FinetuneConfig(steps=6), base, train, 100, _trainer(calls))  # sample size
    assert len(calls) == 5
    assert (out / "adapter_model.safetensors").read_bytes() == b"adapter 5"


def test_interrupted_training_is_not_reused(inputs):
    base, train, out = inputs
    calls: list[Path] = []
    cfg = FinetuneConfig(steps=5)

    def crash(dst: Path) -> Path:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _adapter(out, cfg, base, train, None, crash)
    _adapter(out, cfg, base, train, None, _trainer(calls))
    assert len(calls) == 1
