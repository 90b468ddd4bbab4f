import json
import subprocess
import sys

import pytest

from serve.artifact import (
    ArtifactError,
    Manifest,
    atomic_dir,
    load_artifact,
    sha256_file,
    write_manifest,
)


def _artifact(folder):
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"weights" * 100)
    (folder / "sub").mkdir()
    (folder / "sub" / "config.json").write_text("{}")
    return write_manifest(folder, Manifest(name="x", task="text-classification",
                                           format="onnx", precision="fp32"))


def test_manifest_records_sizes_and_hashes(tmp_path):
    manifest = _artifact(tmp_path / "a")
    entries = {f.path: f for f in manifest.files}
    assert set(entries) == {"model.bin", "sub/config.json"}
    assert entries["model.bin"].bytes == 700
    assert entries["model.bin"].sha256 == sha256_file(tmp_path / "a" / "model.bin")
    on_disk = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert on_disk["schema_version"] == 1 and on_disk["environment"]["python"]
    assert load_artifact(tmp_path / "a").manifest.total_bytes == 702


def test_tampered_file_refused(tmp_path):
    _artifact(tmp_path / "a")
    (tmp_path / "a" / "model.bin").write_bytes(b"weightz" * 100)
    with pytest.raises(ArtifactError, match=r"model\.bin: sha256 does not match"):
        load_artifact(tmp_path / "a")


def test_missing_and_extra_files_refused(tmp_path):
    _artifact(tmp_path / "a")
    (tmp_path / "a" / "evil.py").write_text("print(1)")
    with pytest.raises(ArtifactError, match=r"evil\.py: file not listed"):
        load_artifact(tmp_path / "a")
    (tmp_path / "a" / "evil.py").unlink()
    (tmp_path / "a" / "sub" / "config.json").unlink()
    with pytest.raises(ArtifactError, match=r"config\.json: listed in the manifest but missing"):
        load_artifact(tmp_path / "a")


def test_folder_without_manifest_is_not_an_artifact(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ArtifactError, match="not an artifact"):
        load_artifact(tmp_path / "half")


def test_atomic_dir_leaves_nothing_on_failure_and_replaces_on_success(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(dst) as tmp:
        (tmp / "f").write_text("partial")
        raise RuntimeError("boom")
    assert not dst.exists() and list(tmp_path.iterdir()) == []
    for content in ("one", "two"):
        with atomic_dir(dst) as tmp:
            (tmp / "f").write_text(content)
    assert (dst / "f").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_serve_artifact_does_not_import_torch():
    code = ("import sys, serve.artifact; "
            "print(any(m in sys.modules for m in ('torch', 'transformers', 'compress')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
