"""The one place that maps an artifact's ``manifest.format`` to its runtime.

:data:`RUNTIMES` is the one list of runtime formats: the loader picks a manifest's runtime
from it, and the compressor checks every format it writes against it
(:func:`check_format`). A new format is one runtime module plus one line here.

Offline evaluation, the variant gates, the benchmarks and the HTTP service all load their
model here, so offline and served numbers come from the same code.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from serve.artifact import load_artifact
from serve.errors import ArtifactError
from serve.runtime.protocol import Device, Runtime

#: format → ``"module:Class"`` of its runtime, imported only when an artifact needs it.
RUNTIMES: dict[str, str] = {
    # fp32/fp16/bf16 and bitsandbytes weights in transformers
    "torch": "serve.runtime.runtime_torch:TorchRuntime",
    # an ONNX graph on ONNX Runtime (CUDA EP or CPU EP)
    "onnx": "serve.runtime.runtime_onnx:OnnxRuntime",
    # an onnxruntime-genai model folder and its generator
    "onnx-genai": "serve.runtime.runtime_genai:GenaiRuntime",
}


def check_format(fmt: str, where: Path | str) -> str:
    """``fmt`` if a runtime serves it.

    Args:
        fmt: A manifest's ``format``.
        where: The artifact (or what is being built), named in the error.

    Raises:
        ArtifactError: One line naming the format and the known ones.
    """
    if fmt not in RUNTIMES:
        raise ArtifactError(f"{where}: unknown artifact format {fmt!r}; known formats: "
                            f"{', '.join(sorted(RUNTIMES))}")
    return fmt


def load_runtime(path: Path | str, device: Device = "auto", verify: bool = True) -> Runtime:
    """Load an artifact and return the runtime for its format.

    Args:
        path: Artifact folder.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        verify: Verify file hashes against the manifest first.

    Raises:
        ArtifactError: Missing, tampered or unknown-format artifact.
    """
    artifact = load_artifact(path, verify=verify)
    module, _, name = RUNTIMES[check_format(artifact.manifest.format, path)].partition(":")
    runtime_class = getattr(importlib.import_module(module), name)
    return runtime_class(artifact.path, artifact.manifest, device)
