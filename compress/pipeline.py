"""Runs a recipe: stages in order, each into its own folder, cached by content hash.

Layout of the output folder::

    OUT/<stage kind>/     one artifact per stage (merge, distill), each with manifest.json
    OUT/<variant name>/   one artifact per variant, built from the last stage's output
    OUT/run.json          what this run did (cached or built, seconds, verdicts)

Each folder is built under a temporary name and renamed when complete, so a killed run
leaves nothing that looks finished; the next run removes the leftovers (also those in
``OUT/.cache`` and the distill checkpoints: :func:`remove_leftovers`) and resumes from
the last complete stage. A stage is reused when its cache key (stage kind and version,
resolved config, and the content hashes of its inputs) equals the one in its manifest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import InputError
from compress.recipe import Recipe
from compress.stages.base import STAGE_VERSIONS, StageContext, StageResult
from serve.artifact import (
    ArtifactError,
    Manifest,
    atomic_dir,
    load_artifact,
    remove_stale_tmp,
    sha256_file,
    tree_digest,
    write_manifest,
)
from serve.errors import ModelpressError
from serve.runtime.loader import check_format

log = logging.getLogger(__name__)

Report = Callable[[str], None]
StageFn = Callable[[Any, Path, Path, StageContext], StageResult]


def stage_function(kind: str) -> StageFn:
    """Return the function implementing a stage kind (imported lazily)."""
    if kind == "merge":
        from compress.stages.merge import merge

        return merge
    if kind == "distill":
        from compress.stages.distill import distill

        return distill
    raise KeyError(kind)


@dataclass
class StepRecord:
    """One stage or variant of a run, as reported in ``run.json`` and the CLI table."""

    name: str
    kind: str
    path: str
    status: str  # built | cached | failed
    seconds: float = 0.0
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    gate: str | None = None
    bytes: int = 0


class HashCache:
    """SHA-256 of input files, remembered by (path, size, mtime) in ``OUT/.hashes.json``."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def file(self, path: Path) -> str:
        """Hash of one file, reusing the remembered one if size and mtime are unchanged."""
        stat = path.stat()
        key = str(path.resolve())
        hit = self.entries.get(key)
        if hit and hit["size"] == stat.st_size and hit["mtime_ns"] == stat.st_mtime_ns:
            return hit["sha256"]
        digest = sha256_file(path)
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                             "sha256": digest}
        return digest

    def folder(self, folder: Path) -> str:
        """One hash for all files of a folder (names and contents)."""
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if path.name.startswith(".") or path.name == "README.md":
                continue
            digest.update(f"{path.relative_to(folder).as_posix()}\0{self.file(path)}\n".encode())
        return digest.hexdigest()

    def save(self) -> None:
        """Write the remembered hashes (atomically)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1))
        os.replace(tmp, self.path)


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` so two runs never write the same folder."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{out}: another modelpress run is using this folder") from None
        yield


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _source_inputs(recipe: Recipe, hashes: HashCache) -> list[dict[str, Any]]:
    base = recipe.base
    if base.gguf_file:
        base_hash = hashes.file(base.path / base.gguf_file)
    else:
        base_hash = hashes.folder(base.path)
    inputs = [{"role": "base", "path": str(base.path), "gguf_file": base.gguf_file,
               "trained_quantization": base.trained_quantization, "sha256": base_hash}]
    for adapter in recipe.adapters:
        inputs.append({"role": "adapter", "path": str(adapter.path), "weight": adapter.weight,
                       "sha256": hashes.folder(adapter.path)})
    return inputs


def _data_inputs(recipe: Recipe, hashes: HashCache) -> list[dict[str, Any]]:
    out = []
    for section in ("train", "calibration", "eval"):
        spec = getattr(recipe.data, section)
        if spec is not None:
            out.append({"role": f"data.{section}", "path": str(spec.path),
                        "fields": spec.model_dump(mode="json", exclude={"path"}),
                        "sha256": hashes.file(spec.path)})
    return out


def _cached(folder: Path, key: str) -> Manifest | None:
    try:
        manifest = load_artifact(folder).manifest
    except ArtifactError:
        return None
    return manifest if manifest.lineage.get("cache_key") == key else None


def run_stages(recipe: Recipe, out: Path, report: Report = lambda m: None,
               hashes: HashCache | None = None) -> tuple[Path, list[StepRecord]]:
    """Run the recipe's stages, reusing cached outputs.

    Args:
        recipe: The validated recipe.
        out: Output folder.
        report: Progress callback (``"merge: loading base model"``).
        hashes: Input hash cache (created in ``out`` if not given).

    Returns:
        The last stage's artifact folder (the reference for variants) and one record per stage.
    """
    hashes = hashes or HashCache(out / ".hashes.json")
    inputs = _source_inputs(recipe, hashes)
    data = _data_inputs(recipe, hashes)
    src = recipe.base.path
    history: list[dict[str, Any]] = []
    prev_digest = ""
    records = []
    for index, config in enumerate(recipe.stages):
        kind = config.kind
        dst = out / kind
        stage_inputs = inputs if index == 0 else [
            {"role": "previous", "path": str(src), "sha256": prev_digest}]
        if kind == "distill":
            stage_inputs = stage_inputs + data
        key = _key(kind, STAGE_VERSIONS[kind], config.model_dump(mode="json"), recipe.task,
                   recipe.labels, stage_inputs)
        manifest = _cached(dst, key)
        if manifest is not None:
            report(f"{kind}: unchanged, reusing {dst}")
            log.info("stage %s cached (key %s)", kind, key[:12])
            records.append(StepRecord(kind, kind, str(dst), "cached",
                                      metrics=manifest.metrics, bytes=manifest.total_bytes))
        else:
            start = time.perf_counter()
            ctx = StageContext(recipe=recipe, index=index,
                               report=lambda m, k=kind: report(f"{k}: {m}"))
            with atomic_dir(dst) as tmp:
                result = stage_function(kind)(config, src, tmp, ctx)
                seconds = time.perf_counter() - start
                step = {"kind": kind, "config": config.model_dump(mode="json"),
                        "seconds": round(seconds, 3), "metrics": result.metrics,
                        "details": result.details}
                manifest = write_manifest(tmp, Manifest(
                    name=kind, task=recipe.task, format=check_format(result.format, dst),
                    precision=result.precision, metrics=result.metrics,
                    lineage={"cache_key": key, "inputs": stage_inputs,
                             "recipe": recipe.name, "stages": [*history, step]}))
            records.append(StepRecord(kind, kind, str(dst), "built", seconds=seconds,
                                      metrics=result.metrics, bytes=manifest.total_bytes))
        history = manifest.lineage["stages"]
        prev_digest = tree_digest(manifest.files)
        src = dst
    hashes.save()
    return src, records


def run_recipe(recipe: Recipe, out: Path, report: Report = lambda m: None) -> list[StepRecord]:
    """Run a whole recipe (stages, then variants) into ``out`` and write ``run.json``.

    A variant that fails is recorded with its error and the others still build.

    Returns:
        One record per stage and variant.
    """
    out = Path(out).resolve()
    created = not out.exists()
    with locked(out):
        for stale in remove_leftovers(out):
            log.info("removed leftover of an interrupted run: %s", stale)
        try:
            reference, records = run_stages(recipe, out, report)
        except ModelpressError:
            if created:  # bad input: leave no trace of this run
                shutil.rmtree(out, ignore_errors=True)
            raise
        for variant in recipe.variants:
            records.append(_build_variant(recipe, variant, reference, out, report))
        summary = {"recipe": recipe.name, "task": recipe.task, "reference": str(reference),
                   "steps": [asdict(r) for r in records]}
        tmp = out / ".tmp-run.json"
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        os.replace(tmp, out / "run.json")
    return records


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the temporary files and folders of interrupted runs (``.tmp-*``) wherever the
    pipeline writes them: ``OUT`` (stages, variants, run.json), ``OUT/.cache`` (the shared
    fp32 ONNX export and genai build) and ``OUT/.distill-checkpoints/<key>``.

    Only safe while holding :func:`locked` on ``out``.

    Returns:
        The paths removed.
    """
    from compress.stages.distill import CHECKPOINTS

    folders = [out, out / ".cache"]
    if (out / CHECKPOINTS).is_dir():
        folders += sorted(p for p in (out / CHECKPOINTS).iterdir() if p.is_dir())
    return [path for folder in folders for path in remove_stale_tmp(folder)]


def _build_variant(recipe: Recipe, variant: Any, reference: Path, out: Path,
                   report: Report) -> StepRecord:
    from compress.stages.variants import build_variant

    dst = out / variant.name
    before = _manifest_id(dst)
    start = time.perf_counter()
    try:
        manifest = build_variant(recipe, variant, reference, dst,
                                 lambda m: report(f"{variant.name}: {m}"))
    except ModelpressError as exc:
        log.error("variant %s failed: %s", variant.name, exc)
        return StepRecord(variant.name, variant.kind, str(dst), "failed",
                          seconds=time.perf_counter() - start, error=str(exc))
    # A rebuilt artifact is renamed into place, so its manifest is a new file.
    status = "cached" if before is not None and before == _manifest_id(dst) else "built"
    return StepRecord(variant.name, variant.kind, str(dst), status,
                      seconds=time.perf_counter() - start, metrics=manifest.metrics,
                      gate=manifest.gate.get("verdict"), bytes=manifest.total_bytes)


def _manifest_id(folder: Path) -> tuple[int, int] | None:
    try:
        stat = (folder / "manifest.json").stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns
