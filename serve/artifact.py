"""What an artifact is: a folder of model files plus ``manifest.json``.

This module is torch-free so the server and the benchmark can read manifests without
importing a deep-learning framework. It also owns the atomic-write helpers that the
compressor uses, so every artifact on disk is either complete or absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import posixpath
import shutil
import time
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20

Task = Literal["text-classification", "text-generation"]


class FileEntry(BaseModel):
    """One file of an artifact.

    Attributes:
        path: Path relative to the artifact folder, with ``/`` separators.
        bytes: Size in bytes.
        sha256: Hex digest of the content.
    """

    model_config = ConfigDict(extra="forbid")

    path: str
    bytes: int
    sha256: str


class Manifest(BaseModel):
    """The record of how an artifact was made and what it scores.

    Attributes:
        schema_version: Version of this schema.
        name: Artifact name (stage kind or variant name).
        task: ``text-classification`` or ``text-generation``.
        format: The runtime that serves it (``torch``, ``onnx``, ``onnx-genai``, ...);
            the list is ``serve/runtime/loader.py``'s ``RUNTIMES``, checked where the
            artifact is written and loaded.
        precision: Weight precision or quantization method (``fp32``, ``int8-dynamic``, ...).
        files: Every file in the folder except the manifest, with size and hash.
        lineage: Inputs (paths + hashes), the cache key and each stage's resolved config,
            seconds and metrics, from the original checkpoint to this artifact.
        metrics: Fidelity numbers measured when the artifact was made.
        eval: Evaluation results keyed by dataset (filled by ``modelpress eval``).
        gate: Verdict against the recipe's gates: ``passed``, ``failed`` or ``not-evaluated``.
        environment: Library versions and device used to make it.
        created_at: UTC timestamp (ISO 8601).
    """

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    name: str
    task: Task
    format: str = Field(min_length=1)
    precision: str
    files: list[FileEntry] = Field(default_factory=list)
    lineage: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)
    gate: dict[str, Any] = Field(default_factory=lambda: {"verdict": "not-evaluated"})
    environment: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                   time.gmtime()))

    @property
    def total_bytes(self) -> int:
        """Bytes on disk of all files of the artifact."""
        return sum(f.bytes for f in self.files)


class Artifact(BaseModel):
    """A loaded artifact: its folder and its verified manifest."""

    path: Path
    manifest: Manifest


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(folder: Path) -> list[FileEntry]:
    """Describe every file under ``folder`` (except the manifest), sorted by path."""
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_NAME:
            continue
        entries.append(FileEntry(path=rel, bytes=path.stat().st_size, sha256=sha256_file(path)))
    return entries


def tree_digest(entries: list[FileEntry]) -> str:
    """One hash for a set of files: the SHA-256 of their sorted (path, sha256) pairs."""
    digest = hashlib.sha256()
    for entry in sorted(entries, key=lambda e: e.path):
        digest.update(f"{entry.path}\0{entry.sha256}\n".encode())
    return digest.hexdigest()


def environment() -> dict[str, Any]:
    """Library versions and platform, read from package metadata (no heavy imports)."""
    versions = {}
    for name in ("modelpress", "torch", "transformers", "peft", "onnxscript", "onnx",
                 "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "bitsandbytes",
                 "bentoml"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {"python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "packages": versions}


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Fill ``manifest.files`` from ``folder`` and write ``manifest.json`` atomically.

    Args:
        folder: The artifact folder (its model files already written).
        manifest: The manifest to complete and write.

    Returns:
        The manifest as written.
    """
    manifest.files = list_files(folder)
    if not manifest.environment:
        manifest.environment = environment()
    save_manifest(folder, manifest)
    return manifest


def save_manifest(folder: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically (temp file + rename), files left as recorded."""
    tmp = folder / f"{TMP_PREFIX}{uuid.uuid4().hex}.json"
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST_NAME)


def read_manifest(folder: Path) -> Manifest:
    """Read and validate ``manifest.json`` without checking file hashes.

    Raises:
        ArtifactError: The folder or manifest is missing or invalid.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact folder")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder}: not an artifact (no {MANIFEST_NAME}); "
                            "an interrupted run leaves none, re-run `modelpress compress`")
    try:
        return Manifest.model_validate_json(path.read_text())
    except (ValidationError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise ArtifactError(f"{path}: invalid manifest ({first})") from None


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Check that the folder holds exactly the manifest's files with their hashes.

    Manifest paths are normalised (``./x`` is ``x``); a path leaving the folder, or a
    symlink (file or folder) resolving outside it, is refused.

    Raises:
        ArtifactError: naming the first file that is missing, changed, unexpected or
            outside the artifact.
    """
    root = folder.resolve()
    recorded = {}
    for entry in manifest.files:
        rel = posixpath.normpath(entry.path)
        if rel.startswith(("/", "../")) or rel == "..":
            raise ArtifactError(f"{folder}: manifest entry {entry.path!r} is outside the "
                                "artifact; refusing to load")
        recorded[rel] = entry
    present = set()
    for path in folder.rglob("*"):
        if path.is_symlink():
            target = Path(os.path.realpath(path))  # no exception on a symlink loop
            if not target.is_relative_to(root):
                raise ArtifactError(f"{path}: symlink to {target}, outside the artifact; "
                                    "refusing to load")
        if path.is_file():
            present.add(path.relative_to(folder).as_posix())
    present.discard(MANIFEST_NAME)
    for rel in sorted(recorded):
        entry = recorded[rel]
        path = folder / rel
        if rel not in present:
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise ArtifactError(f"{path}: sha256 does not match the manifest "
                                "(file changed or corrupt); refusing to load")
    extra = sorted(present - set(recorded))
    if extra:
        raise ArtifactError(f"{folder / extra[0]}: file not listed in the manifest; "
                            "refusing to load")


def load_artifact(folder: Path | str, verify: bool = True) -> Artifact:
    """Load an artifact's manifest and (by default) verify every file's hash.

    Args:
        folder: The artifact folder.
        verify: Check sizes and SHA-256 of all files against the manifest.

    Raises:
        ArtifactError: The artifact is missing, incomplete or tampered with.
    """
    folder = Path(folder).resolve()
    manifest = read_manifest(folder)
    if verify:
        verify_files(folder, manifest)
    return Artifact(path=folder, manifest=manifest)


@contextlib.contextmanager
def atomic_dir(dst: Path) -> Iterator[Path]:
    """Build a folder under a temporary name and move it to ``dst`` only on success.

    The temporary folder is a sibling of ``dst`` (same filesystem, so the final rename is
    atomic). If the block raises, or the process is killed, ``dst`` is untouched; stale
    temporary folders are removed by :func:`remove_stale_tmp`.

    Yields:
        The temporary folder to write into.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f"{TMP_PREFIX}{dst.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f"{TMP_PREFIX}{dst.name}-old-{uuid.uuid4().hex[:8]}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete leftover temporary folders/files (from killed runs) directly under ``folder``."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if path.name.startswith(TMP_PREFIX):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
