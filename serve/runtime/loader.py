"""The one place that maps an artifact's ``manifest.format`` to its runtime.

* ``torch``      → :class:`serve.runtime.runtime_torch.TorchRuntime` (fp32/fp16/bf16, bitsandbytes)
* ``onnx``       → :class:`serve.runtime.runtime_onnx.OnnxRuntime` (ONNX Runtime, CUDA EP or CPU EP)
* ``onnx-genai`` → :class:`serve.runtime.runtime_genai.GenaiRuntime` (onnxruntime-genai generator)

Offline evaluation, the variant gates, the benchmarks and the HTTP service all load their
model here, so offline and served numbers come from the same code. A new format is one
runtime module plus one line here.
"""

from __future__ import annotations

from pathlib import Path

from serve.artifact import load_artifact
from serve.errors import ModelpressError
from serve.runtime.protocol import Device, Runtime


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
    fmt = artifact.manifest.format
    if fmt == "torch":
        from serve.runtime.runtime_torch import TorchRuntime

        return TorchRuntime(artifact.path, artifact.manifest, device)
    if fmt == "onnx":
        from serve.runtime.runtime_onnx import OnnxRuntime

        return OnnxRuntime(artifact.path, artifact.manifest, device)
    if fmt == "onnx-genai":
        from serve.runtime.runtime_genai import GenaiRuntime

        return GenaiRuntime(artifact.path, artifact.manifest, device)
    raise ModelpressError(f"{path}: unknown artifact format {fmt!r}")
