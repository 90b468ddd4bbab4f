"""serve.app.start_failure: the one line a failing worker leaves for its launcher."""

from __future__ import annotations

import pytest

from serve.app import start_failure
from serve.errors import ArtifactError


def test_first_failure_is_kept_as_one_line(tmp_path):
    path = tmp_path / "failure"
    env = {start_failure.ENV: str(path)}
    assert start_failure.read(path) is None
    start_failure.record(ValueError("model type `x`\nis unknown\n  detail"), env)
    start_failure.record(ArtifactError("second worker"), env)
    assert start_failure.read(path) == "ValueError: model type `x`"


def test_without_the_variable_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(start_failure.ENV, raising=False)
    start_failure.record(RuntimeError("boom"))
    assert list(tmp_path.iterdir()) == []


def test_reported_records_and_reraises(tmp_path, monkeypatch):
    path = tmp_path / start_failure.FILE_NAME
    monkeypatch.setenv(start_failure.ENV, str(path))

    class Service:
        @start_failure.reported
        def __init__(self) -> None:
            raise ArtifactError("/a: ONNX Runtime cannot load model.onnx")

    with pytest.raises(ArtifactError):
        Service()
    assert start_failure.read(path) == "/a: ONNX Runtime cannot load model.onnx"
